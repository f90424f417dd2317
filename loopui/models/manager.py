"""Load diffusers pipelines lazily, cache them, and pick how they use GPU memory.

Nothing happens at construction: the first ``get()`` / ``use()`` downloads (through diffusers / huggingface_hub,
with progress in bytes, a free-disk check and a stoppable download), loads and places the model; later calls with
the same (model, dtype, device) return the cached one. By default one model is kept per device, so switching models
frees the previous one first -- but never while a generation still uses it: ``use()`` leases a model, and a load
that needs its room waits until the lease ends. When CUDA is present the memory policy (everything on the GPU,
model CPU offload or sequential CPU offload) is chosen per device from free VRAM against the registry's estimate,
the FramePack way; ``LOOPUI_OFFLOAD=none|model|sequential`` (or the ``offload`` argument) forces one.

``run()`` is how a generation should use a model: it leases it, and after any failure resets the offload hooks
and empties the CUDA cache outside the ``except`` block (where the traceback would still pin the failed run's
tensors); a CUDA out-of-memory error is retried once with the next policy (none -> model -> sequential).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from loopui.models.registry import ModelSpec, resolve_model_id, spec_for

logger = logging.getLogger(__name__)

MEMORY_POLICIES = ("none", "model", "sequential")
NEXT_POLICY: dict[str, Optional[str]] = {"none": "model", "model": "sequential", "sequential": None}
POLICY_TEXT = {"none": "everything on the GPU", "model": "model CPU offload", "sequential": "sequential CPU offload"}
OFFLOAD_ENV = "LOOPUI_OFFLOAD"
# Plan against this share of free VRAM: the CUDA context, the allocator's fragmentation and other processes
# need the rest.
VRAM_HEADROOM = 0.9
# Without a per-model figure, model offload peaks at about the biggest component (T5 or transformer) plus
# activations: roughly 60% of keeping everything resident.
MODEL_OFFLOAD_SHARE = 0.6
_GIB = 2**30

ProgressCallback = Callable[[str, Optional[float], str], None]
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model could not be downloaded or loaded; the message names the model and what to do."""


class LoadCancelled(Exception):
    """A load (or the wait for a device) was stopped through its cancel event."""


class OutOfGPUMemory(RuntimeError):
    """A generation ran out of GPU memory, also after the one retry with more offloading; the message says what to
    change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory error (torch's class, or a CUDA/cuBLAS allocation failure)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def choose_memory_policy(free_bytes: int, need_bytes: int, has_cuda: bool,
                         offload_need_bytes: Optional[int] = None) -> str:
    """Pick ``"none"`` (all on the GPU), ``"model"`` or ``"sequential"`` CPU offload from free VRAM.

    ``need_bytes`` is what the model needs fully resident; ``offload_need_bytes`` its peak under model offload
    (default: ``MODEL_OFFLOAD_SHARE`` of ``need_bytes``). Without CUDA nothing can be offloaded: ``"none"``.
    """
    if free_bytes < 0 or need_bytes < 0:
        raise ValueError(f"memory sizes must be >= 0, got free={free_bytes!r}, need={need_bytes!r}")
    if not has_cuda:
        return "none"
    budget = free_bytes * VRAM_HEADROOM
    if need_bytes <= budget:
        return "none"
    offload_need = need_bytes * MODEL_OFFLOAD_SHARE if offload_need_bytes is None else offload_need_bytes
    if offload_need <= budget:
        return "model"
    return "sequential"


def offload_from_env() -> Optional[str]:
    """The policy forced by ``LOOPUI_OFFLOAD`` (None when unset, empty or ``auto``)."""
    return _check_policy(os.environ.get(OFFLOAD_ENV), source=OFFLOAD_ENV)


def _check_policy(value: Optional[str], source: str = "offload") -> Optional[str]:
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    policy = value.strip().lower()
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"{source} must be one of auto, {', '.join(MEMORY_POLICIES)}; got {value!r}")
    return policy


@dataclass
class LoadedModel:
    """A loaded pipeline and how it was placed (what the UI shows as the model's status)."""

    pipe: Any
    spec: ModelSpec
    device: str
    dtype: str
    policy: str  # "none" | "model" | "sequential"
    load_seconds: float
    key: tuple = field(default=(), repr=False)
    # Leases (``ModelManager.use``): a model in use is never evicted; ``retired`` = released while in use.
    users: int = field(default=0, repr=False, compare=False)
    holders: dict = field(default_factory=dict, repr=False, compare=False)  # thread id -> leases it holds
    retired: bool = field(default=False, repr=False, compare=False)

    def describe(self) -> str:
        """One line such as ``THUDM/CogVideoX-5b on cuda:0, bfloat16, model CPU offload, loaded in 41.2 s``."""
        placement = {"none": "all on device", "model": "model CPU offload",
                     "sequential": "sequential CPU offload"}[self.policy]
        return (f"{self.spec.model_id} on {self.device}, {self.dtype}, {placement}, "
                f"loaded in {self.load_seconds:.1f} s")


def _log_progress(stage: str, fraction: Optional[float], message: str) -> None:
    logger.info("%s: %s", stage, message)


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_error_types() -> tuple[type[BaseException], ...]:
    # diffusers wraps most hub failures in OSError; httpx transport errors (not OSError) can still surface.
    types: list[type[BaseException]] = [OSError, ValueError, RuntimeError, ImportError, KeyError]
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        types.append(httpx.HTTPError)
    return tuple(types)


class ModelManager:
    """Lazy, thread-safe cache of loaded pipelines keyed by (model, dtype, device).

    ``max_models`` bounds how many stay loaded on each device (least recently used goes first, but never one in
    use). ``device`` and ``offload`` fix the device / memory policy for every load (default: CUDA when present,
    policy from free VRAM or ``LOOPUI_OFFLOAD``). ``local_files_only`` never contacts the hub (only already
    downloaded models load); ``cache_dir`` overrides the Hugging Face cache folder.
    """

    def __init__(self, max_models: int = 1, device: Optional[str] = None, offload: Optional[str] = None,
                 local_files_only: bool = False, cache_dir: Optional[str | Path] = None) -> None:
        if not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models must be an integer >= 1, got {max_models!r}")
        self.max_models = max_models
        self.device = device
        self.offload = _check_policy(offload)
        self.local_files_only = local_files_only
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        # Guards _cache, the leases and the counters; waited on by a load that needs an in-use model's room.
        # Never held while loading.
        self._state = threading.Condition()
        self._device_locks: dict[str, threading.Lock] = {}  # one load at a time per device
        self._gpu_locks: dict[str, threading.Lock] = {}
        self._load_count = 0

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def load_count(self) -> int:
        """How many loads this manager has performed (cache hits do not count)."""
        with self._state:
            return self._load_count

    def get(self, model: Optional[str | Path] = None, dtype: Any = None, device: Optional[str] = None,
            offload: Optional[str] = None, progress: Optional[ProgressCallback] = None,
            cancel: Optional[threading.Event] = None) -> LoadedModel:
        """Return the loaded ``model`` (hub id, ``demo`` or folder; default ``DEFAULT_MODEL_ID``), loading it once.

        ``progress(stage, fraction, message)`` hears "downloading" (with the fraction of bytes), "loading",
        "moving to GPU", "memory" (a policy change after running out of GPU memory) and "ready". A set ``cancel``
        stops a download at its next chunk (``LoadCancelled``). Raises ``ValueError`` for an unknown model or bad
        argument, ``ModelLoadError`` when loading fails. The model is not leased: another load on the same device
        may release it -- use :meth:`use` or :meth:`run` while generating.
        """
        return self._obtain(model, dtype, device, offload, progress, cancel, lease=False)

    @contextmanager
    def use(self, model: Optional[str | Path] = None, dtype: Any = None, device: Optional[str] = None,
            offload: Optional[str] = None, progress: Optional[ProgressCallback] = None,
            cancel: Optional[threading.Event] = None) -> Iterator[LoadedModel]:
        """Like :meth:`get`, but the model is leased for the block: no other load evicts it meanwhile (a load that
        needs its room waits for the block to end)."""
        loaded = self._obtain(model, dtype, device, offload, progress, cancel, lease=True)
        try:
            yield loaded
        finally:
            self._unlease(loaded)

    def run(self, model: Optional[str | Path], work: Callable[[LoadedModel], T], dtype: Any = None,
            device: Optional[str] = None, offload: Optional[str] = None,
            progress: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None) -> T:
        """``work(loaded)`` with ``model`` leased (see :meth:`use`), cleaning up after failures.

        After any exception the failed frames' locals are cleared, the pipeline's offload hooks are reset
        (``maybe_free_model_hooks``: under model offload this moves a component stranded on the GPU back) and the
        CUDA cache is emptied -- outside the ``except`` block, so the memory really comes back. A CUDA
        out-of-memory error is then retried once with the next memory policy (none -> model -> sequential, told
        through ``progress("memory", ...)``); the model keeps that policy. When that fails too, or there is no next
        policy, :class:`OutOfGPUMemory` says what to change.
        """
        report = progress or _log_progress
        with self.use(model, dtype=dtype, device=device, offload=offload, progress=progress, cancel=cancel) as loaded:
            retried = False
            while True:
                failure: Optional[Exception] = None
                try:
                    return work(loaded)
                except Exception as exc:  # noqa: BLE001 - cleaned up below, then re-raised
                    failure = exc
                # Out of the except block: nothing but `failure` refers to the failed run's frames any more.
                oom = is_out_of_memory(failure)
                _clear_frames(failure)
                self._recover(loaded)
                if not oom:
                    raise failure
                following = NEXT_POLICY[loaded.policy] if loaded.device.startswith("cuda") else None
                if retried or following is None:
                    raise OutOfGPUMemory(_oom_advice(loaded, retried)) from failure
                message = (f"Out of GPU memory on {loaded.device} with {POLICY_TEXT[loaded.policy]}: retrying once "
                           f"with {POLICY_TEXT[following]} (slower). To avoid it, use a smaller size or fewer "
                           f"frames, or start with {OFFLOAD_ENV}={following}.")
                logger.warning("%s (%s)", message, _one_line(failure))
                failure = None
                report("memory", None, message)
                self._change_policy(loaded, following)
                retried = True

    def holds(self, model: str | Path, device: Optional[str] = None) -> bool:
        """Whether ``model`` is loaded on ``device`` (any dtype) right now."""
        names = self._names_for(model)
        wanted = self._resolve_device(device)
        with self._state:
            return any(e.device == wanted and (e.spec.model_id in names or e.spec.local_path in names)
                       for e in self._cache.values())

    def loaded(self) -> list[LoadedModel]:
        """The models held now, least recently used first."""
        with self._state:
            return list(self._cache.values())

    def release(self, model: Optional[str | Path] = None) -> int:
        """Drop ``model`` (every dtype/device of it; all models when None) and free its memory; return the count.

        A model in use is freed when its last lease ends; callers that hold the pipeline otherwise keep it alive
        until they let go.
        """
        with self._state:
            if model is None:
                keys = list(self._cache)
            else:
                names = self._names_for(model)
                keys = [k for k, v in self._cache.items() if v.spec.model_id in names or v.spec.local_path in names]
            dropped = [self._cache.pop(k) for k in keys]
            idle = [entry for entry in dropped if entry.users == 0]
            for entry in dropped:
                entry.retired = entry.users > 0
        _dispose(idle, "released")
        return len(keys)

    def gpu_lock(self, device: Optional[str] = None) -> threading.Lock:
        """A lock per device for callers that serialise their own work on it (the app uses a ``DevicePool``)."""
        name = self._resolve_device(device)
        with self._state:
            return self._gpu_locks.setdefault(name, threading.Lock())

    # -- internals --------------------------------------------------------------------------------------------

    def _obtain(self, model: Optional[str | Path], dtype: Any, device: Optional[str], offload: Optional[str],
                progress: Optional[ProgressCallback], cancel: Optional[threading.Event], lease: bool) -> LoadedModel:
        from loopui.models.registry import DEFAULT_MODEL_ID

        spec = spec_for(DEFAULT_MODEL_ID if model is None else model)
        progress = progress or _log_progress
        device_name = self._resolve_device(device)
        dtype_name = self._resolve_dtype(dtype, spec, device_name)
        forced = _check_policy(offload) or self.offload or offload_from_env()
        key = (spec.local_path or spec.model_id, dtype_name, device_name)
        hit = self._lookup(key, lease)
        if hit is None:
            with self._device_lock(device_name):
                hit = self._lookup(key, lease)  # another thread may have loaded it while this one waited
                if hit is None:
                    # Free memory before loading the next model, so the policy sees the VRAM the old one held.
                    self._make_room(device_name, spec, forced)
                    loaded = self._load(spec, key, dtype_name, device_name, forced, progress, cancel)
                    with self._state:
                        self._cache[key] = loaded
                        self._load_count += 1
                        if lease:
                            self._lease(loaded)
                    progress("ready", 1.0, loaded.describe())
                    return loaded
        progress("ready", 1.0, f"{spec.model_id} already loaded")
        return hit

    def _lookup(self, key: tuple, lease: bool) -> Optional[LoadedModel]:
        with self._state:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                if lease:
                    self._lease(hit)
            return hit

    def _lease(self, entry: LoadedModel) -> None:
        me = threading.get_ident()
        entry.users += 1
        entry.holders[me] = entry.holders.get(me, 0) + 1

    def _unlease(self, entry: LoadedModel) -> None:
        me = threading.get_ident()
        with self._state:
            entry.users -= 1
            left = entry.holders.get(me, 0) - 1
            if left > 0:
                entry.holders[me] = left
            else:
                entry.holders.pop(me, None)
            dispose = entry.retired and entry.users == 0
            self._state.notify_all()
        if dispose:
            _dispose([entry], "released")

    def _device_lock(self, device: str) -> threading.Lock:
        with self._state:
            return self._device_locks.setdefault(device, threading.Lock())

    def _make_room(self, device: str, spec: ModelSpec, forced: Optional[str]) -> None:
        """Evict what must go before loading ``spec`` on ``device``; wait for models in use to be let go."""
        me = threading.get_ident()
        with self._state:
            while True:
                victims = self._victims(device, spec, forced)
                busy = [v for v in victims if v.users > 0]
                if not busy:
                    for victim in victims:
                        self._cache.pop(victim.key, None)
                    break
                if any(me in v.holders for v in busy):
                    raise RuntimeError(f"cannot load {spec.model_id} on {device} while this thread still uses "
                                       f"{busy[0].spec.model_id} there: leave its use() block first, or raise "
                                       f"max_models")
                logger.info("waiting for the generation on %s to finish before releasing %s", device,
                            busy[0].spec.model_id)
                self._state.wait()
        _dispose(victims, "released to make room:")

    def _victims(self, device: str, spec: ModelSpec, forced: Optional[str]) -> list[LoadedModel]:
        on_device = [entry for entry in self._cache.values() if entry.device == device]  # least recent first
        victims = on_device[:max(0, len(on_device) + 1 - self.max_models)]
        resident = [e for e in on_device if e.policy == "none" and e not in victims]
        if device.startswith("cuda") and resident:
            # A model kept entirely on the GPU stays only if the next one fits fully beside it (then the policy
            # measured below is "none" too); otherwise the two would fight over VRAM.
            fits = forced in (None, "none") and self._fits_beside(spec, device)
            if not fits:
                victims += resident
        return victims

    @staticmethod
    def _fits_beside(spec: ModelSpec, device: str) -> bool:
        import torch

        free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
        return spec.vram_gb * _GIB <= free_bytes * VRAM_HEADROOM

    @staticmethod
    def _names_for(model: str | Path) -> set[str]:
        name = str(model)
        names = {name, resolve_model_id(name)}
        path = Path(name).expanduser()
        if path.exists():
            names.add(str(path.resolve()))
        return names

    def _resolve_device(self, device: Optional[str]) -> str:
        import torch

        wanted = device or self.device
        if wanted is None:
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(wanted)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {wanted!r}") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {wanted!r} requested but CUDA is not available")
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        return str(dev)

    @staticmethod
    def _resolve_dtype(dtype: Any, spec: ModelSpec, device: str) -> str:
        import torch

        if dtype is None:
            # Half precision on CPU is slow and poorly supported; the registry dtype is a CUDA recommendation.
            return spec.cuda_dtype if device.startswith("cuda") else "float32"
        name = str(dtype).replace("torch.", "") if isinstance(dtype, (str, torch.dtype)) else None
        if name in ("bf16", "fp16", "fp32"):
            name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[name]
        if name is None or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype such as bfloat16, float16 or float32; got {dtype!r}")
        return name

    def _load(self, spec: ModelSpec, key: tuple, dtype_name: str, device: str, forced: Optional[str],
              progress: ProgressCallback, cancel: Optional[threading.Event] = None) -> LoadedModel:
        import torch

        start = time.perf_counter()
        _check_cancel(cancel, f"stopped before loading {spec.model_id}")
        on_cuda = device.startswith("cuda")
        if spec.builtin:
            from loopui.models.demo import build_tiny_cogvideox

            progress("loading", None, f"building {spec.model_id} in code")
            pipe = build_tiny_cogvideox()
            if dtype_name != "float32":  # built in float32; casting a no-op only makes diffusers warn
                pipe.to(dtype=getattr(torch, dtype_name))
        else:
            pipe = self._from_pretrained(spec, getattr(torch, dtype_name), progress, cancel)
        if spec.local_path is None:
            # A hub model loads from its cache snapshot folder; record the id so results and sidecars name it.
            pipe.register_to_config(_name_or_path=spec.model_id)

        policy = "none"
        if on_cuda:
            policy = forced or self._auto_policy(spec, device)
            policy = self._place_with_retry(pipe, spec, policy, device, progress)
            # Decoding 49 frames at 720x480 in one go needs more VRAM than denoising; tiles and slices bound it.
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        elif forced not in (None, "none"):
            logger.warning("%s=%s ignored: CPU offload needs a CUDA device", OFFLOAD_ENV, forced)
        seconds = time.perf_counter() - start
        logger.info("loaded %s on %s (%s, policy %s) in %.1f s", spec.model_id, device, dtype_name, policy, seconds)
        return LoadedModel(pipe=pipe, spec=spec, device=device, dtype=dtype_name, policy=policy,
                           load_seconds=seconds, key=key)

    def _place_with_retry(self, pipe: Any, spec: ModelSpec, policy: str, device: str,
                          progress: ProgressCallback) -> str:
        """Place ``pipe`` with ``policy``; out of memory, clean up and try the next policy once."""
        for attempt in (1, 2):
            progress("moving to GPU", None, f"placing {spec.model_id} on {device} (policy: {policy})")
            reason = None
            try:
                self._place(pipe, policy, device)
                return policy
            except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised below
                if not is_out_of_memory(exc):
                    raise
                reason = _one_line(exc)
            # Out of the except block, so the half-moved tensors the traceback pinned can really be freed.
            self._unplace(pipe)
            _free_memory()
            following = NEXT_POLICY[policy]
            if attempt == 2 or following is None:
                raise ModelLoadError(f"out of GPU memory placing {spec.model_id} on {device} (policy {policy}): "
                                     f"{reason} -- free the GPU (another program may be using it), or set "
                                     f"{OFFLOAD_ENV}=sequential")
            message = (f"Out of GPU memory placing {spec.model_id} on {device} with {POLICY_TEXT[policy]}: trying "
                       f"{POLICY_TEXT[following]}.")
            logger.warning("%s (%s)", message, reason)
            progress("memory", None, message)
            policy = following
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _place(pipe: Any, policy: str, device: str) -> None:
        if policy == "none":
            pipe.to(device)
        elif policy == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)

    @staticmethod
    def _unplace(pipe: Any) -> None:
        """Best effort after a failed placement: no hooks, every component back on the CPU."""
        try:
            pipe.remove_all_hooks()
            pipe.to("cpu")
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            logger.warning("could not move the pipeline back to the CPU: %s", _one_line(exc))

    def _change_policy(self, loaded: LoadedModel, policy: str) -> None:
        self._place(loaded.pipe, policy, loaded.device)
        loaded.policy = policy

    @staticmethod
    def _recover(loaded: LoadedModel) -> None:
        """After a failed run: offload hooks back to their idle state (components off the GPU), cache emptied."""
        free_hooks = getattr(loaded.pipe, "maybe_free_model_hooks", None)
        if callable(free_hooks):
            try:
                free_hooks()
            except (RuntimeError, ValueError) as exc:
                logger.warning("could not reset the offload hooks after a failure: %s", _one_line(exc))
        _free_memory()

    def _from_pretrained(self, spec: ModelSpec, torch_dtype: Any, progress: ProgressCallback,
                         cancel: Optional[threading.Event] = None) -> Any:
        import diffusers

        from loopui.models.download import DownloadCancelled, NotEnoughDisk, format_bytes, watched_download

        cls = getattr(diffusers, spec.pipeline_class)
        folder: str | None = spec.local_path

        def on_bytes(done: int, total: int) -> None:
            if total:
                progress("downloading", done / total, f"downloading {spec.model_id}: {format_bytes(done)} of "
                                                      f"{format_bytes(total)} ({100 * done / total:.0f} %)")
            else:
                progress("downloading", 1.0, f"{spec.model_id}: every file is already in the cache")

        try:
            if folder is None:
                progress("downloading", None, f"fetching {spec.model_id} from the Hugging Face Hub "
                                              f"(the first time this downloads the weights; later runs use the cache)")
                # diffusers/huggingface_hub do the download and the caching; only the files the class needs.
                with watched_download(on_bytes, cancel, self.cache_dir):
                    folder = cls.download(spec.model_id, local_files_only=self.local_files_only,
                                          cache_dir=self.cache_dir)
            _check_cancel(cancel, f"stopped before loading {spec.model_id}")
            progress("loading", None, f"loading {spec.model_id} weights")
            # use_safetensors left at diffusers' default: safetensors whenever the folder has them; remote code is
            # never enabled (no custom_pipeline, no trust_remote_code).
            return cls.from_pretrained(folder, dtype=torch_dtype)
        except DownloadCancelled:
            raise LoadCancelled(f"stopped while downloading {spec.model_id}; what was fetched stays in the cache "
                                f"and the next load resumes it") from None
        except NotEnoughDisk as exc:
            raise ModelLoadError(str(exc)) from None
        except _load_error_types() as exc:
            raise ModelLoadError(self._load_message(spec, exc)) from exc

    @staticmethod
    def _load_message(spec: ModelSpec, exc: BaseException) -> str:
        reason = _one_line(exc)
        if spec.local_path is not None:
            return (f"cannot load model folder {spec.local_path}: {reason} -- check it is a complete diffusers "
                    f"download (model_index.json plus each component's config and weights)")
        if isinstance(exc, MemoryError) or "out of memory" in reason.lower():
            return f"not enough memory to load {spec.model_id}: {reason}"
        if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:  # ENOSPC mid-download
            return f"the disk filled up while downloading {spec.model_id}: {reason} -- free some space and retry"
        return (f"cannot download or load {spec.model_id}: {reason} -- if this machine has no network, download it "
                f"elsewhere with `hf download {spec.model_id} --local-dir DIR` and pass that folder as the model")

    @staticmethod
    def _auto_policy(spec: ModelSpec, device: str) -> str:
        import torch

        free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
        policy = choose_memory_policy(free_bytes, int(spec.vram_gb * _GIB), True,
                                      int(spec.offload_vram_gb * _GIB) if spec.offload_vram_gb else None)
        logger.info("%.1f GiB free on %s, %s needs ~%.0f GiB: memory policy %s", free_bytes / _GIB, device,
                    spec.model_id, spec.vram_gb, policy)
        return policy


def _check_cancel(cancel: Optional[threading.Event], message: str) -> None:
    if cancel is not None and cancel.is_set():
        raise LoadCancelled(message)


def _oom_advice(loaded: LoadedModel, retried: bool) -> str:
    tried = f" even after retrying with {POLICY_TEXT[loaded.policy]}" if retried else \
        f" with {POLICY_TEXT[loaded.policy]}"
    return (f"out of GPU memory on {loaded.device}{tried}: use a smaller size or fewer frames (or the window "
            f"mode for long loops), or free the GPU from other programs")


def _clear_frames(exc: Optional[BaseException]) -> None:
    """Drop the locals of every frame in ``exc``'s tracebacks (chained ones too): they hold the failed run's tensors.

    The traceback itself stays printable (file names and lines are kept).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _dispose(entries: list[LoadedModel], verb: str) -> None:
    """Drop the manager's references to ``entries`` (emptying the list) and return their memory.

    A pipeline something else still refers to (a stray reference would keep its VRAM and make the next model's
    memory policy wrong) is moved to the CPU as well.
    """
    if not entries:
        return
    survivors = []
    while entries:
        entry = entries.pop()
        pipe = entry.pipe
        if entry.policy != "none" and hasattr(pipe, "remove_all_hooks"):
            # accelerate's offload hooks keep references to the modules; drop them so memory can be freed.
            pipe.remove_all_hooks()
        logger.info("%s %s", verb, entry.spec.model_id)
        if entry.device.startswith("cuda") and entry.policy != "sequential":
            survivors.append((weakref.ref(pipe), entry.spec.model_id))
        del entry, pipe
    _free_memory()
    stray = [(ref(), name) for ref, name in survivors if ref() is not None]
    for pipe, name in stray:
        logger.warning("%s is still referenced after its release: moving it to the CPU to free its GPU memory", name)
        try:
            pipe.to("cpu")
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            logger.warning("could not move %s to the CPU: %s", name, _one_line(exc))
    if stray:
        del stray, pipe
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
