"""How a cluster run spreads its engines (library/cluster.py engine_slots): one per core group on CPU
nodes, one per GPU where the engine can take one. Ray's node records are faked: the plan is arithmetic
on them, and the two-node runs (test_cluster.py) show it on a real cluster."""

from __future__ import annotations

import pytest

from clip_service.engines.registry import may_run_on_gpu
from clip_service.library.cluster import CPUS_PER_ENGINE, Slots, engine_slots


class FakeRay:
    def __init__(self, *resources: dict, dead: dict | None = None):
        self.records = [{"Alive": True, "Resources": each} for each in resources]
        if dead:
            self.records.append({"Alive": False, "Resources": dead})

    def nodes(self):
        return self.records


@pytest.mark.parametrize(("nodes", "engines", "gpus", "expected"), [
    ([{"CPU": 16}, {"CPU": 8}], 0, False, Slots(6, CPUS_PER_ENGINE)),
    ([{"CPU": 1}, {"CPU": 1}], 0, False, Slots(2, 1)),  # small nodes: an engine per CPU
    ([{"CPU": 16}, {"CPU": 2}], 0, False, Slots(9, 2)),  # the smallest node sets the group size
    ([{"CPU": 16}, {"CPU": 16}], 3, False, Slots(3, CPUS_PER_ENGINE)),
    ([{"CPU": 16, "GPU": 2}, {"CPU": 8}], 0, True, Slots(2, CPUS_PER_ENGINE, 1)),  # an engine per GPU
    ([{"CPU": 4, "GPU": 4}], 0, True, Slots(4, 1, 1)),  # the node's CPUs shared among its GPUs
    ([{"CPU": 16, "GPU": 2}], 0, False, Slots(4, CPUS_PER_ENGINE)),  # an engine that cannot take a GPU
    ([{"CPU": 16}, {"CPU": 16}], 0, True, Slots(8, CPUS_PER_ENGINE)),  # no GPU anywhere
])
def test_engine_slots(nodes, engines, gpus, expected):
    assert engine_slots(FakeRay(*nodes), engines, gpus) == expected


def test_dead_nodes_take_no_engine():
    assert engine_slots(FakeRay({"CPU": 8}, dead={"CPU": 64, "GPU": 8}), 0, True) == Slots(2, CPUS_PER_ENGINE)


@pytest.mark.parametrize(("backend", "device", "precision", "expected"), [
    ("auto", "auto", "auto", True),  # torch on a GPU node, OpenVINO on a CPU one (registry.choose_backend)
    ("torch", "cuda", "fp16", True),
    ("torch", "cuda:1", "auto", True),
    ("auto", "cpu", "auto", False),
    ("openvino", "auto", "bf16", False),
    ("auto", "auto", "int8", False),  # int8 is OpenVINO's, on the CPU
    ("torch", "mps", "auto", False),
])
def test_which_settings_ask_for_a_gpu(backend, device, precision, expected):
    assert may_run_on_gpu(backend, device, precision) is expected
