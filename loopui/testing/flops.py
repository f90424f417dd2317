"""How many FLOPs one denoising step costs, from a model's real config, and the time bound that sets on a GPU.

``step_flops`` counts, for a registry model at a size, the matrix multiplications of one transformer pass and the
passes per step (2 under classifier-free guidance: Wan calls the transformer twice, CogVideoX batches 2):

- linear layers: 2 x weights x tokens they act on (Wan's self-attention q/k/v/o and feed-forward on the video
  tokens, its cross-attention q/o on the video tokens and k/v on the 512 text tokens, plus the I2V image tokens'
  added k/v; CogVideoX's q/k/v/o and feed-forward on the joint sequence: video tokens + 226 text tokens),
- self-attention: 4 x tokens^2 x dim per layer (QK^T and PV; CogVideoX's is joint over video + text tokens),
- cross-attention (Wan): 4 x tokens x keys x dim per layer (512 text keys, plus 257 CLIP image keys for I2V),
- the rest: patch embedding, text/time/image embedders (Wan 2.2 TI2V embeds a timestep per token), output layer.

Softmax, norms, rotary and elementwise work are not counted (they are memory-bound, not FLOP-bound). The counts
equal ``torch.utils.flop_counter`` on the real diffusers module run on the meta device (``counted_pass_flops``,
checked in tests/test_flops.py), so they follow diffusers' code, not a paper's formula.

The bound is FLOPs / peak: 989 TFLOPS dense bf16 and 1979 dense FP8 on an H200 (SXM; the H100 SXM's figures).
``bound_s`` takes separate peaks for the linear layers and the attention, because FP8 weight quantization (torchao)
only moves the linear layers to FP8: attention stays bf16 unless the attention kernel itself runs 8-bit (SageAttention).

    python -m loopui.testing.flops > docs/flop_bound.md     # the table for every registry model at native size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from loopui.testing.faithful import FAITHFUL_MODELS, load_config

H200_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak, H200 SXM (NVIDIA datasheet: 1979 with sparsity)
H200_FP8_TFLOPS = 1979.0  # dense FP8 (and INT8) tensor-core peak (3958 with sparsity)

WAN_TEXT_TOKENS = 512  # WanPipeline pads every prompt to max_sequence_length=512 and attends to all of them
COGVIDEOX_TEXT_TOKENS = 226  # CogVideoX: max_sequence_length 226 = the transformer's max_text_seq_length

# Attention kernels whose QK^T / PV run 8-bit (SageAttention 2: INT8 QK, FP8 PV on sm89+): FP8-rate attention.
EIGHT_BIT_ATTENTION = frozenset({"sage"})


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one denoising step of a model at a size, split by kind (each per transformer pass)."""

    model_id: str
    width: int
    height: int
    num_frames: int
    video_tokens: int  # patches of the latent video
    text_tokens: int  # Wan: cross-attention keys; CogVideoX: joined to the video tokens in the joint attention
    image_tokens: int  # Wan 2.1 I2V: CLIP image tokens, extra cross-attention keys (0 elsewhere)
    passes: int  # transformer passes per step (2 under classifier-free guidance)
    linear: float  # the blocks' linear layers
    self_attention: float
    cross_attention: float
    other: float  # embedders and output layer outside the blocks

    @property
    def attention(self) -> float:
        """Attention matmuls of one pass (self + cross)."""
        return self.self_attention + self.cross_attention

    @property
    def per_pass(self) -> float:
        """FLOPs of one transformer pass."""
        return self.linear + self.attention + self.other

    @property
    def total(self) -> float:
        """FLOPs of one denoising step."""
        return self.per_pass * self.passes

    def bound_s(self, linear_tflops: float = H200_BF16_TFLOPS, attention_tflops: Optional[float] = None) -> float:
        """Seconds per step at the given peaks (attention at ``linear_tflops`` unless given on its own)."""
        attention_tflops = linear_tflops if attention_tflops is None else attention_tflops
        linear = (self.linear + self.other) * self.passes / (linear_tflops * 1e12)
        return linear + self.attention * self.passes / (attention_tflops * 1e12)

    def to_dict(self) -> dict:
        """JSON-ready summary: the counts in TFLOP and the bf16 / FP8 bounds in s/step."""
        out = asdict(self)
        for key in ("linear", "self_attention", "cross_attention", "other"):
            out[key] = _digits(out[key] / 1e12)
        out.update(tflop_per_step=_digits(self.total / 1e12), bound_bf16_s=_digits(self.bound_s()),
                   bound_fp8_linear_s=_digits(self.bound_s(H200_FP8_TFLOPS, H200_BF16_TFLOPS)),
                   bound_fp8_s=_digits(self.bound_s(H200_FP8_TFLOPS)))
        return out


def _digits(value: float) -> float:
    return float(f"{value:.4g}")  # 4 significant digits: a shrunk smoke model's microseconds stay visible


def stack_bound_s(flops: StepFlops, quantize: str = "none", attention: str = "native") -> float:
    """The H200 bound of one step for a run's stack: FP8 linear layers with ``quantize="fp8"`` (int8 weight-only
    still computes in bf16), FP8-rate attention with an 8-bit attention kernel (``EIGHT_BIT_ATTENTION``)."""
    linear = H200_FP8_TFLOPS if quantize == "fp8" else H200_BF16_TFLOPS
    attn = H200_FP8_TFLOPS if attention in EIGHT_BIT_ATTENTION else H200_BF16_TFLOPS
    return flops.bound_s(linear, attn)


def _spec(model_id: str):
    from loopui.models.registry import REGISTRY

    if model_id not in REGISTRY or model_id not in FAITHFUL_MODELS:
        raise ValueError(f"model_id: no registry config for {model_id!r}; known: {', '.join(FAITHFUL_MODELS)}")
    return REGISTRY[model_id]


def _latent_grid(model_id: str, config: Mapping[str, Any], height: int, width: int, num_frames: int
                 ) -> tuple[int, int, int]:
    """(time, height, width) in patches of the transformer input for a pixel size."""
    spec = _spec(model_id)
    frames = (num_frames - 1) // spec.temporal_compression + 1
    if spec.family == "wan":
        pt, ph, pw = config["patch_size"]
    else:
        pt = config.get("patch_size_t") or 1
        ph = pw = config["patch_size"]
    lat_h, lat_w = height // spec.spatial_compression, width // spec.spatial_compression
    if lat_h % ph or lat_w % pw:
        raise ValueError(f"height/width: {width}x{height} is not a multiple of the model's patch grid")
    return math.ceil(frames / pt), lat_h // ph, lat_w // pw


def _image_tokens(stored: Mapping[str, Any]) -> int:
    """CLIP tokens a Wan I2V transformer cross-attends to (patches + class token); 0 without an image encoder."""
    if not stored["transformer"].get("image_dim"):
        return 0
    vision = stored["image_encoder"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def _wan_pass(cfg: Mapping[str, Any], n: int, text: int, image: int, timesteps: int) -> tuple[float, ...]:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, ffn = cfg["num_layers"], cfg["ffn_dim"]
    added = cfg.get("added_kv_proj_dim") or 0
    block_linear = (2 * n * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self q,k,v,o; cross q,o; feed-forward
                    + 2 * text * 2 * d * d  # cross k,v on the text tokens
                    + (2 * image * 2 * added * d if added else 0))  # I2V: added k,v on the image tokens
    self_attention = 4 * n * n * d
    cross_attention = 4 * n * (text + (image if added else 0)) * d
    pt, ph, pw = cfg["patch_size"]
    patch = pt * ph * pw
    freq, text_dim = cfg["freq_dim"], cfg["text_dim"]
    other = (2 * n * cfg["in_channels"] * patch * d  # patch embedding (a strided conv)
             + 2 * n * d * cfg["out_channels"] * patch  # proj_out
             + 2 * text * (text_dim * d + d * d)  # text embedder
             + 2 * timesteps * (freq * d + d * d + 6 * d * d))  # time embedder + time_proj (per token in TI2V)
    if cfg.get("image_dim"):
        other += 2 * image * (cfg["image_dim"] ** 2 + cfg["image_dim"] * d)  # image embedder's feed-forward
    return layers * block_linear, layers * self_attention, layers * cross_attention, other


def _cogvideox_pass(cfg: Mapping[str, Any], n: int, text: int) -> tuple[float, ...]:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, temb = cfg["num_layers"], cfg["time_embed_dim"]
    joint = n + text
    ff = 4 * d  # CogVideoXBlock's FeedForward: inner_dim = 4 x dim (ff_inner_dim unset in every config)
    block_linear = 2 * joint * (4 * d * d + 2 * d * ff) + 2 * 2 * temb * 6 * d  # + two LayerNormZero(temb)
    self_attention = 4 * joint * joint * d
    p, pt = cfg["patch_size"], cfg.get("patch_size_t") or 1
    other = (2 * n * cfg["in_channels"] * p * p * pt * d  # patch embedding
             + 2 * text * cfg["text_embed_dim"] * d  # text projection
             + 2 * (d * temb + temb * temb)  # time embedding
             + 2 * temb * 2 * d  # norm_out's AdaLayerNorm
             + 2 * n * d * p * p * pt * cfg["out_channels"])  # proj_out
    return layers * block_linear, layers * self_attention, 0.0, other


def step_flops(model_id: str, height: Optional[int] = None, width: Optional[int] = None,
               num_frames: Optional[int] = None, transformer_overrides: Optional[Mapping[str, Any]] = None
               ) -> StepFlops:
    """FLOPs of one denoising step of ``model_id`` at a size (default: its native size), from its real config.

    ``transformer_overrides`` replaces config keys (tests compare a depth-reduced build with torch's counter).
    """
    spec = _spec(model_id)
    height = height or spec.native_height
    width = width or spec.native_width
    num_frames = num_frames or spec.native_num_frames
    stored = load_config(model_id)
    cfg = {**stored["transformer"], **(transformer_overrides or {})}
    t, h, w = _latent_grid(model_id, cfg, height, width, num_frames)
    n = t * h * w
    passes = 2 if spec.guidance_scale > 1 else 1
    if spec.family == "wan":
        text, image = WAN_TEXT_TOKENS, _image_tokens(stored)
        # expand_timesteps (Wan 2.2 TI2V): WanPipeline passes one timestep per token
        timesteps = n if stored["model_index"].get("expand_timesteps") else 1
        parts = _wan_pass(cfg, n, text, image, timesteps)
    else:
        text, image = COGVIDEOX_TEXT_TOKENS, 0
        parts = _cogvideox_pass(cfg, n, text)
    return StepFlops(model_id, width, height, num_frames, n, text, image, passes, *map(float, parts))


def counted_pass_flops(model_id: str, height: Optional[int] = None, width: Optional[int] = None,
                       num_frames: Optional[int] = None,
                       transformer_overrides: Optional[Mapping[str, Any]] = None) -> float:
    """FLOPs of one transformer pass as ``torch.utils.flop_counter`` counts the diffusers module's forward.

    The transformer is built from the real config on the meta device (no memory, no arithmetic): seconds for any size.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loopui.testing.faithful import _build_on_meta

    spec = _spec(model_id)
    height = height or spec.native_height
    width = width or spec.native_width
    num_frames = num_frames or spec.native_num_frames
    stored = load_config(model_id)
    module = _build_on_meta(model_id, "transformer", transformer_overrides).to("meta")
    cfg = module.config
    frames = (num_frames - 1) // spec.temporal_compression + 1
    lat_h, lat_w = height // spec.spatial_compression, width // spec.spatial_compression
    meta = dict(device="meta")
    if spec.family == "wan":
        t, h, w = _latent_grid(model_id, cfg, height, width, num_frames)
        tokens = t * h * w
        steps = (1, tokens) if stored["model_index"].get("expand_timesteps") else (1,)
        kwargs = dict(hidden_states=torch.empty(1, cfg.in_channels, frames, lat_h, lat_w, **meta),
                      timestep=torch.empty(*steps, dtype=torch.long, **meta),
                      encoder_hidden_states=torch.empty(1, WAN_TEXT_TOKENS, cfg.text_dim, **meta))
        image = _image_tokens(stored)
        if image:
            kwargs["encoder_hidden_states_image"] = torch.empty(1, image, cfg.image_dim, **meta)
    else:
        kwargs = dict(hidden_states=torch.empty(1, frames, cfg.in_channels, lat_h, lat_w, **meta),
                      timestep=torch.empty(1, dtype=torch.long, **meta),
                      encoder_hidden_states=torch.empty(1, COGVIDEOX_TEXT_TOKENS, cfg.text_embed_dim, **meta))
        if cfg.use_rotary_positional_embeddings:
            t, h, w = _latent_grid(model_id, cfg, height, width, num_frames)
            rotary = torch.empty(t * h * w, cfg.attention_head_dim, **meta)
            kwargs["image_rotary_emb"] = (rotary, rotary)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(**kwargs, return_dict=False)
    return float(counter.get_total_flops())


def bench_sizes() -> list[tuple[str, int, int, int]]:
    """(model id, height, width, frames): every registry model at its native size, and the 14B ones at 480p too
    (the size the GPU bench times them at)."""
    from loopui.models.registry import REGISTRY

    out = []
    for model_id in FAITHFUL_MODELS:
        spec = REGISTRY[model_id]
        out.append((model_id, spec.native_height, spec.native_width, spec.native_num_frames))
        if spec.native_height > 480 and "14B" in model_id:
            out.append((model_id, 480, 832, spec.native_num_frames))
    return out


def markdown_table() -> str:
    """docs/flop_bound.md: the FLOP count and H200 bound of every registry model (generated by this module)."""
    lines = [
        "# FLOP bound per denoising step (generated by `python -m loopui.testing.flops`)",
        "",
        "Counted from each model's real config (`loopui/testing/configs`) as `loopui/testing/flops.py` describes: the",
        "linear layers (2 x weights x tokens), self-attention (4 x tokens^2 x dim), cross-attention (4 x tokens x keys",
        "x dim), embedders and output layer, times the transformer passes per step (2 under CFG). Equal to torch's",
        "flop counter on the diffusers module (tests/test_flops.py). Bounds at H200 dense peaks: 989 TFLOPS bf16, 1979",
        "FP8. *FP8 linear* = FP8 weights and activations in the linear layers only (torchao), attention in bf16;",
        "*all FP8* = attention 8-bit too (SageAttention), the floor the issue quotes.",
        "",
        "| model | size (WxHxF) | tokens (video + text/image) | passes | TFLOP / step (linear, attention, other) "
        "| bound bf16 | bound FP8 linear | bound all FP8 |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for model_id, height, width, frames in bench_sizes():
        f = step_flops(model_id, height, width, frames)
        extra = f"{f.text_tokens}" + (f" + {f.image_tokens}" if f.image_tokens else "")
        lines.append(
            f"| {model_id} | {width}x{height}x{frames} | {f.video_tokens} + {extra} | {f.passes} | "
            f"{f.total / 1e12:.0f} ({f.linear * f.passes / 1e12:.0f}, {f.attention * f.passes / 1e12:.0f}, "
            f"{f.other * f.passes / 1e12:.1f}) | {f.bound_s():.2f} s | "
            f"{f.bound_s(H200_FP8_TFLOPS, H200_BF16_TFLOPS):.2f} s | {f.bound_s(H200_FP8_TFLOPS):.2f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown_table())
