"""How a loaded pipeline uses GPU memory: the memory policy, placing a pipeline, noticing running out, freeing.

A policy is ``"none"`` (everything on the GPU), ``"model"`` (model CPU offload: one component on the GPU at a time)
or ``"sequential"`` (sequential CPU offload: layer by layer). It is chosen per device from free VRAM against the
registry's estimate, the FramePack way; ``LOOPUI_OFFLOAD=none|model|sequential`` forces one. Out of memory, the
next policy in ``NEXT_POLICY`` is the one to try. Freeing always happens outside an ``except`` block: there the
traceback would still pin the failed run's tensors.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Optional

from loopui.messages import REASON_LIMIT, one_line
from loopui.models.loader import LoadProgress, ModelLoadError
from loopui.models.lora import unload_loras
from loopui.models.registry import ModelSpec

if TYPE_CHECKING:
    from loopui.models.loader import LoadedModel

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
    return check_policy(os.environ.get(OFFLOAD_ENV), source=OFFLOAD_ENV)


def check_policy(value: Optional[str], source: str = "offload") -> Optional[str]:
    """``value`` as a policy name (None for unset, empty or ``auto``); ``ValueError`` naming ``source`` otherwise."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    policy = value.strip().lower()
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"{source} must be one of auto, {', '.join(MEMORY_POLICIES)}; got {value!r}")
    return policy


# -- placement ----------------------------------------------------------------------------------------------------

def auto_policy(spec: ModelSpec, device: str) -> str:
    """The policy for ``spec`` on CUDA ``device`` from the VRAM free there now."""
    import torch

    free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
    policy = choose_memory_policy(free_bytes, int(spec.vram_gb * _GIB), True,
                                  int(spec.offload_vram_gb * _GIB) if spec.offload_vram_gb else None)
    logger.info("%.1f GiB free on %s, %s needs ~%.0f GiB: memory policy %s", free_bytes / _GIB, device,
                spec.model_id, spec.vram_gb, policy)
    return policy


def fits_beside(spec: ModelSpec, device: str) -> bool:
    """Whether ``spec`` fits entirely on CUDA ``device`` beside what is there now."""
    import torch

    free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
    return spec.vram_gb * _GIB <= free_bytes * VRAM_HEADROOM


def place_on_device(pipe: Any, spec: ModelSpec, device: str, forced: Optional[str],
                    progress: LoadProgress) -> str:
    """Put a freshly loaded ``pipe`` on ``device`` (policy ``forced``, else chosen from free VRAM); return the
    policy it got. On the CPU everything stays put (``"none"``): offload needs CUDA."""
    if not device.startswith("cuda"):
        if forced not in (None, "none"):
            logger.warning("%s=%s ignored: CPU offload needs a CUDA device", OFFLOAD_ENV, forced)
        return "none"
    policy = place_with_retry(pipe, spec, forced or auto_policy(spec, device), device, progress)
    # Decoding 49 frames at 720x480 in one go needs more VRAM than denoising; tiles and slices bound it.
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    return policy


def place_with_retry(pipe: Any, spec: ModelSpec, policy: str, device: str, progress: LoadProgress) -> str:
    """Place ``pipe`` with ``policy``; out of memory, clean up and try the next policy once (``ModelLoadError`` when
    that fails too)."""
    for attempt in (1, 2):
        progress("moving to GPU", None, f"placing {spec.model_id} on {device} (policy: {policy})")
        reason = None
        try:
            place(pipe, policy, device)
            return policy
        except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised below
            if not is_out_of_memory(exc):
                raise
            reason = one_line(exc, REASON_LIMIT)
        # Out of the except block, so the half-moved tensors the traceback pinned can really be freed.
        unplace(pipe)
        free_memory()
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


def place(pipe: Any, policy: str, device: str) -> None:
    """Apply ``policy`` to ``pipe`` on ``device`` through diffusers' own offload methods."""
    if policy == "none":
        pipe.to(device)
    elif policy == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def unplace(pipe: Any) -> None:
    """Best effort after a failed placement: no hooks, every component back on the CPU."""
    try:
        pipe.remove_all_hooks()
        pipe.to("cpu")
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        logger.warning("could not move the pipeline back to the CPU: %s", one_line(exc, REASON_LIMIT))


# -- after a failure ----------------------------------------------------------------------------------------------

def recover(loaded: LoadedModel) -> None:
    """After a failed run: offload hooks back to their idle state (components off the GPU), cache emptied."""
    free_hooks = getattr(loaded.pipe, "maybe_free_model_hooks", None)
    if callable(free_hooks):
        try:
            free_hooks()
        except (RuntimeError, ValueError) as exc:
            logger.warning("could not reset the offload hooks after a failure: %s", one_line(exc, REASON_LIMIT))
    free_memory()


def clear_frames(exc: Optional[BaseException]) -> None:
    """Drop the locals of every frame in ``exc``'s tracebacks (chained ones too): they hold the failed run's tensors.

    The traceback itself stays printable (file names and lines are kept).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def oom_advice(loaded: LoadedModel, retried: bool) -> str:
    """What to change after running out of GPU memory with ``loaded``'s policy (and the retry, when ``retried``)."""
    tried = f" even after retrying with {POLICY_TEXT[loaded.policy]}" if retried else \
        f" with {POLICY_TEXT[loaded.policy]}"
    return (f"out of GPU memory on {loaded.device}{tried}: use a smaller size or fewer frames (or the window "
            f"mode for long loops), or free the GPU from other programs")


# -- freeing ------------------------------------------------------------------------------------------------------

def dispose(entries: list[LoadedModel], verb: str) -> None:
    """Drop the references to ``entries`` (emptying the list) and return their memory; ``verb`` starts the log line.

    A pipeline something else still refers to (a stray reference would keep its VRAM and make the next model's
    memory policy wrong) is moved to the CPU as well.
    """
    if not entries:
        return
    survivors = []
    while entries:
        entry = entries.pop()
        pipe = entry.pipe
        # Its LoRAs go with it (fused weights unfolded): a stray reference sees the stock model.
        unload_loras(pipe)
        if entry.policy != "none" and hasattr(pipe, "remove_all_hooks"):
            # accelerate's offload hooks keep references to the modules; drop them so memory can be freed.
            pipe.remove_all_hooks()
        logger.info("%s %s", verb, entry.spec.model_id)
        if entry.device.startswith("cuda") and entry.policy != "sequential":
            survivors.append((weakref.ref(pipe), entry.spec.model_id))
        del entry, pipe
    free_memory()
    stray = [(ref(), name) for ref, name in survivors if ref() is not None]
    for pipe, name in stray:
        logger.warning("%s is still referenced after its release: moving it to the CPU to free its GPU memory", name)
        try:
            pipe.to("cpu")
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            logger.warning("could not move %s to the CPU: %s", name, one_line(exc, REASON_LIMIT))
    if stray:
        del stray, pipe
        free_memory()


def free_memory() -> None:
    """Collect garbage and empty the CUDA cache (when torch is imported and CUDA is there)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
