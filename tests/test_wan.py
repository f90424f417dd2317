"""The loop sampler on Wan pipelines: (B, C, T, H, W) layout, two transformer calls per step, flow matching,
the rotary module's NTK scaling, windows, two experts, per-token timesteps and I2V conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from loopui.engine.families import family_for
from loopui.engine.families.wan import scaled_wan_rope

from tiny_wan import build_tiny_wan

SMALL = dict(prompt="waves rolling onto a beach", height=32, width=32, num_frames=21, num_inference_steps=4,
             guidance_scale=5.0, seam_polish="off")  # the exact trajectory; polish is tested on its own


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan()


@pytest.fixture(scope="module")
def wan_i2v():
    return build_tiny_wan(image_to_video=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    return (np.stack([xx / 32, yy / 32, 0.5 + 0.5 * np.sin(xx / 5)], axis=-1) * 255).astype(np.uint8)


class Recorder:
    """Wraps a transformer forward: records hidden states, timesteps and the text embeddings of every call."""

    def __init__(self, module, probe=None) -> None:
        self.module = module
        self.original = module.forward
        self.probe = probe
        self.calls: list[dict] = []

    def __enter__(self):
        def forward(**kwargs):
            call = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            if self.probe is not None:
                call["probe"] = self.probe(kwargs["hidden_states"])
            self.calls.append(call)
            return self.original(**kwargs)

        self.module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self.module.forward


def test_family_and_spec_of_a_wan_pipeline(wan):
    from loopui.models.registry import spec_for_pipeline

    family = family_for(wan)
    assert (family.name, family.time_dim, family.channel_dim, family.flow_matching) == ("wan", 2, 1, True)
    spec = spec_for_pipeline(wan)
    assert (spec.family, spec.trained_latent_frames, spec.temporal_compression, spec.spatial_compression) == (
        "wan", 21, 4, 8)
    assert spec.native_fps == 16 and spec.rotary and not spec.image_to_video


def test_skip_zero_is_exactly_the_stock_wan_pipeline(wan):
    stock = wan(prompt=SMALL["prompt"], height=32, width=32, num_frames=21, num_inference_steps=4,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="latent").frames
    loop = generate_loop(wan, LoopRequest(**SMALL, seed=5, shift_skip=0), output_type="latent")
    assert loop.latents.shape == (1, 16, 6, 4, 4)  # (B, C, T, h, w)
    assert torch.equal(stock.float(), loop.latents)


def _reference_wan_mobius(pipe, prompt: str, steps: int, seed: int, skip: int, length: int,
                          guidance: float = 5.0) -> torch.Tensor:
    """Latent shift written out independently for Wan's layout: time on dim 2, conditional then unconditional
    transformer call, guidance, roll back, flow-matching UniPC step; the offset advances once per step."""
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = pipe.encode_prompt(prompt, None, do_classifier_free_guidance=True, max_sequence_length=512,
                                      device=torch.device("cpu"))  # the pipeline pads to 512 tokens
    pipe.scheduler.set_timesteps(steps, device="cpu")
    latents = torch.randn((1, 16, length, 4, 4), generator=generator, dtype=torch.float32)
    offset = 0
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            rolled = torch.cat([latents[:, :, offset:], latents[:, :, :offset]], dim=2)
            c = pipe.transformer(hidden_states=rolled, timestep=t.expand(1), encoder_hidden_states=cond,
                                 return_dict=False)[0]
            u = pipe.transformer(hidden_states=rolled, timestep=t.expand(1), encoder_hidden_states=uncond,
                                 return_dict=False)[0]
            pred = u + guidance * (c - u)
            pred = torch.cat([pred[:, :, length - offset:], pred[:, :, :length - offset]], dim=2)
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
            offset = (offset + skip) % length
    return latents


def test_default_trajectory_equals_the_reference_for_wans_layout(wan):
    with Recorder(wan.transformer) as rec:
        result = generate_loop(wan, LoopRequest(**{**SMALL, "num_inference_steps": 5}, seed=3), output_type="latent")
    assert result.settings["shift_skip"] == 1  # L = 6: the coprime skip nearest 3 is 1 (5 is farther; 2, 3, 4 share)
    reference = _reference_wan_mobius(wan, SMALL["prompt"], steps=5, seed=3, skip=1, length=6)
    torch.testing.assert_close(result.latents, reference.float(), rtol=1e-5, atol=1e-5)
    # Two calls per step (CFG), both with the same rotation: the offset advances per step, never per call.
    assert len(rec.calls) == 10 == result.settings["model_calls"]
    for step in range(5):
        first, second = rec.calls[2 * step], rec.calls[2 * step + 1]
        assert torch.equal(first["hidden_states"], second["hidden_states"])
        assert not torch.equal(first["encoder_hidden_states"], second["encoder_hidden_states"])


def test_odd_and_even_cycles_follow_the_reference(wan):
    for frames, length in ((25, 7), (29, 8)):
        result = generate_loop(wan, LoopRequest(**{**SMALL, "num_frames": frames, "num_inference_steps": 3},
                                                seed=2), output_type="latent")
        skip = result.settings["shift_skip"]
        reference = _reference_wan_mobius(wan, SMALL["prompt"], steps=3, seed=2, skip=skip, length=length)
        torch.testing.assert_close(result.latents, reference.float(), rtol=1e-5, atol=1e-5)


def test_rope_scaling_rebuilds_only_the_temporal_columns(wan):
    rope = wan.transformer.rope
    same = scaled_wan_rope(rope, 1.0)
    assert torch.equal(same.freqs_cos, rope.freqs_cos) and torch.equal(same.freqs_sin, rope.freqs_sin)
    scaled = scaled_wan_rope(rope, 2.0)
    t = rope.t_dim
    assert torch.equal(scaled.freqs_cos[:, t:], rope.freqs_cos[:, t:])
    theta = 10000 * 2.0 ** (t / (t - 2))
    freqs = 1.0 / theta ** (torch.arange(0, t, 2, dtype=torch.float64) / t)
    angles = torch.outer(torch.arange(rope.max_seq_len, dtype=torch.float64), freqs).repeat_interleave(2, dim=1)
    torch.testing.assert_close(scaled.freqs_cos[:, :t], angles.cos().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(scaled.freqs_sin[:, :t], angles.sin().float(), rtol=0, atol=1e-6)


def test_full_mode_past_the_trained_length_scales_rope_and_restores_it(wan):
    rope = wan.transformer.rope
    stock_cos = rope.freqs_cos
    with Recorder(wan.transformer, probe=lambda hs: rope(hs)[0]) as rec:
        # 97 frames = 25 latents > 21 trained: automatic RoPE scale 25 / 21, applied through the rope module.
        result = generate_loop(wan, LoopRequest(**{**SMALL, "num_frames": 97, "num_inference_steps": 2}),
                               output_type="latent")
    assert result.settings["rope_scale"] == pytest.approx(25 / 21)
    assert "forward" not in rope.__dict__ and rope.freqs_cos is stock_cos, "the stock tables are back"
    probe = torch.zeros(1, 16, 25, 4, 4)
    expected = scaled_wan_rope(rope, 25 / 21)(probe)[0]
    assert all(torch.equal(call["probe"], expected) for call in rec.calls)
    assert not torch.equal(rope(probe)[0], expected)


def test_window_mode_feeds_trained_length_windows_with_stock_rope(wan):
    with Recorder(wan.transformer) as rec:
        result = generate_loop(wan, LoopRequest(**{**SMALL, "num_frames": 121, "num_inference_steps": 2},
                                                window_mode="window"), output_type="latent")
    assert result.settings["rope_scale"] == 1.0 and result.latents.shape[2] == 31
    assert {call["hidden_states"].shape[2] for call in rec.calls} == {21}
    assert result.settings["model_calls"] == len(rec.calls)


def test_frame_invariant_decoding_plays_four_frames_per_latent(wan):
    result = generate_loop(wan, LoopRequest(**{**SMALL, "num_inference_steps": 2}))
    assert result.frames.shape == (24, 32, 32, 3)  # 6 latents x 4
    stock = generate_loop(wan, LoopRequest(**{**SMALL, "num_inference_steps": 2}, frame_invariant_decoding=False))
    assert stock.frames.shape[0] == 21 and stock.settings["num_output_frames"] == 21
    assert result.seam_ratio is not None and result.settings["fps"] == 16


def test_seam_polish_blends_rotations_at_the_big_low_noise_steps(wan):
    with Recorder(wan.transformer) as rec:
        result = generate_loop(wan, LoopRequest(**{**SMALL, "seam_polish": "fast"}), output_type="latent")
    # 4 UniPC steps at sigma 1, 0.9, 0.75, 0.5 (shift 3): the two below 0.85 are polished (chosen by noise level, not
    # by a fraction of the schedule): 4 steps x 2 CFG calls, plus one extra rotation per call at each of them.
    assert len(rec.calls) == 12 == result.settings["model_calls"]


def test_two_experts_are_both_wrapped():
    pipe = build_tiny_wan(experts=2)
    stock = pipe(prompt=SMALL["prompt"], height=32, width=32, num_frames=21, num_inference_steps=6,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    plain = generate_loop(pipe, LoopRequest(**{**SMALL, "num_inference_steps": 6}, seed=1, shift_skip=0),
                          output_type="latent")
    assert torch.equal(stock.float(), plain.latents)
    with Recorder(pipe.transformer) as high, Recorder(pipe.transformer_2) as low:
        result = generate_loop(pipe, LoopRequest(**{**SMALL, "num_inference_steps": 6}, seed=1),
                               output_type="latent")
    # The high-noise expert takes the steps above the boundary, the low-noise one the rest; both see the cycle.
    assert high.calls and low.calls
    assert result.settings["model_calls"] == len(high.calls) + len(low.calls) == 12
    assert not torch.equal(result.latents, plain.latents)
    assert "forward" not in pipe.transformer.__dict__ and "forward" not in pipe.transformer_2.__dict__


def test_per_token_timesteps_follow_the_windows():
    pipe = build_tiny_wan(expand_timesteps=True)
    with Recorder(pipe.transformer) as rec:
        generate_loop(pipe, LoopRequest(**{**SMALL, "num_frames": 101, "num_inference_steps": 2},
                                        window_mode="window"), output_type="latent")
    for call in rec.calls:
        frames = call["hidden_states"].shape[2]
        assert call["timestep"].shape == (1, frames * 2 * 2)  # one timestep per token of the clip


def test_wan_refuses_knobs_it_cannot_use(wan):
    for bad, needle in ((dict(use_dynamic_cfg=True), "use_dynamic_cfg"), (dict(scheduler="ddim"), "scheduler"),
                        (dict(height=40), "multiple of 16")):
        with pytest.raises(ValueError, match=needle):
            generate_loop(wan, LoopRequest(**{**SMALL, **bad}), output_type="latent")
    assert generate_loop(wan, LoopRequest(**SMALL, scheduler="euler", flow_shift=5.0),
                         output_type="latent").settings["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"


def test_flow_shift_rebuilds_the_pipelines_own_scheduler(wan):
    result = generate_loop(wan, LoopRequest(**SMALL, flow_shift=7.0), output_type="latent")
    assert result.settings["scheduler_class"] == "UniPCMultistepScheduler" and result.settings["flow_shift"] == 7.0
    assert wan.scheduler.config.flow_shift == 3.0  # the pipeline's own is left alone


@pytest.mark.parametrize("requested", [None, "euler"])
def test_a_flow_match_euler_scheduler_follows_flow_shift(wan, requested):
    """FlowMatchEuler keeps its shift under the config key ``shift`` (UniPC: ``flow_shift``): an Euler swapped into
    the pipeline, or asked for by name, samples at the shift the sidecar records."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    own = wan.scheduler
    wan.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    try:
        with Recorder(wan.transformer) as rec:
            result = generate_loop(wan, LoopRequest(**SMALL, flow_shift=8.0, scheduler=requested),
                                   output_type="latent")
        assert wan.scheduler.config.shift == 1.0  # the pipeline's own is left alone
    finally:
        wan.scheduler = own
    reference = FlowMatchEulerDiscreteScheduler(shift=8.0)
    reference.set_timesteps(4)
    expected = reference.timesteps.tolist()  # about [1000, 942, 804, 60]; unshifted [1000, 667, 334, 1]
    seen = [float(call["timestep"].flatten()[0]) for call in rec.calls[::2]]  # cond, uncond per step
    assert seen == pytest.approx(expected, abs=0.5)
    assert result.settings["flow_shift"] == 8.0
    assert result.settings["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"


# -- reference images ----------------------------------------------------------------------------------------------

def test_anchor_and_freeze_on_wans_layout(wan, image):
    reference = family_for(wan).encode_image(wan, __import__("loopui.media", fromlist=["x"]).load_reference_image(
        image, 32, 32), 32, 32, torch.device("cpu"), torch.float32)
    assert reference.shape == (1, 16, 1, 4, 4)
    anchored = generate_loop(wan, LoopRequest(**SMALL, image=image, anchor_strength=1.0), output_type="latent")
    torch.testing.assert_close(anchored.latents[:, :, :1], reference, rtol=1e-5, atol=1e-5)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    frozen = generate_loop(wan, LoopRequest(**SMALL, image=image, mask=mask, mask_feather=0, anchor_strength=0.0,
                                            background_freeze=1.0), output_type="latent")
    background = frozen.latents[0, :, :, :, 3:]  # latent column 3 = pixels 24..31, outside the mask
    assert torch.equal(background, background[:, :1].expand_as(background))
    moving = frozen.latents[0, :, :, :, :1]
    assert (moving - moving[:, :1]).abs().mean() > 1e-3


def test_init_strength_skips_model_calls_on_wan(wan, image):
    with Recorder(wan.transformer) as rec:
        result = generate_loop(wan, LoopRequest(**{**SMALL, "num_inference_steps": 10}, image=image,
                                                anchor_strength=0.0, init_strength=0.6), output_type="latent")
    assert len(rec.calls) == 2 * 6 == result.settings["model_calls"]
    assert torch.isfinite(result.latents).all()


def test_wan_i2v_condition_stays_at_clip_position_zero(wan_i2v, image):
    with Recorder(wan_i2v.transformer) as rec:
        generate_loop(wan_i2v, LoopRequest(**{**SMALL, "num_inference_steps": 4}, image=image, anchor_strength=0.0),
                      output_type="latent")
    assert rec.calls[0]["hidden_states"].shape[1] == 36  # 16 noisy + 4 mask + 16 condition latents
    first = rec.calls[0]["hidden_states"][:, 16:]
    for step in range(4):
        call = rec.calls[2 * step]["hidden_states"]
        mask = call[:, 16:20]
        assert torch.equal(mask, first[:, :4]), "the mask marks clip position 0 at every call"
        assert torch.equal(call[:, 20:, 1:], first[:, 4:, 1:]), "positions past 0 keep the pipeline's condition"
        if step == 0:
            assert torch.equal(call[:, 20:, :1], first[:, 4:, :1])
        else:  # skip 1: cycle latent `step` leads the clip, and its clean estimate fills the condition
            assert not torch.equal(call[:, 20:, :1], first[:, 4:, :1])


def test_wan_i2v_roll_policy_moves_the_condition_with_its_latent(wan_i2v, image):
    with Recorder(wan_i2v.transformer) as rec:
        generate_loop(wan_i2v, LoopRequest(**{**SMALL, "num_inference_steps": 3}, image=image, anchor_strength=0.0,
                                           image_channel="roll"), output_type="latent")
    first = rec.calls[0]["hidden_states"][:, 16:]
    for step in range(3):
        call = rec.calls[2 * step]["hidden_states"][:, 16:]
        torch.testing.assert_close(call, torch.roll(first, shifts=-step, dims=2), rtol=0, atol=0)
