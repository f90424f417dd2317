"""Load diffusers pipelines lazily, cache them, and pick how they use GPU memory.

Nothing happens at construction: the first ``get()`` downloads (through diffusers / huggingface_hub), loads and
places the model; later calls with the same (model, dtype, device) return the cached one. By default only one model
is kept, so switching models frees the previous one first. When CUDA is present the memory policy (everything on the
GPU, model CPU offload or sequential CPU offload) is chosen from free VRAM against the registry's estimate, the
FramePack way; ``LOOPUI_OFFLOAD=none|model|sequential`` (or the ``offload`` argument) forces one.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from loopui.models.registry import ModelSpec, resolve_model_id, spec_for

logger = logging.getLogger(__name__)

MEMORY_POLICIES = ("none", "model", "sequential")
OFFLOAD_ENV = "LOOPUI_OFFLOAD"
# Plan against this share of free VRAM: the CUDA context, the allocator's fragmentation and other processes
# need the rest.
VRAM_HEADROOM = 0.9
# Without a per-model figure, model offload peaks at about the biggest component (T5 or transformer) plus
# activations: roughly 60% of keeping everything resident.
MODEL_OFFLOAD_SHARE = 0.6
_GIB = 2**30

ProgressCallback = Callable[[str, Optional[float], str], None]


class ModelLoadError(RuntimeError):
    """A model could not be downloaded or loaded; the message names the model and what to do."""


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

    ``max_models`` bounds how many stay loaded (least recently used goes first). ``device`` and ``offload`` fix the
    device / memory policy for every load (default: CUDA when present, policy from free VRAM or ``LOOPUI_OFFLOAD``).
    ``local_files_only`` never contacts the hub (only already downloaded models load); ``cache_dir`` overrides the
    Hugging Face cache folder.
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
        self._load_lock = threading.Lock()  # one load at a time: two threads asking for a model load it once
        self._state_lock = threading.Lock()  # guards _cache, _gpu_locks and the counter; never held while loading
        self._gpu_locks: dict[str, threading.Lock] = {}
        self._load_count = 0

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def load_count(self) -> int:
        """How many loads this manager has performed (cache hits do not count)."""
        with self._state_lock:
            return self._load_count

    def get(self, model: Optional[str | Path] = None, dtype: Any = None, device: Optional[str] = None,
            offload: Optional[str] = None, progress: Optional[ProgressCallback] = None) -> LoadedModel:
        """Return the loaded ``model`` (hub id, ``demo`` or folder; default ``DEFAULT_MODEL_ID``), loading it once.

        ``progress(stage, fraction, message)`` hears "downloading", "loading", "moving to GPU" and "ready".
        Raises ``ValueError`` for an unknown model or bad argument, ``ModelLoadError`` when loading fails.
        """
        from loopui.models.registry import DEFAULT_MODEL_ID

        spec = spec_for(DEFAULT_MODEL_ID if model is None else model)
        progress = progress or _log_progress
        device_name = self._resolve_device(device)
        dtype_name = self._resolve_dtype(dtype, spec, device_name)
        forced = _check_policy(offload) or self.offload or offload_from_env()
        key = (spec.local_path or spec.model_id, dtype_name, device_name)
        with self._load_lock:
            with self._state_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                progress("ready", 1.0, f"{spec.model_id} already loaded")
                return hit
            # Free memory before loading the next model, so the policy sees the VRAM the old one held.
            self._evict(room_for=1)
            loaded = self._load(spec, key, dtype_name, device_name, forced, progress)
            with self._state_lock:
                self._cache[key] = loaded
                self._load_count += 1
        progress("ready", 1.0, loaded.describe())
        return loaded

    def loaded(self) -> list[LoadedModel]:
        """The models held now, least recently used first."""
        with self._state_lock:
            return list(self._cache.values())

    def release(self, model: Optional[str | Path] = None) -> int:
        """Drop ``model`` (every dtype/device of it; all models when None) and free its memory; return the count.

        Callers that still hold the pipeline keep it alive until they let go (a running generation finishes).
        """
        with self._state_lock:
            if model is None:
                keys = list(self._cache)
            else:
                names = self._names_for(model)
                keys = [k for k, v in self._cache.items() if v.spec.model_id in names or v.spec.local_path in names]
            dropped = [self._cache.pop(k) for k in keys]
        _dispose(dropped, "released")
        return len(keys)

    def gpu_lock(self, device: Optional[str] = None) -> threading.Lock:
        """The lock that serialises generation on ``device`` (default: this manager's device): one job per GPU."""
        name = self._resolve_device(device)
        with self._state_lock:
            return self._gpu_locks.setdefault(name, threading.Lock())

    # -- internals --------------------------------------------------------------------------------------------

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

    def _evict(self, room_for: int) -> None:
        with self._state_lock:
            excess = len(self._cache) + room_for - self.max_models
            victims = [self._cache.popitem(last=False)[1] for _ in range(max(0, excess))]
        _dispose(victims, "released to make room:")

    def _load(self, spec: ModelSpec, key: tuple, dtype_name: str, device: str, forced: Optional[str],
              progress: ProgressCallback) -> LoadedModel:
        import torch

        start = time.perf_counter()
        on_cuda = device.startswith("cuda")
        if spec.builtin:
            from loopui.models.demo import build_tiny_cogvideox

            progress("loading", None, f"building {spec.model_id} in code")
            pipe = build_tiny_cogvideox()
            if dtype_name != "float32":  # built in float32; casting a no-op only makes diffusers warn
                pipe.to(dtype=getattr(torch, dtype_name))
        else:
            pipe = self._from_pretrained(spec, getattr(torch, dtype_name), progress)
        if spec.local_path is None:
            # A hub model loads from its cache snapshot folder; record the id so results and sidecars name it.
            pipe.register_to_config(_name_or_path=spec.model_id)

        policy = "none"
        if on_cuda:
            policy = forced or self._auto_policy(spec, device)
            progress("moving to GPU", None, f"placing {spec.model_id} on {device} (policy: {policy})")
            try:
                if policy == "none":
                    pipe.to(device)
                elif policy == "model":
                    pipe.enable_model_cpu_offload(device=device)
                else:
                    pipe.enable_sequential_cpu_offload(device=device)
            except torch.cuda.OutOfMemoryError as exc:
                del pipe
                _free_memory()
                raise ModelLoadError(f"out of GPU memory placing {spec.model_id} on {device} (policy {policy}): "
                                     f"set {OFFLOAD_ENV}=sequential or free the GPU") from exc
            # Decoding 49 frames at 720x480 in one go needs more VRAM than denoising; tiles and slices bound it.
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        elif forced not in (None, "none"):
            logger.warning("%s=%s ignored: CPU offload needs a CUDA device", OFFLOAD_ENV, forced)
        seconds = time.perf_counter() - start
        logger.info("loaded %s on %s (%s, policy %s) in %.1f s", spec.model_id, device, dtype_name, policy, seconds)
        return LoadedModel(pipe=pipe, spec=spec, device=device, dtype=dtype_name, policy=policy,
                           load_seconds=seconds, key=key)

    def _from_pretrained(self, spec: ModelSpec, torch_dtype: Any, progress: ProgressCallback) -> Any:
        import diffusers

        cls = getattr(diffusers, spec.pipeline_class)
        folder: str | None = spec.local_path
        try:
            if folder is None:
                progress("downloading", None, f"fetching {spec.model_id} from the Hugging Face Hub "
                                              f"(the first time this downloads the weights; later runs use the cache)")
                # diffusers/huggingface_hub do the download and the caching; only the files the class needs.
                folder = cls.download(spec.model_id, local_files_only=self.local_files_only,
                                      cache_dir=self.cache_dir)
            progress("loading", None, f"loading {spec.model_id} weights")
            # use_safetensors left at diffusers' default: safetensors whenever the folder has them; remote code is
            # never enabled (no custom_pipeline, no trust_remote_code).
            return cls.from_pretrained(folder, dtype=torch_dtype)
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


def _dispose(entries: list[LoadedModel], verb: str) -> None:
    """Drop the manager's references to ``entries`` (emptying the list) and return their memory."""
    if not entries:
        return
    while entries:
        entry = entries.pop()
        if entry.policy != "none" and hasattr(entry.pipe, "remove_all_hooks"):
            # accelerate's offload hooks keep references to the modules; drop them so memory can be freed.
            entry.pipe.remove_all_hooks()
        logger.info("%s %s", verb, entry.spec.model_id)
        del entry
    _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
