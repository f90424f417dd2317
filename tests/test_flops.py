"""The FLOP count per denoising step and the H200 bound it sets (loopui/testing/flops.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopui.testing.flops import (H200_BF16_TFLOPS, H200_FP8_TFLOPS, counted_pass_flops, markdown_table,
                                  stack_bound_s, step_flops)

ROOT = Path(__file__).resolve().parents[1]
WAN_SMALL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@pytest.mark.parametrize("model_id, height, width, frames, bound_s", [
    (WAN_SMALL, 480, 832, 81, 0.57),
    ("THUDM/CogVideoX-2b", 480, 720, 49, 0.24),
    ("THUDM/CogVideoX-5b", 480, 720, 49, 0.67),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 704, 1280, 121, 1.05),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81, 3.39),
])
def test_the_issues_bf16_bounds_are_reproduced(model_id, height, width, frames, bound_s):
    flops = step_flops(model_id, height, width, frames)
    assert flops.bound_s() == pytest.approx(bound_s, rel=0.05)
    assert flops.passes == 2  # classifier-free guidance: every registry model runs the transformer twice a step


def test_fp8_bound_of_14b_at_480p_and_what_fp8_linear_layers_alone_reach():
    flops = step_flops("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81)
    assert flops.bound_s(H200_FP8_TFLOPS) == pytest.approx(1.70, rel=0.05)  # the issue's figure: all FP8
    # torchao's FP8 quantizes the linear layers only; attention (over half the FLOPs at 33k tokens) stays bf16
    assert flops.attention > flops.linear
    assert stack_bound_s(flops, "fp8", "native") == pytest.approx(2.60, rel=0.01)
    assert stack_bound_s(flops, "fp8", "sage") == pytest.approx(flops.bound_s(H200_FP8_TFLOPS))
    assert stack_bound_s(flops, "int8", "flash3") == pytest.approx(flops.bound_s(H200_BF16_TFLOPS))


def test_token_counts_follow_each_familys_geometry():
    wan = step_flops(WAN_SMALL)  # 21 latent frames x 60 x 104 latents, patches 1x2x2
    assert (wan.video_tokens, wan.text_tokens, wan.image_tokens) == (21 * 30 * 52, 512, 0)
    ti2v = step_flops("Wan-AI/Wan2.2-TI2V-5B-Diffusers")  # 16x spatial VAE: 31 x 44 x 80 latents
    assert ti2v.video_tokens == 31 * 22 * 40
    i2v = step_flops("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")  # CLIP ViT-H/14 at 224: 16 x 16 patches + class token
    assert i2v.image_tokens == 257 and i2v.cross_attention > step_flops(
        "Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81).cross_attention
    cog = step_flops("THUDM/CogVideoX-5b")  # joint attention over video + 226 text tokens, no cross-attention
    assert cog.video_tokens == 13 * 30 * 45 and cog.text_tokens == 226 and cog.cross_attention == 0
    d = 48 * 64
    assert cog.self_attention == 42 * 4 * (cog.video_tokens + 226) ** 2 * d


@pytest.mark.parametrize("model_id", [
    WAN_SMALL,
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",  # image tokens: added k/v projections and a second attention
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",  # per-token timesteps (expand_timesteps)
    "THUDM/CogVideoX-2b",  # no rotary embedding
    "THUDM/CogVideoX-5b-I2V",  # learned positions, 32 input channels
])
def test_the_count_equals_torchs_flop_counter_on_the_diffusers_module(model_id):
    # the real width and native size, two blocks (the count per block does not depend on the depth)
    depth = {"num_layers": 2}
    assert step_flops(model_id, transformer_overrides=depth).per_pass == counted_pass_flops(
        model_id, transformer_overrides=depth)


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="^model_id: "):
        step_flops("someone/unknown-model")
    with pytest.raises(ValueError, match="^height/width: "):
        step_flops(WAN_SMALL, 488, 832, 81)


def test_the_committed_bound_table_is_the_generated_one():
    assert (ROOT / "docs" / "flop_bound.md").read_text() == markdown_table()
