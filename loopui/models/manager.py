"""Keep loaded diffusers pipelines: a lazy, thread-safe cache with leases, and ``run()`` for generations.

Nothing happens at construction: the first ``get()`` / ``use()`` loads the model (``loopui.models.loader``: download,
build) and places it (``loopui.models.memory``: the memory policy); later calls with the same (model, dtype, device)
return the cached one. By default one model is kept per device, so switching models frees the previous one first --
but never while a generation still uses it: ``use()`` leases a model, and a load that needs its room waits until the
lease ends. ``LOOPUI_OFFLOAD=none|model|group|sequential`` (or the ``offload`` argument) forces a memory policy.
``LOOPUI_QUANTIZE=none|fp8|int8`` (or the ``quantize`` argument) quantizes the denoisers after the build and before
placement (``loopui.models.quantize``); a model in another quantization is another load.

``run()`` is how a generation should use a model: it leases it, and after any failure resets the offload hooks
and empties the CUDA cache outside the ``except`` block (where the traceback would still pin the failed run's
tensors); a CUDA out-of-memory error is retried once with the next policy (none -> model -> group -> sequential).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from loopui.messages import REASON_LIMIT, one_line
from loopui.models import memory
from loopui.models.loader import LoadedModel, LoadProgress, PipelineLoader, log_progress
from loopui.models.lora import FUSE_POLICIES, set_fuse_policy
from loopui.models.quantize import check_mode, quantize_pipeline, resolve_quantize
from loopui.models.registry import DEFAULT_MODEL_ID, ModelSpec, resolve_model_id, spec_for

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelManager:
    """Lazy, thread-safe cache of loaded pipelines keyed by (model, dtype, device, quantization).

    ``max_models`` bounds how many stay loaded on each device (least recently used goes first, but never one in
    use). ``device`` and ``offload`` fix the device / memory policy for every load (default: CUDA when present,
    policy from free VRAM or ``LOOPUI_OFFLOAD``). ``local_files_only`` never contacts the hub (only already
    downloaded models load); ``cache_dir`` overrides the Hugging Face cache folder. ``loader`` builds the pipelines
    (default: a ``PipelineLoader`` with those two settings; pass your own to serve weights from elsewhere).
    ``lora_fuse`` is how each pipeline's LoRA sets are fused (``loopui.models.lora``): ``auto`` (once a set serves
    a second request in a row), ``always``, ``never`` or ``single`` (a process that serves one set, the CLI: folded
    at once, no copy of the original weights kept). A model's LoRAs are unloaded with it. ``quantize`` (``none``,
    ``fp8``, ``int8``; default ``LOOPUI_QUANTIZE``, else none) is the denoisers' weights for every load that does
    not name its own.
    """

    def __init__(self, max_models: int = 1, device: Optional[str] = None, offload: Optional[str] = None,
                 local_files_only: bool = False, cache_dir: Optional[str | Path] = None,
                 loader: Optional[PipelineLoader] = None, lora_fuse: str = "auto",
                 quantize: Optional[str] = None) -> None:
        if not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models must be an integer >= 1, got {max_models!r}")
        if lora_fuse not in FUSE_POLICIES:
            raise ValueError(f"lora_fuse must be one of {', '.join(FUSE_POLICIES)}; got {lora_fuse!r}")
        self.lora_fuse = lora_fuse
        self.max_models = max_models
        self.device = device
        if loader is not None and (local_files_only or cache_dir is not None):
            raise ValueError("loader: pass local_files_only and cache_dir to the loader, not to the manager")
        self.offload = memory.check_policy(offload)
        self.quantize = None if quantize is None else check_mode(quantize)
        self.loader = loader or PipelineLoader(local_files_only=local_files_only, cache_dir=cache_dir)
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        # Guards _cache, the leases and the counters; waited on by a load that needs an in-use model's room.
        # Never held while loading.
        self._state = threading.Condition()
        self._device_locks: dict[str, threading.Lock] = {}  # one load at a time per device
        self._load_count = 0

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def load_count(self) -> int:
        """How many loads this manager has performed (cache hits do not count)."""
        with self._state:
            return self._load_count

    def get(self, model: Optional[str | Path] = None, dtype: Any = None, device: Optional[str] = None,
            offload: Optional[str] = None, progress: Optional[LoadProgress] = None,
            cancel: Optional[threading.Event] = None, quantize: Optional[str] = None) -> LoadedModel:
        """Return the loaded ``model`` (hub id, ``demo`` or folder; default ``DEFAULT_MODEL_ID``), loading it once.

        ``progress(stage, fraction, message)`` hears "downloading" (with the fraction of bytes), "loading",
        "moving to GPU", "memory" (a policy change after running out of GPU memory) and "ready". A set ``cancel``
        stops a download at its next chunk (``LoadCancelled``). Raises ``ValueError`` for an unknown model or bad
        argument, ``ModelLoadError`` when loading fails. The model is not leased: another load on the same device
        may release it -- use :meth:`use` or :meth:`run` while generating. ``quantize`` (``none``, ``fp8``,
        ``int8``; default: the manager's, else ``LOOPUI_QUANTIZE``, else none) is checked against the device
        before anything loads (``ValueError`` naming ``quantize``).
        """
        return self._obtain(model, dtype, device, offload, progress, cancel, lease=False, quantize=quantize)

    @contextmanager
    def use(self, model: Optional[str | Path] = None, dtype: Any = None, device: Optional[str] = None,
            offload: Optional[str] = None, progress: Optional[LoadProgress] = None,
            cancel: Optional[threading.Event] = None, quantize: Optional[str] = None) -> Iterator[LoadedModel]:
        """Like :meth:`get`, but the model is leased for the block: no other load evicts it meanwhile (a load that
        needs its room waits for the block to end)."""
        loaded = self._obtain(model, dtype, device, offload, progress, cancel, lease=True, quantize=quantize)
        try:
            yield loaded
        finally:
            self._unlease(loaded)

    def run(self, model: Optional[str | Path], work: Callable[[LoadedModel], T], dtype: Any = None,
            device: Optional[str] = None, offload: Optional[str] = None,
            progress: Optional[LoadProgress] = None, cancel: Optional[threading.Event] = None,
            quantize: Optional[str] = None) -> T:
        """``work(loaded)`` with ``model`` leased (see :meth:`use`), cleaning up after failures.

        After any exception the failed frames' locals are cleared, the pipeline's offload hooks are reset
        (``maybe_free_model_hooks``: under model offload this moves a component stranded on the GPU back) and the
        CUDA cache is emptied -- outside the ``except`` block, so the memory really comes back. A CUDA
        out-of-memory error is then retried once with the next memory policy (none -> model -> group -> sequential, told
        through ``progress("memory", ...)``); the model keeps that policy. When that fails too, or there is no next
        policy, :class:`OutOfGPUMemory` says what to change.
        """
        report = progress or log_progress
        with self.use(model, dtype=dtype, device=device, offload=offload, progress=progress, cancel=cancel,
                      quantize=quantize) as loaded:
            retried = False
            while True:
                failure: Optional[Exception] = None
                try:
                    return work(loaded)
                except Exception as exc:  # noqa: BLE001 - cleaned up below, then re-raised
                    failure = exc
                # Out of the except block: nothing but `failure` refers to the failed run's frames any more.
                oom = memory.is_out_of_memory(failure)
                memory.clear_frames(failure)
                memory.recover(loaded)
                if not oom:
                    raise failure
                following = memory.NEXT_POLICY[loaded.policy] if loaded.device.startswith("cuda") else None
                if retried or following is None:
                    raise memory.OutOfGPUMemory(memory.oom_advice(loaded, retried)) from failure
                text = memory.POLICY_TEXT
                message = (f"Out of GPU memory on {loaded.device} with {text[loaded.policy]}: retrying once "
                           f"with {text[following]} (slower). To avoid it, use a smaller size or fewer "
                           f"frames, or start with {memory.OFFLOAD_ENV}={following}.")
                logger.warning("%s (%s)", message, one_line(failure, REASON_LIMIT))
                failure = None
                report("memory", None, message)
                memory.place(loaded.pipe, following, loaded.device)
                loaded.policy = following
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
        memory.dispose(idle, "released")
        return len(keys)

    # -- internals --------------------------------------------------------------------------------------------

    def _obtain(self, model: Optional[str | Path], dtype: Any, device: Optional[str], offload: Optional[str],
                progress: Optional[LoadProgress], cancel: Optional[threading.Event], lease: bool,
                quantize: Optional[str] = None) -> LoadedModel:
        spec = spec_for(DEFAULT_MODEL_ID if model is None else model)
        progress = progress or log_progress
        device_name = self._resolve_device(device)
        dtype_name = self._resolve_dtype(dtype, spec, device_name)
        forced = memory.check_policy(offload) or self.offload or memory.offload_from_env()
        quant = resolve_quantize(quantize if quantize is not None else self.quantize, device_name)
        key = (spec.local_path or spec.model_id, dtype_name, device_name, quant)
        hit = self._lookup(key, lease)
        if hit is None:
            with self._device_lock(device_name):
                hit = self._lookup(key, lease)  # another thread may have loaded it while this one waited
                if hit is None:
                    # Free memory before loading the next model, so the policy sees the VRAM the old one held.
                    self._make_room(device_name, spec, forced)
                    loaded = self._load(spec, key, dtype_name, device_name, forced, progress, cancel, quant)
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
            memory.dispose([entry], "released")

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
        memory.dispose(victims, "released to make room:")

    def _victims(self, device: str, spec: ModelSpec, forced: Optional[str]) -> list[LoadedModel]:
        on_device = [entry for entry in self._cache.values() if entry.device == device]  # least recent first
        victims = on_device[:max(0, len(on_device) + 1 - self.max_models)]
        resident = [e for e in on_device if e.policy == "none" and e not in victims]
        if device.startswith("cuda") and resident:
            # A model kept entirely on the GPU stays only if the next one fits fully beside it (then the policy
            # measured below is "none" too); otherwise the two would fight over VRAM.
            fits = forced in (None, "none") and memory.fits_beside(spec, device)
            if not fits:
                victims += resident
        return victims

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
              progress: LoadProgress, cancel: Optional[threading.Event] = None, quant: str = "none") -> LoadedModel:
        start = time.perf_counter()
        pipe = self.loader.load(spec, dtype_name, progress, cancel)
        if quant != "none":
            # Still on the CPU: a large model never sits on the GPU unquantized.
            progress("loading", None, f"quantizing {spec.model_id}'s transformer to {quant}")
            quantize_pipeline(pipe, quant)
        policy = memory.place_on_device(pipe, spec, device, forced, progress)
        set_fuse_policy(pipe, self.lora_fuse)
        seconds = time.perf_counter() - start
        logger.info("loaded %s on %s (%s, quantize %s, policy %s) in %.1f s", spec.model_id, device, dtype_name, quant,
                    policy, seconds)
        return LoadedModel(pipe=pipe, spec=spec, device=device, dtype=dtype_name, policy=policy,
                           load_seconds=seconds, key=key, quantize=quant)
