"""Stop pressed inside a transformer call: shared by the hostile-input and the compile tests."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from loopui.engine import LoopInterrupted, generate_loop


def blocks_run_after_stop(pipe: Any, blocks: list, request: Any, match: str) -> list[int]:
    """Run ``request`` on ``pipe`` with Stop pressed while ``blocks[0]`` of the first call runs; expects the run to
    end in ``LoopInterrupted`` matching ``match`` and returns the indices of the blocks that still ran after it."""
    stop = threading.Event()
    after_stop: list[int] = []

    def record(index: int):
        def hook(module, args, output):
            if index == 0 and not stop.is_set():
                stop.set()  # Stop arrives while the call is in its first block
            elif stop.is_set():
                after_stop.append(index)
        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    try:
        with pytest.raises(LoopInterrupted, match=match):
            generate_loop(pipe, request, cancel_event=stop)
    finally:
        for handle in handles:
            handle.remove()
    return after_stop
