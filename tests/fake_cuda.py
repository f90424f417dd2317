"""CUDA as loopui's model manager sees it, simulated on the CPU (this machine has no GPU).

``torch.cuda`` answers as if ``count`` devices were present with ``free`` bytes each; the pipeline's ``.to("cuda:N")``
stays on the CPU, and diffusers' model CPU offload installs its real accelerate hooks with the CPU as the execution
device (sequential offload too, see ``fake_sequential``). So the hooks, their removal and the manager's bookkeeping
are real; only the memory is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

GIB = 2**30


@dataclass
class FakeCuda:
    """What the fake reports and what it saw."""

    count: int = 2
    total: int = 80 * GIB  # per device, unless `totals` names the device
    totals: dict = field(default_factory=dict)
    pipe_bytes: int = 0  # what a pipeline placed entirely on a device occupies there while it is alive
    empty_cache_calls: int = 0
    placements: list = field(default_factory=list)  # (policy, device asked for)
    on_empty_cache: Any = None  # a callable run on every empty_cache (tests check what is still alive then)
    resident: list = field(default_factory=list)  # (weakref to a pipeline, device) placed with .to("cuda:N")

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        if self.on_empty_cache is not None:
            self.on_empty_cache()

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        name = "cuda:0" if device is None else str(device)
        total = self.totals.get(name, self.total)
        used = sum(self.pipe_bytes for ref, where in self.resident if where == name and ref() is not None)
        return max(0, total - used), total


def _cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    """Pretend CUDA is there (two devices of 80 GiB each unless the test says otherwise)."""
    import diffusers
    import torch

    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    monkeypatch.setattr(torch.cuda, "empty_cache", fake.empty_cache)
    # An Ampere card (no attention kernel installed here, so "auto" is native on it).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake CUDA GPU")

    pipeline = diffusers.DiffusionPipeline
    to, model_offload = pipeline.to, pipeline.enable_model_cpu_offload

    def fake_to(self, *args, **kwargs):
        import weakref

        target = next((str(a) for a in args if isinstance(a, (str, torch.device))), None)
        if target is not None:  # moved somewhere: it no longer occupies the device it was on
            fake.resident[:] = [(r, where) for r, where in fake.resident if r() is not None and r() is not self]
        if target is not None and target.startswith("cuda"):
            fake.placements.append(("none", target))
            fake.resident.append((weakref.ref(self), target))
        args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return to(self, *args, **kwargs)

    def fake_model_offload(self, gpu_id=None, device=None):
        fake.placements.append(("model", str(device)))
        return model_offload(self, device="cpu")

    def fake_sequential(self, gpu_id=None, device=None):
        # accelerate's sequential hooks break on a CPU execution device (the tied T5 embedding comes back as a
        # plain tensor: "new() received an invalid combination of arguments"), so the fake records the policy and
        # installs model offload's hooks instead.
        fake.placements.append(("sequential", str(device)))
        return model_offload(self, device="cpu")

    from loopui.models import memory

    group_offload = memory.place_group_offload

    def fake_group(pipe, device):
        # CUDA streams cannot be made on a CPU: diffusers' real group offload hooks, onloading to the CPU.
        fake.placements.append(("group", str(device)))
        return group_offload(pipe, "cpu")

    monkeypatch.setattr(memory, "place_group_offload", fake_group)
    monkeypatch.setattr(pipeline, "to", fake_to)
    monkeypatch.setattr(pipeline, "enable_model_cpu_offload", fake_model_offload)
    monkeypatch.setattr(pipeline, "enable_sequential_cpu_offload", fake_sequential)
    return fake
