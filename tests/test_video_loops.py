"""Loop your own clip (issue 12 §1): a video is resampled, encoded, noised to init_strength and denoised with the
latent shift so that it closes; loop_region holds the part away from the wrap to the clip; bad clips are one line."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from instrument import installed
from loopui.engine import LoopRequest, generate_loop
from loopui.engine.conditioning import wrap_hold
from loopui.engine.families import family_for
from loopui.media import loop_metrics, resample_clip

from tiny_wan import build_tiny_wan

H, W = 32, 48


def _clip(count: int = 30, height: int = 40, width: int = 60) -> np.ndarray:
    """A moving bright bar over a gradient: an ordinary clip that does not loop (it ends elsewhere than it starts)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(count):
        frame = np.stack([xx / width, yy / height, np.full_like(xx, 0.3)], -1)
        frame[:, (t * 2) % width:(t * 2) % width + 6] = [1.0, 1.0, 0.8]
        frames.append((frame * 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import imageio.v3 as iio

    path = tmp_path_factory.mktemp("clips") / "bar.mp4"
    # Written by imageio-ffmpeg directly, as another program would (not our exporter), at 12 fps.
    iio.imwrite(path, _clip(), plugin="FFMPEG", fps=12, codec="libx264", macro_block_size=2)
    return path


def test_a_clip_file_becomes_a_loop(tiny_pipe, clip_file):
    result = generate_loop(tiny_pipe, LoopRequest(prompt="a bar sliding", video=str(clip_file), height=H, width=W,
                                                  num_frames=17, num_inference_steps=4))
    assert result.frames.shape == (20, H, W, 3)  # 5 latents, frame-invariant: 4 frames each
    assert result.settings["init_strength"] == 0.7  # a clip's default
    assert result.settings["video"] == str(clip_file)
    assert result.settings["anchor_strength"] == 0.0  # the sidecar says what ran: no anchor with a clip
    assert result.seam_ratio is not None and np.isfinite(result.seam_ratio)


def test_resampling_keeps_the_clips_speed_and_covers_the_frame():
    frames, notes = resample_clip(_clip(count=40), 12.0, 17, 8.0, W, H)
    assert frames.shape == (17, H, W, 3)
    # 8 fps from a 12 fps clip: loop frame k is clip frame round(1.5 k).
    reference = resample_clip(_clip(count=40)[[round(1.5 * k) for k in range(17)]], 8.0, 17, 8.0, W, H)[0]
    assert np.array_equal(frames, reference)
    assert any("first 2.12 s" in n for n in notes)
    short, notes = resample_clip(_clip(count=10), 12.0, 17, 8.0, W, H)
    assert short.shape[0] == 17 and any("stretched" in n for n in notes)


@pytest.mark.parametrize("frames, fps, needle", [
    (_clip(count=3), 12.0, "3 frames; a loop needs at least 4"),
    (_clip(count=8), 0.0, "frame rate"),
    (_clip(count=8), float("inf"), "frame rate"),
    (_clip(count=8), 1000.0, "frame rate"),
    (np.zeros((8, 10, 10), np.uint8), 12.0, "expected uint8 frames"),
])
def test_bad_clips_are_one_line(frames, fps, needle):
    with pytest.raises(ValueError, match=needle):
        resample_clip(frames, fps, 17, 8.0, W, H)


def test_unreadable_clip_is_refused_before_denoising(tiny_pipe, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    calls = []
    original = tiny_pipe.transformer.forward
    tiny_pipe.transformer.forward = lambda **kw: calls.append(1) or original(**kw)
    try:
        for bad, needle in ((str(text), "cannot read"), (str(tmp_path / "missing.mp4"), "not found")):
            with pytest.raises(ValueError, match=needle) as info:
                generate_loop(tiny_pipe, LoopRequest(prompt="x", video=bad, height=H, width=W, num_frames=17,
                                                     num_inference_steps=2))
            assert "\n" not in str(info.value)
    finally:
        del tiny_pipe.transformer.forward
    assert calls == []


@pytest.mark.parametrize("length", [5, 7, 13, 21])
@pytest.mark.parametrize("loop_region", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_loop_region_is_the_share_of_the_cycle_around_the_wrap_that_may_change(length, loop_region):
    hold = wrap_hold(length, loop_region).tolist()
    free = min(length, max(1, int(loop_region * length + 0.5)))  # round(r L), halves up, at least one latent
    held = [k for k, h in enumerate(hold) if h == 1.0]
    assert len(held) == length - free
    # The free latents are the ones nearest the wrap (between latents L-1 and 0): the held ones are one run.
    assert held == list(range((free + 1) // 2, length - free // 2))
    assert hold[0] == 0.0 and (free < 2 or hold[-1] == 0.0), "the latents at the wrap are free from the start"
    # The change fades toward the held part: holds grow monotonically from the wrap to the held run.
    after, before = hold[: (free + 1) // 2], hold[length - free // 2:][::-1]
    assert after == sorted(after) and before == sorted(before) and max(after + before) < 1.0


def test_loop_region_holds_the_clip_away_from_the_wrap(tiny_pipe):
    clip = _clip(count=25, height=H, width=W)
    request = LoopRequest(prompt="a bar", video=clip, fps=8, height=H, width=W, num_frames=25,
                          num_inference_steps=5, init_strength=0.6, loop_region=0.5)
    result = generate_loop(tiny_pipe, request, output_type="latent")
    family = family_for(tiny_pipe)
    clip_latents = family.encode_video(tiny_pipe, list(resample_clip(clip, 8.0, 25, 8.0, W, H)[0]), H, W,
                                       torch.device("cpu"), torch.float32)
    # 7 latents, loop_region 0.5: round(3.5) = 4 around the wrap may change (0, 1, 5, 6), the other 3 are the clip's.
    difference = (result.latents - clip_latents)[0].flatten(1).abs().max(dim=1).values
    assert (difference < 1e-5).nonzero().flatten().tolist() == [2, 3, 4]
    assert difference[[0, 6]].min() > 1e-3, "the wrap's latents change"


def test_clip_loops_on_wan_and_on_an_image_to_video_model(tiny_i2v_pipe):
    clip = _clip(count=25, height=H, width=W)
    wan = build_tiny_wan()
    out = generate_loop(wan, LoopRequest(prompt="a bar", video=clip, height=H, width=W, num_frames=21,
                                         num_inference_steps=3), output_type="latent")
    assert out.latents.shape == (1, 16, 6, 4, 6) and torch.isfinite(out.latents).all()
    # An I2V model needs an image: without one, the clip's first frame conditions it.
    i2v = generate_loop(tiny_i2v_pipe, LoopRequest(prompt="a bar", video=clip, height=H, width=W, num_frames=17,
                                                   num_inference_steps=2), output_type="latent")
    assert torch.isfinite(i2v.latents).all()


def test_long_clip_in_window_mode_with_polish_and_a_mask(tiny_pipe):
    clip = _clip(count=80, height=H, width=W)
    mask = np.zeros((H, W), np.uint8)
    mask[:, : W // 2] = 255
    result = generate_loop(tiny_pipe, LoopRequest(prompt="a bar", video=clip, height=H, width=W, num_frames=61,
                                                  num_inference_steps=2, window_mode="window", seam_polish="fast",
                                                  mask=mask, mask_feather=0, background_freeze=1.0))
    assert result.frames.shape[0] == 4 * 16
    outside = result.frames[:, :, W // 2 + 8:]
    assert np.array_equal(outside, np.broadcast_to(outside[:1], outside.shape)), "only the masked region loops"


# -- the exact toy instrument: a plain (non-looping) sample given as the user's clip ---------------------------------

@functools.lru_cache(maxsize=None)
def _plain_clip(seed: int) -> torch.Tensor:
    pipe = _instrument_pipe()
    with installed(pipe):
        return generate_loop(pipe, LoopRequest(prompt="gp", num_frames=49, height=256, width=384, guidance_scale=1.0,
                                               seed=seed, shift_skip=0, seam_polish="off"),
                             output_type="latent").latents


@functools.lru_cache(maxsize=None)
def _instrument_pipe():
    from loopui.models.demo import build_tiny_cogvideox

    return build_tiny_cogvideox()


def clip_to_loop(seed: int, init_strength: float, loop_region: float = 1.0) -> dict:
    """The instrument's loop of a plain sample (latents in, latents out: the VAE is bypassed), with its seam and
    interior ratios and its distance to the clip, overall and inside the held part (relative mean |difference|)."""
    pipe = _instrument_pipe()
    plain = _plain_clip(seed)
    family = family_for(pipe)

    def encode(_pipe, frames, *args, **kwargs):  # the clip's latents are the plain sample itself
        return plain.clone() if len(frames) > 1 else plain[:, :1].clone()

    family.encode_video = encode
    try:
        with installed(pipe):
            result = generate_loop(pipe, LoopRequest(
                prompt="gp", video=np.zeros((49, 256, 384, 3), np.uint8), fps=8, num_frames=49, height=256,
                width=384, guidance_scale=1.0, seed=seed + 100, init_strength=init_strength, loop_region=loop_region),
                output_type="latent")
    finally:
        del family.encode_video
    metrics = loop_metrics(result.latents[0])
    scale = plain.abs().mean()
    held = wrap_hold(13, loop_region) == 1.0
    distance = float((result.latents - plain).abs().mean() / scale)
    held_distance = float((result.latents[:, held] - plain[:, held]).abs().mean() / scale) if held.any() else None
    # Measured, not read off the weights: the latents equal to the clip, and the steps joining them to changed ones.
    exact = ((result.latents - plain)[0].flatten(1).abs().max(dim=1).values < 1e-5).tolist()
    steps = (result.latents[0, 1:] - result.latents[0, :-1]).flatten(1).abs().mean(dim=1)
    joins = [float(steps[k]) / metrics.mean_step for k in range(12) if exact[k] != exact[k + 1]]
    return {"seam": float(metrics.seam_ratio), "interior": float(metrics.interior_ratio), "distance": distance,
            "held_distance": held_distance, "exactly_held": sum(exact), "join": max(joins, default=None)}


def test_instrument_plain_clip_comes_back_seamless_and_holds_its_middle():
    plain_seam = float(np.mean([loop_metrics(_plain_clip(s)[0]).seam_ratio for s in (0, 1, 2)]))
    assert plain_seam > 3.0  # the user's clip jumps at the wrap
    runs = [clip_to_loop(s, 0.7) for s in (0, 1, 2)]  # the default init strength for a clip
    assert np.mean([r["seam"] for r in runs]) <= 1.05 and np.mean([r["interior"] for r in runs]) <= 1.05
    assert np.mean([r["distance"] for r in runs]) < 1.2  # closer to the clip than an unrelated sample (~1.4)
    held = [clip_to_loop(s, 0.7, loop_region=0.5) for s in (0, 1, 2)]
    # loop_region 0.5 of 13 latents: round(6.5) = 7 around the wrap may change, the other 6 are the clip's.
    assert [r["exactly_held"] for r in held] == [6, 6, 6]
    assert max(r["held_distance"] for r in held) < 1e-5, "the held part is the clip"
    # No new seam where held and regenerated latents meet, nor at the wrap (a plain sample's own steps: ~1.03).
    assert np.mean([r["join"] for r in held]) <= 1.15
    assert np.mean([r["seam"] for r in held]) <= 1.2 and np.mean([r["interior"] for r in held]) <= 1.2
