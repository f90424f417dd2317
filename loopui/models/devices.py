"""Several GPUs in one app: which devices to use, and a pool that gives each job a device of its own.

With N devices the app runs N generations at once, each pinned to one device with its own cached pipeline and
memory policy (the ``ModelManager`` keys its cache by device and measures free memory per device). A job waits
for a free device; among the free ones it prefers one that already holds its model, so switching models happens
as rarely as possible.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

_WAIT_POLL_SECONDS = 0.1  # how often a waiting job looks at its cancel event


def cuda_capability(device: object) -> Optional[tuple[int, int]]:
    """(major, minor) compute capability of ``device`` when it is a CUDA GPU, None for another device. A device
    torch does not know, or a CUDA device without CUDA, is one ``ValueError`` line (before anything loads)."""
    import torch

    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return tuple(torch.cuda.get_device_capability(dev))


def parse_devices(text: Optional[str | Sequence[str]] = None) -> list[str]:
    """Device names from ``"cuda:0,cuda:1"`` (or a list); None, ``""`` or ``"auto"``: every visible CUDA device,
    else ``["cpu"]``. Raises ``ValueError`` naming a malformed, unavailable or repeated device."""
    import torch

    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        return ["cpu"]
    items = [part.strip() for part in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not item for item in items):
        raise ValueError(f"devices must be a comma-separated list such as cuda:0,cuda:1; got {text!r}")
    names: list[str] = []
    for item in items:
        try:
            device = torch.device(item)
        except RuntimeError:
            raise ValueError(f"devices: {item!r} is not a torch device (try cuda:0 or cpu)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"devices: {item!r} asked for, but CUDA is not available here")
            index = 0 if device.index is None else device.index
            if index >= torch.cuda.device_count():
                raise ValueError(f"devices: {item!r} does not exist ({torch.cuda.device_count()} CUDA device(s) "
                                 f"visible: cuda:0..cuda:{torch.cuda.device_count() - 1})")
            device = torch.device("cuda", index)
        name = str(device)
        if name in names:
            raise ValueError(f"devices: {name} is listed twice")
        names.append(name)
    return names


class DevicePool:
    """Hands each job a device of its own: ``with pool.acquire() as device: ...`` waits while all are busy."""

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self.devices = list(devices)
        self._busy: set[str] = set()
        self._last_used = {device: 0 for device in self.devices}
        self._clock = 0
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        """How many jobs can run at once."""
        return len(self.devices)

    def busy(self) -> int:
        """How many devices are in use now."""
        with self._cond:
            return len(self._busy)

    @contextmanager
    def acquire(self, prefer: Optional[Callable[[str], bool]] = None,
                cancel: Optional[threading.Event] = None,
                on_wait: Optional[Callable[[], None]] = None) -> Iterator[str]:
        """Hold a free device for the block; among free devices those where ``prefer(device)`` is true come first,
        then the one idle longest. ``on_wait()`` is called once if the job has to wait; a set ``cancel`` ends the
        wait with ``LoadCancelled``."""
        from loopui.models.loader import LoadCancelled

        waited = False
        with self._cond:
            while True:
                free = [d for d in self.devices if d not in self._busy]
                if free:
                    break
                if not waited:
                    waited = True
                    if on_wait is not None:
                        on_wait()
                if cancel is not None and cancel.is_set():
                    raise LoadCancelled("stopped while waiting for a free device")
                self._cond.wait(_WAIT_POLL_SECONDS)
            preferred = [d for d in free if prefer is not None and prefer(d)]
            device = min(preferred or free, key=lambda d: self._last_used[d])
            self._busy.add(device)
        logger.info("job runs on %s", device)
        try:
            yield device
        finally:
            with self._cond:
                self._busy.discard(device)
                self._clock += 1
                self._last_used[device] = self._clock
                self._cond.notify_all()
