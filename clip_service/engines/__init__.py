"""Engines: what CLIP_MODEL names, and the runtimes that turn images and texts into features."""
