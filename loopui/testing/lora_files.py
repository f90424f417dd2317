"""LoRA files written in code, in the key formats people publish them in, for tests and benchmarks (no download).

Each writer takes a built transformer (so shapes are the model's own), draws seeded random low-rank factors for its
attention and feed-forward projections and saves them with ``safetensors``:

- ``"peft"``: diffusers/PEFT keys, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (what
  ``save_lora_weights`` writes; any family).
- ``"kohya"``: Kohya / musubi-tuner keys for Wan, ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha`` (the original Wan module names, underscores for dots).
- ``"comfy"``: ComfyUI / lightx2v keys for Wan, ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha``.

A Kohya/ComfyUI file stores ``alpha``; a LoRA adds ``(alpha / rank) * up @ down``. ``lora_delta`` returns the
weight change a file makes at scale 1 per diffusers module name, computed from the written tensors, so a test can
build the expected weights independently of diffusers' loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

LORA_FORMATS = ("peft", "kohya", "comfy")

# diffusers Wan module -> the original Wan checkpoint's (what Kohya and ComfyUI files are keyed by).
_WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                 "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                 "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                 "ffn.net.2": "ffn.2"}
_COG_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


def _targets(transformer: Any) -> list[tuple[str, Any]]:
    """(diffusers module name, linear module) of every projection a LoRA of this transformer adapts."""
    import torch

    wan = hasattr(transformer, "blocks")
    wanted = tuple(_WAN_ORIGINAL) if wan else _COG_TARGETS
    return [(name, module) for name, module in transformer.named_modules()
            if (isinstance(module, torch.nn.Linear) or hasattr(module, "base_layer"))  # a PEFT layer once loaded
            and name.split(".", 2)[-1] in wanted]


def write_lora(transformer: Any, path: str | Path, format: str = "peft", rank: int = 4, seed: int = 0,
               std: float = 0.5, alpha: Optional[float] = None, blocks: Optional[int] = None) -> Path:
    """Write a random LoRA for ``transformer`` to ``path`` (``.safetensors``) in ``format``; returns the path.

    ``std`` sets the size of the factors (large enough that a tiny model's output visibly changes); ``alpha``
    (Kohya/ComfyUI only; default ``rank / 2``, so the stored scaling is not 1) is written per module; ``blocks``
    keeps only the first ``blocks`` transformer blocks.
    """
    import torch
    from safetensors.torch import save_file

    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(LORA_FORMATS)}, got {format!r}")
    wan = hasattr(transformer, "blocks")
    if format != "peft" and not wan:
        raise ValueError(f"format {format!r} is written for Wan transformers only")
    alpha = float(rank) / 2 if alpha is None else float(alpha)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _targets(transformer):
        block = int(name.split(".")[1])
        if blocks is not None and block >= blocks:
            continue
        module = getattr(module, "base_layer", module)
        down = torch.randn(rank, module.in_features, generator=gen) * std / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=gen) * std / rank ** 0.5
        if format == "peft":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
            continue
        original = f"blocks.{block}.{_WAN_ORIGINAL[name.split('.', 2)[2]]}"
        stem = ("lora_unet_" + original.replace(".", "_")) if format == "kohya" else f"diffusion_model.{original}"
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def lora_delta(transformer: Any, path: str | Path) -> dict[str, Any]:
    """The weight change (at scale 1) the file at ``path`` makes to each diffusers module of ``transformer``,
    computed from the stored tensors: ``(alpha / rank) * up @ down`` (alpha = rank for diffusers/PEFT files)."""
    from safetensors.torch import load_file

    stored = load_file(str(path))
    out = {}
    for name, _module in _targets(transformer):
        block, rest = int(name.split(".")[1]), name.split(".", 2)[2]
        candidates = [(f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", None)]
        if rest in _WAN_ORIGINAL:
            original = f"blocks.{block}.{_WAN_ORIGINAL[rest]}"
            for stem in ("lora_unet_" + original.replace(".", "_"), f"diffusion_model.{original}"):
                candidates.append((f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"))
        for down_key, up_key, alpha_key in candidates:
            if down_key in stored:
                down, up = stored[down_key].double(), stored[up_key].double()
                scale = 1.0 if alpha_key is None else float(stored[alpha_key]) / down.shape[0]
                out[name] = scale * up @ down
    return out
