"""How a loaded denoiser runs: its attention kernel (diffusers' attention dispatcher) and regional ``torch.compile``.

Attention. Our names map to diffusers 0.42.1's ``AttentionBackendName`` values; each GPU kernel lists the package it
needs, the version diffusers requires (``_REQUIRED_*_VERSION`` in ``diffusers/models/attention_dispatch.py``) and the
GPUs it fits, from the kernels' own documentation:

- ``flash`` (FlashAttention 2, ``flash-attn``): "Ampere, Ada, or Hopper GPUs" -- compute capability 8.0 and newer
  (Dao-AILab/flash-attention README, "NVIDIA CUDA Support"); diffusers needs ``flash-attn>=2.6.3``.
- ``flash3`` (FlashAttention 3, backend ``_flash_3``): "optimized for Hopper GPUs", "Requirements: H100 / H800 GPU,
  CUDA >= 12.3", built from source (``cd hopper && python setup.py install``; distribution ``flash_attn_3``, module
  ``flash_attn_interface``) -- compute capability 9.x only. diffusers checks ``find_spec("flash_attn_3")`` and imports
  ``flash_attn_interface``; its docs: "FlashAttention-3 is not supported for non-Hopper architectures".
- ``sage`` (SageAttention 2, ``sageattention``): "Optimized kernels for Ampere, Ada and Hopper GPUs" (thu-ml/
  SageAttention README) -- 8.0 and newer; diffusers needs ``sageattention>=2.1.1`` (its per-kernel variants check
  ``_check_device_cuda_atleast_smXY(8, 0)``). INT8 Q/K: close to, not equal to, exact attention.
- ``xformers``: the CUTLASS kernel runs on "GPUs as old as P100 (Sm60)" (xformers/ops/fmha/cutlass.py); diffusers
  needs ``xformers>=0.0.29``.

``auto`` picks the fastest installed kernel that fits: FlashAttention 3 on Hopper, then SageAttention, then
FlashAttention 2, else PyTorch's own ``scaled_dot_product_attention`` (``native``, the only one on a CPU).

diffusers' ``native`` backend is the function its dispatcher calls by default (``DIFFUSERS_ATTN_BACKEND`` unset), so
``native`` is today's loop bit for bit (tests/test_accel.py). CogVideoX's attention processor in diffusers 0.42.1
calls ``F.scaled_dot_product_attention`` itself (no ``_attention_backend``): only ``native`` applies there; ``auto``
resolves to it, and a named GPU kernel is refused.

Compile. Regional compilation: the repeated blocks only (diffusers' ``compile_repeated_blocks`` where the model
lists ``_repeated_blocks`` -- Wan --, the same ``Module.compile`` on CogVideoX's ``transformer_blocks`` otherwise).
Every block of a model shares one graph per input shape, so a 30-block model compiles once per shape. Found by
running it (torch 2.13): ``Module.compile`` compiles ``_call_impl``, which dynamo skips (it lives in ``torch.nn``), so
the block's ``forward`` is what gets compiled and forward pre-hooks keep running eagerly around it -- the engine's
Stop check between blocks (``cancel_checkpoint``) works, and adding or removing it recompiles nothing. Graphs are
static (``dynamic=False``): one per size, the loop's rotations keep every shape fixed. LoRAs (PEFT layers in the
blocks), measured on a tiny Wan: each new adapter state compiles once more and is then reused -- a LoRA's first use,
its fused second use (fuse policy ``auto``), each new scale, and plain runs once adapters are loaded (switched off) --
so a server that varies LoRA scales pays one compilation per distinct scale. Block-level group offload (diffusers
hooks on the blocks, CPU onload) compiles to two graphs and runs the same loop; model offload hooks sit on the
transformer, outside the blocks. ``compile=False`` on a pipeline compiled earlier runs it eagerly again (the compiled
callable is kept, so switching back costs no compilation).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from loopui.models.devices import cuda_capability

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_KERNELS", "AttentionKernel", "compile_blocks", "compile_count", "compiled_blocks",
           "is_compiled", "resolve_attention", "resolve_compile", "supports_attention_backends", "uncompile_blocks",
           "use_attention"]

ATTENTION_ENV = "LOOPUI_ATTENTION"
_BACKEND_LOCK = threading.Lock()
COMPILE_ENV = "LOOPUI_COMPILE"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@dataclass(frozen=True)
class AttentionKernel:
    """One attention kernel: diffusers' backend name, what it needs installed, and the NVIDIA GPUs it fits."""

    name: str  # ours (LoopRequest.attention)
    backend: str  # diffusers' AttentionBackendName value
    title: str
    modules: tuple[str, ...] = ()  # importable modules it needs (all of them)
    distribution: Optional[str] = None  # the installed distribution whose version diffusers checks
    min_version: Optional[str] = None  # diffusers 0.42.1's _REQUIRED_*_VERSION
    install: str = ""
    min_capability: Optional[tuple[int, int]] = None  # None: runs anywhere (native)
    max_major: Optional[int] = None  # FlashAttention 3 is Hopper (9.x) only
    half_only: bool = False  # float16 / bfloat16 inputs only (FlashAttention, SageAttention)
    # Whether diffusers' context parallelism (--parallel) runs on it (its registry's _supports_context_parallel)
    context_parallel: bool = True

    def fits(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of this compute capability runs the kernel."""
        if self.min_capability is not None and tuple(capability) < self.min_capability:
            return False
        return self.max_major is None or capability[0] <= self.max_major

    def gpus(self) -> str:
        if self.min_capability is None:
            return "any device"
        low = "{}.{}".format(*self.min_capability)
        return f"compute capability {low}" + (f" to {self.max_major}.x" if self.max_major else " or newer")


ATTENTION_KERNELS: dict[str, AttentionKernel] = {
    "native": AttentionKernel("native", "native", "PyTorch scaled_dot_product_attention"),
    "flash": AttentionKernel(
        "flash", "flash", "FlashAttention 2", modules=("flash_attn",), distribution="flash-attn", min_version="2.6.3",
        install="pip install flash-attn --no-build-isolation", min_capability=(8, 0), half_only=True),
    "flash3": AttentionKernel(
        "flash3", "_flash_3", "FlashAttention 3", modules=("flash_attn_3", "flash_attn_interface"),
        distribution="flash_attn_3",
        install="build it from source: git clone https://github.com/Dao-AILab/flash-attention && "
                "cd flash-attention/hopper && python setup.py install",
        min_capability=(9, 0), max_major=9, half_only=True, context_parallel=False),
    "sage": AttentionKernel(
        "sage", "sage", "SageAttention 2", modules=("sageattention",), distribution="sageattention",
        min_version="2.1.1", install="pip install sageattention==2.2.0 --no-build-isolation",
        min_capability=(8, 0), half_only=True),
    "xformers": AttentionKernel(
        "xformers", "xformers", "xFormers", modules=("xformers",), distribution="xformers", min_version="0.0.29",
        install="pip install xformers", min_capability=(6, 0), context_parallel=False),
}
# The names a request may give (loopui.engine.request.ATTENTION_BACKENDS; the models room cannot import it, a test
# keeps the two equal).
ATTENTION_NAMES = ("auto",) + tuple(ATTENTION_KERNELS)
# What "auto" tries on a CUDA GPU, fastest first (xFormers is never faster than FlashAttention on the GPUs it fits).
AUTO_ORDER = ("flash3", "sage", "flash")


def _choices() -> str:
    return ", ".join(ATTENTION_NAMES)


def _missing(kernel: AttentionKernel) -> Optional[str]:
    """Why ``kernel`` cannot run here as far as packages go (None: it can)."""
    for module in kernel.modules:
        if importlib.util.find_spec(module) is None:
            return (f"{kernel.title} is not installed (module {module!r} not found): {kernel.install} "
                    f"(see requirements-gpu.txt)")
    if kernel.distribution and kernel.min_version:
        from packaging.version import Version

        try:
            installed = importlib.metadata.version(kernel.distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{kernel.title} is not installed: {kernel.install} (see requirements-gpu.txt)"
        if Version(installed) < Version(kernel.min_version):
            return (f"{kernel.distribution} {installed} is installed, diffusers needs >= {kernel.min_version}: "
                    f"{kernel.install}")
    return None


def resolve_attention(name: Optional[str], device: Any, dtype: Any = None, parallel: bool = False) -> str:
    """The concrete attention kernel (``ATTENTION_NAMES`` minus ``auto``) for ``name`` on ``device``.

    ``auto`` (or None) = the server's setting ``LOOPUI_ATTENTION`` when set, else the fastest installed kernel that fits
    this GPU (FlashAttention 3 on Hopper, then SageAttention, then FlashAttention 2), else ``native`` -- always
    ``native`` on a CPU. ``dtype`` (the transformer's, when known) and ``parallel`` (diffusers' context parallelism)
    narrow the choice: the FlashAttention and SageAttention kernels take 16-bit inputs only, FlashAttention 3 and
    xFormers do not run context-parallel. A named kernel that is not installed, needs a CUDA GPU, does not fit this
    one or this run raises one line (``ValueError``) naming ``attention``.
    """
    name = "auto" if name is None else str(name).strip().lower()
    if name not in ATTENTION_NAMES:
        raise ValueError(f"attention must be one of {_choices()}; got {name!r}")
    capability = cuda_capability(device)
    if name == "auto":
        server = os.environ.get(ATTENTION_ENV, "").strip().lower()
        if server and server != "auto":
            if server not in ATTENTION_NAMES:
                raise ValueError(f"{ATTENTION_ENV} must be one of {_choices()}; got {server!r}")
            if capability is None and server != "native":
                logger.info("%s=%s does not apply on %s: attention native", ATTENTION_ENV, server, device)
                return "native"
            try:
                return resolve_attention(server, device, dtype, parallel)
            except ValueError as exc:  # the server's setting, not the request, names the kernel
                raise ValueError(f"{ATTENTION_ENV}={server}: {exc}") from None
        if capability is None:
            return "native"
        for candidate in AUTO_ORDER:
            kernel = ATTENTION_KERNELS[candidate]
            if kernel.fits(capability) and _missing(kernel) is None and _unfit(kernel, dtype, parallel) is None:
                return candidate
        return "native"
    kernel = ATTENTION_KERNELS[name]
    if kernel.min_capability is None:
        return name
    if capability is None:
        raise ValueError(f"attention {name!r} ({kernel.title}) needs a CUDA GPU; this run is on "
                         f"{torch.device(device).type}: use attention 'native' or 'auto'")
    missing = _missing(kernel)
    if missing is not None:
        raise ValueError(f"attention {name!r}: {missing}")
    if not kernel.fits(capability):
        raise ValueError(f"attention {name!r} ({kernel.title}) needs a GPU of {kernel.gpus()}; this GPU "
                         f"({torch.cuda.get_device_name(device)}) is {capability[0]}.{capability[1]}: use attention "
                         f"'auto' or 'native'")
    unfit = _unfit(kernel, dtype, parallel)
    if unfit is not None:
        raise ValueError(f"attention {name!r} ({kernel.title}) {unfit}: use attention 'auto' or 'native'")
    return name


def _unfit(kernel: AttentionKernel, dtype: Any, parallel: bool) -> Optional[str]:
    """Why ``kernel`` cannot run this model's call (its dtype, context parallelism); None when it can."""
    if kernel.half_only and dtype is not None and torch.empty(0, dtype=_dtype(dtype)).element_size() > 2:
        return f"takes float16 or bfloat16 only, and this model runs in {str(dtype).replace('torch.', '')}"
    if parallel and not kernel.context_parallel:
        return "does not run split across GPUs (diffusers' context parallelism, --parallel)"
    return None


def _dtype(value: Any) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).replace("torch.", ""))


def _attention_processors(module: Any) -> list:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in module.modules()
            if isinstance(m, (Attention, AttentionModuleMixin)) and getattr(m, "processor", None) is not None]


def supports_attention_backends(module: Any) -> bool:
    """Whether ``module``'s attention goes through diffusers' dispatcher (Wan: yes; CogVideoX in 0.42.1: no, its
    processor calls ``scaled_dot_product_attention`` itself)."""
    return any(hasattr(processor, "_attention_backend") for processor in _attention_processors(module))


def use_attention(modules: Iterable[Any], name: str) -> None:
    """Run every denoiser in ``modules`` with attention kernel ``name`` (a concrete one: :func:`resolve_attention`).

    Applied only when it changes (the current name is recorded on the module): diffusers' ``set_attention_backend``
    walks every module and logs a warning each time. Its side effect on the process-wide default backend is undone,
    so a model this call does not touch keeps its attention. ``ValueError`` naming ``attention`` when diffusers
    refuses the kernel, or when the model's attention does not dispatch (only ``native`` applies there).
    """
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)} here; got {name!r}")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in modules:
        if not supports_attention_backends(module):
            if name != "native":
                raise ValueError(f"attention {name!r}: {type(module).__name__}'s attention in diffusers calls "
                                 f"PyTorch's scaled_dot_product_attention directly, so only 'native' applies (or "
                                 f"'auto')")
            continue
        if getattr(module, "_loopui_attention", None) == name:
            continue
        # set_attention_backend also makes its backend the process-wide default for processors without one: put it
        # back, under a lock, since pipelines on other devices switch their kernels from other threads.
        with _BACKEND_LOCK:
            previous = _AttentionBackendRegistry._active_backend
            try:
                module.set_attention_backend(ATTENTION_KERNELS[name].backend)
            except (RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"attention {name!r}: {first}") from exc
            finally:
                _AttentionBackendRegistry.set_active_backend(previous)
        module._loopui_attention = name
        logger.info("attention %s on %s", name, type(module).__name__)


def resolve_compile(value: Optional[bool]) -> bool:
    """Whether to compile: ``value`` when given, else the server's ``LOOPUI_COMPILE`` (1/true/on or 0/false/off),
    else off. A bad setting raises one line naming it."""
    if value is not None:
        return bool(value)
    raw = os.environ.get(COMPILE_ENV, "").strip().lower()
    if not raw:
        return False
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{COMPILE_ENV} must be 1/true/on or 0/false/off; got {raw!r}")


# -- compile ----------------------------------------------------------------------------------------------------------

_COUNT_LOCK = threading.Lock()
_COMPILATIONS = 0
# Each size of each block class is one cache entry on the block's forward; dynamo's default limit (8) would drop a
# long-running server with several sizes and LoRA sets back to eager silently.
RECOMPILE_LIMIT = 64


def _counting_inductor(graph_module: Any, example_inputs: Any) -> Any:
    """Inductor, counting every graph it compiles (a recompile after a guard failure is one more)."""
    global _COMPILATIONS
    with _COUNT_LOCK:
        _COMPILATIONS += 1
    return torch._dynamo.lookup_backend("inductor")(graph_module, example_inputs)


def compile_count() -> int:
    """Graphs compiled by :func:`compile_blocks`' backend in this process so far."""
    return _COMPILATIONS


def compiled_blocks(module: Any) -> list:
    """The blocks regional compilation covers: the classes a diffusers model lists in ``_repeated_blocks`` (Wan),
    else the entries of its top-level ``ModuleList`` attributes (CogVideoX's ``transformer_blocks``)."""
    repeated = getattr(module, "_repeated_blocks", None)
    if repeated:
        return [m for m in module.modules() if type(m).__name__ in repeated]
    return transformer_blocks(module)


def transformer_blocks(module: Any) -> list:
    """The blocks of a diffusers transformer: every entry of its top-level ``nn.ModuleList`` attributes
    (CogVideoX's ``transformer_blocks``, Wan's ``blocks``) -- what the Stop check hooks and regional compilation
    covers where the model lists no ``_repeated_blocks``."""
    return [block for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def is_compiled(module: Any) -> bool:
    """Whether ``module``'s blocks run compiled now."""
    blocks = compiled_blocks(module)
    return bool(blocks) and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def compile_blocks(module: Any) -> bool:
    """Compile ``module``'s repeated blocks (once; again after :func:`uncompile_blocks` the kept compiled callables
    come back). Returns whether anything changed. Compilation itself happens at the first call of each shape."""
    blocks = compiled_blocks(module)
    if not blocks:
        raise ValueError(f"compile: {type(module).__name__} has no repeated blocks to compile")
    if is_compiled(module):
        return False
    if all(getattr(b, "_loopui_compiled", None) is not None for b in blocks):
        for block in blocks:
            block._compiled_call_impl = block._loopui_compiled
        return True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options = dict(backend=_counting_inductor, dynamic=False)
    if getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(**options)
    else:
        for block in blocks:
            block.compile(**options)
    for block in blocks:
        block._loopui_compiled = block._compiled_call_impl
    logger.info("compiling %d %s blocks (regional torch.compile, once per shape)", len(blocks),
                type(module).__name__)
    return True


def uncompile_blocks(module: Any) -> bool:
    """Run ``module``'s blocks eagerly again (the compiled callables are kept). Returns whether anything changed."""
    changed = False
    for block in compiled_blocks(module):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
            changed = True
    return changed


def compiled_shape_pending(modules: Iterable[Any], key: Any) -> bool:
    """Whether a compiled module in ``modules`` has not yet run at ``key`` (a shape of this call): it compiles first."""
    return any(is_compiled(m) and key not in getattr(m, "_loopui_compiled_shapes", ()) for m in modules)


def remember_compiled_shape(modules: Iterable[Any], key: Any) -> None:
    """Record that the compiled ``modules`` ran at ``key``."""
    for module in modules:
        if is_compiled(module):
            shapes = getattr(module, "_loopui_compiled_shapes", None)
            if shapes is None:
                shapes = module._loopui_compiled_shapes = set()
            shapes.add(key)
