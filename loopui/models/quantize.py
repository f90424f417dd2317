"""Quantized denoisers: torchao's weight (and activation) quantization on the transformer(s) of a loaded pipeline.

``fp8`` = FP8 weights and dynamic FP8 activations per row (``Float8DynamicActivationFloat8WeightConfig``; tensor
cores of compute capability 8.9+: Ada, Hopper), ``int8`` = int8 weights, activations left in the load dtype
(``Int8WeightOnlyConfig``; any GPU and the CPU). Either halves a bf16 transformer's weights, so a 14B model (or
both A14B experts) fits a 24-48 GB card. Only the denoisers are touched: the text encoder runs once per loop and
the VAE is precision-sensitive.

Which layers stay in the load dtype follows diffusers. Its torchao quantizer converts only ``nn.Linear`` weights
and leaves out ``modules_to_not_convert`` plus the model's ``_keep_in_fp32_modules``
(``diffusers/quantizers/torchao/torchao_quantizer.py``: ``_process_model_before_weight_loading``,
``check_if_quantized_param``); its layerwise casting (``ModelMixin.enable_layerwise_casting``) also keeps
``_skip_layerwise_casting_patterns`` and ``hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN`` -- patch
embeddings, norms (CogVideoX's adaptive norms are Linears), ``^proj_out$`` (the final projection). Both sets are
skipped here, plus the timestep embedders (``time_embed``: CogVideoX lists none; Wan's is in
``_keep_in_fp32_modules``): they run once per step on one token and decide the noise level the model reads.

torchao is optional (``pip install torchao``; ``requirements-gpu.txt``); nothing here imports it (or torch) before a
quantization is asked for. When diffusers imports it (torchao 0.18 on a CPU-only torch) it logs "Failed to load
..._C_*.so" for its CUDA kernels and torch warns about ``register_constant`` on enums: both harmless on the CPU.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterator, Optional

from loopui.models.devices import cuda_capability

logger = logging.getLogger(__name__)

# The same names as ``loopui.engine.request.QUANTIZE_MODES`` (the models room does not import the engine; a test
# keeps the two equal).
QUANTIZE_MODES = ("none", "fp8", "int8")
QUANTIZE_ENV = "LOOPUI_QUANTIZE"
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
DENOISERS = ("transformer", "transformer_2")
# Beyond diffusers' own lists (see the module docstring): the timestep embedders.
EXTRA_SKIP_PATTERNS = ("time_embed",)
INSTALL_HINT = "pip install torchao"
_MARK = "_loopui_quantization"


def resolve_quantize(mode: Optional[str], device: str) -> str:
    """The quantization to load with on ``device``: ``mode``, or when None ``LOOPUI_QUANTIZE``, else ``"none"``.

    ``ValueError`` in one line naming ``quantize`` (or ``LOOPUI_QUANTIZE`` for a bad setting) when the name is
    unknown, torchao is not installed, or ``fp8`` is asked for without a CUDA GPU of compute capability 8.9+.
    """
    source = "quantize"
    if mode is None:
        setting = os.environ.get(QUANTIZE_ENV, "").strip().lower()
        if setting in ("", "auto"):
            return "none"
        mode, source = setting, QUANTIZE_ENV
    name = check_mode(mode, source)
    if name == "none":
        return name
    if not torchao_available():
        raise ValueError(f"{source} {name!r} needs torchao, which is not installed: {INSTALL_HINT}")
    if name == "fp8":
        capability = cuda_capability(device)
        if capability is None:
            raise ValueError(f"{source} 'fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{device} is not one -- use int8")
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"{source} 'fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{device} has {capability[0]}.{capability[1]} -- use int8")
    return name


def check_mode(mode: Any, source: str = "quantize") -> str:
    """``mode`` as one of ``QUANTIZE_MODES`` (case and spaces ignored); ``ValueError`` naming ``source``."""
    name = mode.strip().lower() if isinstance(mode, str) else mode
    if name not in QUANTIZE_MODES:
        raise ValueError(f"{source} must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    return name


def torchao_available() -> bool:
    """Whether torchao can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def quantize_pipeline(pipe: Any, mode: str) -> None:
    """Quantize ``pipe``'s denoiser(s) in place with torchao (``mode`` ``fp8`` or ``int8``; ``none`` does nothing).

    Every ``nn.Linear`` of the transformer (and ``transformer_2`` of Wan 2.2 A14B) is converted except the layers
    diffusers keeps in high precision (module docstring). Quantize before placing the pipeline on a GPU (the
    ``ModelManager`` does), so a large model never sits there unquantized. Quantizing twice with the same mode does
    nothing; another mode is a ``ValueError`` (load the model again). ``mode`` must have been resolved for the
    device (:func:`resolve_quantize`): torchao refuses fp8 without an FP8-capable GPU.
    """
    mode = check_mode(mode)
    present = pipeline_quantization(pipe)
    if mode == present:
        return
    if present != "none":
        raise ValueError(f"quantize: this pipeline's weights are already {present}; load it again to use {mode}")
    if not torchao_available():
        raise ValueError(f"quantize {mode!r} needs torchao, which is not installed: {INSTALL_HINT}")
    config = _torchao_config(mode)
    from torchao.quantization import quantize_

    for name, module in _denoisers(pipe):
        patterns = skip_patterns(module)
        count = 0

        def wanted(layer: Any, fqn: str) -> bool:
            nonlocal count
            import torch

            take = isinstance(layer, torch.nn.Linear) and not any(re.search(p, fqn) for p in patterns)
            count += take
            return take

        quantize_(module, config, filter_fn=wanted)
        setattr(module, _MARK, mode)
        logger.info("%s: %d linear layers quantized to %s", name, count, mode)


def _torchao_config(mode: str) -> Any:
    try:
        if mode == "fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    except ImportError as exc:
        raise ValueError(f"quantize {mode!r}: the installed torchao is too old ({exc}): pip install -U torchao") \
            from None


def skip_patterns(module: Any) -> tuple[str, ...]:
    """The regular expressions of layer names that stay unquantized in ``module`` (searched in each name, the way
    diffusers' layerwise casting matches them)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN) + list(EXTRA_SKIP_PATTERNS)
    for attribute in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        patterns += list(getattr(type(module), attribute, None) or ())
    return tuple(dict.fromkeys(patterns))


def pipeline_quantization(pipe: Any) -> str:
    """How ``pipe``'s denoiser weights are quantized: ``"fp8"``, ``"int8"`` or ``"none"`` (a stock pipeline).

    Read from the weights themselves, so a transformer quantized elsewhere (diffusers' ``TorchAoConfig``) counts.
    """
    for _name, module in _denoisers(pipe):
        mark = getattr(module, _MARK, None)
        if mark is not None:
            return mark
        for parameter in module.parameters():
            kind = type(parameter).__name__.lower()
            if "float8" in kind:
                return "fp8"
            if "int8" in kind:
                return "int8"
    return "none"


def check_pipeline_quantization(pipe: Any, wanted: Optional[str]) -> None:
    """A request that names a quantization (``wanted``; None = the server's business) must get a pipeline loaded
    with it: ``ValueError`` in one line naming ``quantize`` otherwise."""
    if wanted is None:
        return
    wanted = check_mode(wanted)
    present = pipeline_quantization(pipe)
    if present != wanted:
        raise ValueError(f"quantize {wanted!r}: this pipeline's weights are {present}; load it with "
                         f"ModelManager(quantize={wanted!r}) or quantize_pipeline(pipe, {wanted!r})")


def module_bytes(module: Any, dense: bool = False) -> int:
    """Bytes the parameters and buffers of ``module`` occupy (a torchao tensor: its inner data and scales); with
    ``dense``, the bytes they had before quantization (a torchao tensor reports its logical shape and dtype)."""
    total = 0
    seen: set[int] = set()
    for tensor in _tensors(module):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size() if dense else tensor_bytes(tensor)
    return total


def tensor_bytes(tensor: Any) -> int:
    """Bytes of one tensor; a wrapper subclass (torchao) is the sum of the tensors it holds."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten):
        names, _meta = flatten()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n, None) is not None)
    return tensor.numel() * tensor.element_size()


def _tensors(module: Any) -> Iterator[Any]:
    yield from module.parameters()
    yield from module.buffers()


def _denoisers(pipe: Any) -> Iterator[tuple[str, Any]]:
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if module is not None:
            yield name, module
