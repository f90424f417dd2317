"""What reference-image loops promise (issue 11): the image is frame 0, a frozen background is pixel-still, I2V
draws its randomness in the stock pipeline's order and anchors to the latent the model sees, DPM keeps its history
consistent with the pulled latents, and the frame count is the decoded one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from loopui.engine.decode import video_to_uint8
from loopui.engine.families import family_for
from loopui.media import export_video, load_reference_image, read_video

from tiny_wan import build_tiny_wan

H, W = 64, 96
BASE = dict(prompt="a flag waving in the wind", height=H, width=W, num_inference_steps=4, seed=3,
            seam_polish="off")


@pytest.fixture(scope="module")
def image(flag_image):
    return flag_image


def _decoded_reference(pipe, image) -> np.ndarray:
    family = family_for(pipe)
    reference = family.encode_image(pipe, load_reference_image(image, W, H), H, W, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return video_to_uint8(pipe, family.decode(pipe, reference))[0].astype(np.float32)


def _errors(frames: np.ndarray, still: np.ndarray) -> list[float]:
    return [float(np.mean((f.astype(np.float32) - still) ** 2)) for f in frames]


# -- frame 0 is the image -------------------------------------------------------------------------------------------

def test_frame_zero_is_the_anchored_image(tiny_pipe, image):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, num_frames=49, image=image, anchor_strength=1.0))
    errors = _errors(result.frames, _decoded_reference(tiny_pipe, image))
    assert int(np.argmin(errors)) == 0, [round(e, 1) for e in errors[:6]]
    assert result.settings["anchor_frame_shift"] in range(4) and result.frames.shape[0] == 52
    assert result.scores["mse_f0"] is not None  # LoopAnimate's MSE_F0, against the reference image


def test_frame_zero_rotation_on_wan_picks_the_anchored_latents_closest_frame(image):
    pipe = build_tiny_wan()
    result = generate_loop(pipe, LoopRequest(**BASE, num_frames=21, image=image, anchor_strength=1.0))
    errors = _errors(result.frames, _decoded_reference(pipe, image))
    assert errors[0] == min(errors[:4]) or errors[0] <= min(errors[-3:])  # the best of the anchored latent's frames
    shift = result.settings["anchor_frame_shift"]
    unrotated = np.roll(result.frames, shift, axis=0)
    assert shift == int(np.argmin(_errors(unrotated[:4], _decoded_reference(pipe, image))))


def test_text_only_loops_are_not_rotated(tiny_pipe):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, num_frames=25))
    assert result.settings["anchor_frame_shift"] == 0


# -- a frozen background does not move -----------------------------------------------------------------------------

def test_frozen_background_is_pixel_still_and_stays_so_in_the_files(tiny_pipe, image, left_half_mask, tmp_path):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, num_frames=25, image=image, mask=left_half_mask, mask_feather=4,
                                                  anchor_strength=0.0, background_freeze=1.0))
    frames = result.frames
    outside = frames[:, :, W // 2 + 8:]  # beyond the feathered edge
    assert np.array_equal(outside, np.broadcast_to(outside[:1], outside.shape)), "identical in every frame"
    inside = frames[:, :, : W // 2 - 8].astype(int)
    assert np.abs(inside - inside[:1]).mean() > 0.5, "the masked half still moves"
    gif = np.asarray(read_video(export_video(frames, tmp_path / "loop.gif", fps=8)))
    region = gif[:, :, W // 2 + 8:]
    assert np.array_equal(region, np.broadcast_to(region[:1], region.shape)), "GIF: one palette, no dithering"
    for suffix in (".webp", ".mp4"):  # lossy codecs: within their tolerance
        back = np.asarray(read_video(export_video(frames, tmp_path / f"loop{suffix}", fps=8))).astype(int)
        region = back[:, :, W // 2 + 8:]
        assert np.abs(region - region[:1]).max() <= 12, suffix


# -- I2V draws in the stock pipeline's order and anchors to what the model sees ------------------------------------

def _first_calls(pipe, run) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = pipe.transformer.forward

    def recorder(**kwargs):
        seen.append(kwargs["hidden_states"].detach().clone())
        return original(**kwargs)

    pipe.transformer.forward = recorder
    try:
        run()
    finally:
        del pipe.transformer.forward
    return seen


def test_i2v_init_strength_sees_the_stock_image_latent_and_noise(tiny_i2v_pipe, image):
    from loopui.engine.noise import noised

    pipe = tiny_i2v_pipe
    request = LoopRequest(**{**BASE, "height": 32, "width": 48, "num_inference_steps": 5}, num_frames=49,
                          image=image, anchor_strength=0.0, init_strength=0.6, shift_skip=0)
    stock = _first_calls(pipe, lambda: pipe(prompt=request.prompt, image=load_reference_image(image, 48, 32),
                                            height=32, width=48, num_frames=49, num_inference_steps=5,
                                            guidance_scale=6.0, generator=torch.Generator().manual_seed(3),
                                            output_type="latent"))
    ours = _first_calls(pipe, lambda: generate_loop(pipe, request, output_type="latent"))
    assert len(ours) == 5 - 2  # floor((1 - 0.6) * 5) = 2 steps replaced by the noised image
    # The image latent the model is conditioned on is the stock pipeline's (sampled with the same generator draws).
    assert torch.equal(ours[0][:, :, 4:], stock[0][:, :, 4:])
    # The start builds on the stock pipeline's own noise: at step 2 the cycle is the image latent noised with it.
    scheduler = pipe.scheduler
    scheduler.set_timesteps(5)
    family = family_for(pipe)
    expected = noised(stock[0][:1, :1, 4:], stock[0][:1, :, :4], family.level(scheduler, 2))
    torch.testing.assert_close(ours[0][:1, :, :4], expected, rtol=1e-5, atol=1e-5)


def test_i2v_anchor_is_the_latent_the_model_is_conditioned_on(tiny_i2v_pipe, image):
    pipe = tiny_i2v_pipe
    request = LoopRequest(**{**BASE, "height": 32, "width": 48}, num_frames=49, image=image, anchor_strength=1.0)
    seen = _first_calls(pipe, lambda: None)
    result = None

    def run():
        nonlocal result
        result = generate_loop(pipe, request, output_type="latent")

    seen = _first_calls(pipe, run)
    conditioned_on = seen[0][:1, :1, 4:]
    torch.testing.assert_close(result.latents[:, :1], conditioned_on, rtol=1e-5, atol=1e-5)
    mode = family_for(pipe).encode_image(pipe, load_reference_image(image, 48, 32), 32, 48, torch.device("cpu"),
                                         torch.float32)
    assert not torch.allclose(mode, conditioned_on, atol=1e-4), "the model sees a sample, not the mode"


# -- DPM: the solver's history follows the pulled latents ----------------------------------------------------------

def test_dpm_history_is_pulled_like_the_latents(tiny_pipe, image):
    scheduler = tiny_pipe.scheduler
    calls: list[dict] = []

    def spy(model_output, old_pred_original_sample, timestep, timestep_back, sample, **kwargs):
        out = original(model_output, old_pred_original_sample, timestep, timestep_back, sample, **kwargs)
        calls.append({"old": None if old_pred_original_sample is None else old_pred_original_sample.clone(),
                      "x0": out[1].clone()})
        return out

    from loopui.engine.families.cogvideox import CogVideoXFamily

    dpm = CogVideoXFamily().build_scheduler("dpm", scheduler.config, None)
    original = dpm.step
    dpm.step = spy
    reference = family_for(tiny_pipe).encode_image(tiny_pipe, load_reference_image(image, W, H), H, W,
                                                   torch.device("cpu"), torch.float32)
    request = LoopRequest(**{**BASE, "num_inference_steps": 5}, num_frames=25, image=image, anchor_strength=0.5)
    from loopui.engine import loop as loop_module

    real_scheduler_for = loop_module._scheduler_for
    loop_module._scheduler_for = lambda *args: dpm
    try:
        generate_loop(tiny_pipe, request, output_type="latent")
    finally:
        loop_module._scheduler_for = real_scheduler_for
    assert len(calls) == 5 and calls[0]["old"] is None
    for previous, current in zip(calls[1:-1], calls[2:]):
        # Frame 0 was pulled halfway to the anchor after the step; the history the solver uses was pulled alike.
        expected = previous["x0"].clone()
        expected[:, :1] = torch.lerp(expected[:, :1], reference, 0.5)
        torch.testing.assert_close(current["old"], expected, rtol=1e-5, atol=1e-5)


# -- the frame count is the decoded one ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_frames", [45, 49])  # 12 and 13 latents: even and odd
def test_stock_decoding_reports_the_frames_it_returns(tiny_pipe, num_frames):
    result = generate_loop(tiny_pipe, LoopRequest(**{**BASE, "num_inference_steps": 1, "height": 32, "width": 48},
                                                  num_frames=num_frames, frame_invariant_decoding=False))
    assert result.settings["num_output_frames"] == result.frames.shape[0]


def test_skip_zero_with_an_image_is_stock_only_without_the_anchor(tiny_i2v_pipe, image):
    # generate_loop's promise "shift 0 = the stock pipeline" holds with an image only when no image control is in
    # play: the anchor is on (1) by default with an image, and then frame 0 is pulled to the image.
    pipe = tiny_i2v_pipe
    size = dict(height=32, width=48, num_frames=49, num_inference_steps=3, guidance_scale=6.0)
    stock = pipe(prompt=BASE["prompt"], image=load_reference_image(image, 48, 32), **size,
                 generator=torch.Generator().manual_seed(3), output_type="latent").frames
    base = {**BASE, **size}
    plain = generate_loop(pipe, LoopRequest(**base, image=image, shift_skip=0, anchor_strength=0.0),
                          output_type="latent")
    assert torch.equal(stock.float(), plain.latents)
    anchored = generate_loop(pipe, LoopRequest(**base, image=image, shift_skip=0), output_type="latent")
    assert LoopRequest(prompt="x").anchor_strength == 1.0 and not torch.allclose(stock.float(), anchored.latents)
