"""Benchmarks, run as modules from the repository root: `python -m bench.speed`, `python -m
bench.accuracy`, `python -m bench.tower`. They share the tests' helpers through tests.support."""
