"""How a loaded pipeline uses GPU memory: the memory policy, placing a pipeline, noticing running out, freeing.

A policy is ``"none"`` (everything on the GPU), ``"model"`` (model CPU offload: one component on the GPU at a time),
``"group"`` (diffusers' group offload: block by block, the next block copied on a CUDA stream while the current
one computes) or ``"sequential"`` (sequential CPU offload: layer by layer). It is chosen per device from free VRAM
against the registry's estimate, corrected by what the loaded pipeline's weights really take (quantized denoisers
are smaller), the FramePack way; ``LOOPUI_OFFLOAD=none|model|group|sequential`` forces one. Out of memory, the next
policy in ``NEXT_POLICY`` is the one to try. Freeing always happens outside an ``except`` block: there the
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

MEMORY_POLICIES = ("none", "model", "group", "sequential")
NEXT_POLICY: dict[str, Optional[str]] = {"none": "model", "model": "group", "group": "sequential",
                                         "sequential": None}
POLICY_TEXT = {"none": "everything on the GPU", "model": "model CPU offload", "group": "group offload",
               "sequential": "sequential CPU offload"}
OFFLOAD_ENV = "LOOPUI_OFFLOAD"
# Plan against this share of free VRAM: the CUDA context, the allocator's fragmentation and other processes
# need the rest.
VRAM_HEADROOM = 0.9
# Without a per-model figure, model offload peaks at about the biggest component (T5 or transformer) plus
# activations: roughly 60% of keeping everything resident.
MODEL_OFFLOAD_SHARE = 0.6
# Group offload keeps a denoiser's non-block layers, the block computing and the block being copied in.
GROUP_BLOCKS_RESIDENT = 2
# diffusers' hook names of group offloading (diffusers.hooks.group_offloading: _GROUP_OFFLOADING,
# _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING); 0.42.1 has no public way to remove them.
GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
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
                         offload_need_bytes: Optional[int] = None, group_need_bytes: Optional[int] = None) -> str:
    """Pick ``"none"`` (all on the GPU), ``"model"``, ``"group"`` or ``"sequential"`` offload from free VRAM.

    ``need_bytes`` is what the model needs fully resident; ``offload_need_bytes`` its peak under model offload
    (default: ``MODEL_OFFLOAD_SHARE`` of ``need_bytes``); ``group_need_bytes`` its peak under group offload
    (:func:`memory_needs`; None = no estimate: group offload is skipped). Without CUDA nothing can be offloaded:
    ``"none"``.
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
    if group_need_bytes is not None and group_need_bytes <= budget:
        return "group"
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

def auto_policy(spec: ModelSpec, device: str, pipe: Any = None) -> str:
    """The policy for ``spec`` on CUDA ``device`` from the VRAM free there now (``pipe``: the loaded pipeline, whose
    weights correct the registry's estimate and give group offload's)."""
    import torch

    free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
    if pipe is None:
        need = int(spec.vram_gb * _GIB)
        offload_need = int(spec.offload_vram_gb * _GIB) if spec.offload_vram_gb else None
        group_need = None
    else:
        need, offload_need, group_need = memory_needs(spec, pipe)
    policy = choose_memory_policy(free_bytes, need, True, offload_need, group_need)
    logger.info("%.1f GiB free on %s, %s needs ~%.1f GiB: memory policy %s", free_bytes / _GIB, device,
                spec.model_id, need / _GIB, policy)
    return policy


def memory_needs(spec: ModelSpec, pipe: Any) -> tuple[int, int, int]:
    """(all resident, model offload peak, group offload peak) in bytes for ``spec``'s loaded ``pipe``.

    The registry's figures (``vram_gb``, ``offload_vram_gb``) are for the stock weights; what quantization saved on
    the denoisers (measured: dense size minus the bytes held now) comes off both. The activations are what the
    model-offload figure leaves beside the biggest stock component. Group offload streams every component by its
    block lists (:func:`block_lists`): a component holds its layers outside those lists plus
    ``GROUP_BLOCKS_RESIDENT`` of its biggest blocks (the one computing, the one streaming in). Its peak is the
    larger of a denoiser's share plus the activations, and any other component's share (the text encoder's: its
    own activations are small).
    """
    from loopui.models.quantize import DENOISERS, module_bytes

    modules = {name: m for name, m in _components(pipe)}
    held = {name: module_bytes(m) for name, m in modules.items()}
    dense = {name: module_bytes(m, dense=True) for name, m in modules.items()}
    saved = sum(dense[n] - held[n] for n in modules)
    need = max(int(spec.vram_gb * _GIB) - saved, 0)
    offload_figure = int((spec.offload_vram_gb or spec.vram_gb * MODEL_OFFLOAD_SHARE) * _GIB)
    activations = max(offload_figure - max(dense.values(), default=0), 0)
    offload_need = activations + max(held.values(), default=0)
    group_need = 0
    for name, module in modules.items():
        blocks = [b for blocks in block_lists(module)[0] for b in blocks]
        block_bytes = sorted((module_bytes(b) for b in blocks), reverse=True)
        streamed = held[name] - sum(block_bytes) + sum(block_bytes[:GROUP_BLOCKS_RESIDENT])
        group_need = max(group_need, streamed + (activations if name in DENOISERS else 0))
    return need, min(offload_need, need), min(group_need, need)


def _components(pipe: Any) -> list[tuple[str, Any]]:
    import torch

    return [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]


def block_lists(module: Any) -> tuple[list[Any], list[str]]:
    """(the block lists group offload streams one block at a time, the children holding them one level down).

    diffusers' block-level grouping takes a module's top-level ``ModuleList`` / ``Sequential`` children (Wan
    ``blocks``, CogVideoX ``transformer_blocks``) and puts everything else in one group. A transformers text encoder
    keeps its blocks a level down (T5 / UMT5: ``encoder.block``), so it would stream whole -- Wan's UMT5-XXL is
    ~10.6 GiB in bf16 at once. For such a module the second list names those children (``["encoder"]``), which
    ``apply_group_offloading(..., block_modules=...)`` streams block by block too.
    """
    import torch

    sequences = (torch.nn.ModuleList, torch.nn.Sequential)
    top = [child for child in module.children() if isinstance(child, sequences)]
    if top:
        return top, []
    nested = [(name, [c for c in child.children() if isinstance(c, sequences)])
              for name, child in module.named_children()]
    nested = [(name, lists) for name, lists in nested if lists]
    return [lst for _name, lists in nested for lst in lists], [name for name, _lists in nested]


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
    policy = place_with_retry(pipe, spec, forced or auto_policy(spec, device, pipe), device, progress)
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
    """Apply ``policy`` to ``pipe`` on ``device`` through diffusers' own offload methods (a pipeline placed before,
    as on an out-of-memory retry, loses its group offload hooks first: diffusers refuses to mix them)."""
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"offload must be one of {', '.join(MEMORY_POLICIES)}; got {policy!r}")
    if remove_group_offload(pipe):
        pipe.to("cpu")
    if policy == "none":
        pipe.to(device)
    elif policy == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif policy == "group":
        place_group_offload(pipe, device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def place_group_offload(pipe: Any, device: str) -> None:
    """diffusers' group offload of every component, one block per group (``enable_group_offload``, diffusers
    0.42.1 ``DiffusionPipeline.enable_group_offload`` / ``hooks.group_offloading.apply_group_offloading``).

    On CUDA the next block is copied on a side stream while the current one computes (``use_stream``), and
    ``record_stream`` lets the allocator reuse a block's memory without a synchronisation ("faster at the expense
    of slightly more memory usage", its docstring). ``low_cpu_mem_usage`` stays off: the weights are pinned once
    when offloading starts instead of on every transfer (pinned RAM = the model's size). Streams need a device that
    has them; on the CPU (tests) the blocks move synchronously.
    """
    import torch

    onload = torch.device(device)
    streams = onload.type == "cuda"
    # Accelerate's hooks (model/sequential offload) and group offload refuse each other.
    if any(hasattr(m, "_hf_hook") for _n, m in _components(pipe)):
        pipe.remove_all_hooks()
    pipe.to("cpu")
    from diffusers.hooks import apply_group_offloading

    options = dict(onload_device=onload, offload_device=torch.device("cpu"), offload_type="block_level",
                   num_blocks_per_group=1, use_stream=streams, record_stream=streams, low_cpu_mem_usage=False)
    # What the pipeline's enable_group_offload does per component, except that a text encoder whose blocks sit a
    # level down is streamed block by block (``block_modules``) instead of whole (its ``exclude_modules`` would put
    # the excluded component on the GPU entirely).
    for _name, component in _components(pipe):
        parents = block_lists(component)[1]
        if parents:
            apply_group_offloading(component, block_modules=parents, **options)
        elif hasattr(component, "enable_group_offload"):
            component.enable_group_offload(**options)
        else:
            apply_group_offloading(component, **options)


def remove_group_offload(pipe: Any) -> bool:
    """Take diffusers' group offload hooks off every component of ``pipe``; whether there were any.

    Needed besides ``remove_all_hooks``: that one removes only accelerate's hooks (``_hf_hook``), not diffusers'
    ``HookRegistry`` hooks. The weights stay where they are (the CPU, between blocks).
    """
    removed = False
    for _name, component in _components(pipe):
        for module in component.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for hook in GROUP_OFFLOAD_HOOKS:
                if registry.get_hook(hook) is not None:
                    registry.remove_hook(hook, recurse=False)
                    removed = True
    return removed


def offload_groups(pipe: Any) -> None:
    """Every group-offloaded block back on the CPU (after a run that failed inside a block left it on the GPU)."""
    for _name, component in _components(pipe):
        for module in component.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.get_hook(GROUP_OFFLOAD_HOOKS[0]) if registry is not None else None
            if hook is not None and hook.group.offload_leader is module:
                hook.group.offload_()


def remove_offload(pipe: Any) -> None:
    """No offload hooks of any kind on ``pipe`` (accelerate's and diffusers' group offload)."""
    remove_group_offload(pipe)
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()


def unplace(pipe: Any) -> None:
    """Best effort after a failed placement: no hooks, every component back on the CPU."""
    try:
        remove_offload(pipe)
        pipe.to("cpu")
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        logger.warning("could not move the pipeline back to the CPU: %s", one_line(exc, REASON_LIMIT))


# -- after a failure ----------------------------------------------------------------------------------------------

def recover(loaded: LoadedModel) -> None:
    """After a failed run: offload hooks back to their idle state (components off the GPU), cache emptied."""
    free_hooks = getattr(loaded.pipe, "maybe_free_model_hooks", None)
    try:
        if loaded.policy == "group":
            offload_groups(loaded.pipe)
        if callable(free_hooks):
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
        if entry.policy != "none":
            # Offload hooks keep references to the modules (group offload: pinned copies); drop them so memory can
            # be freed.
            remove_offload(pipe)
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
