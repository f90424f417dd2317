"""The papers' loop metrics (loopui.media.scores), the CLIP embedder, video reading and the scores on results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from loopui.media import SCORE_KEYS, VideoInputError, export_video, format_scores, load_video, loop_scores
from loopui.media.flow import dynamic_degree, motion_smoothness
from loopui.media.scores import (
    clip_scores,
    first_last_mse,
    first_last_ssim,
    frame_ssim,
    mse_f0,
    ssim_motion,
)

H, W = 96, 144


def texture(seed: int = 0, width: int = 4 * W) -> np.ndarray:
    """A smooth random RGB texture, 0..255 float, ``(H, width, 3)``."""
    rng = np.random.default_rng(seed)
    t = gaussian_filter(rng.random((H, width, 3)), (3, 3, 0))
    return (t - t.min()) / (t.max() - t.min()) * 255.0


def panning(num_frames: int, speed: float, jitter: float = 0.0, period: int | None = None,
            seed: int = 0) -> np.ndarray:
    """Frames of a window sliding over a texture at ``speed`` px/frame (odd frames pushed by ``jitter``). With
    ``period`` the texture repeats every ``speed * period`` pixels, so the clip loops exactly."""
    tex = texture(seed, width=round(speed * period) if period else 4 * W + round(speed * num_frames) + 8)
    out = []
    for t in range(num_frames):
        xs = (np.arange(W) + speed * t + jitter * (t % 2)) % tex.shape[1]
        i0 = np.floor(xs).astype(int)
        frac = (xs - i0)[None, :, None]
        out.append(np.round(tex[:, i0] * (1 - frac) + tex[:, (i0 + 1) % tex.shape[1]] * frac).astype(np.uint8))
    return np.stack(out)


# -- pixel metrics ------------------------------------------------------------------------------------------------

def test_first_last_mse_and_ssim_of_known_frames() -> None:
    frames = panning(6, 2.0)
    last = np.clip(frames[0].astype(int) + 10, 0, 255).astype(np.uint8)
    frames[-1] = last
    expected = np.mean((last.astype(float) - frames[0].astype(float)) ** 2)
    assert first_last_mse(frames) == pytest.approx(expected) and 90 < expected <= 100
    frames[-1] = frames[0]
    assert first_last_mse(frames) == 0.0 and first_last_ssim(frames) == pytest.approx(1.0)


def test_ssim_of_flat_frames_matches_wang_et_al() -> None:
    # Two flat grey frames: the contrast-structure term is C2 / C2 = 1, SSIM = (2ab + C1) / (a^2 + b^2 + C1) with
    # C1 = (0.01 * 255)^2 (Wang et al. 2004 on 0..255). A wrong data range or K1 changes the number.
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    got = frame_ssim(np.full((32, 32, 3), a, np.uint8), np.full((32, 32, 3), b, np.uint8))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        frame_ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_ssim_motion_is_zero_when_still_and_grows_with_speed() -> None:
    still = np.repeat(panning(1, 0.0), 5, axis=0)
    assert ssim_motion(still) == pytest.approx(0.0, abs=1e-9)
    slow, fast = ssim_motion(panning(5, 1.0)), ssim_motion(panning(5, 6.0))
    assert 0 < slow < fast < 1


def test_mse_f0_fits_the_reference_like_generation_does(tmp_path: Path) -> None:
    frames = panning(4, 2.0)
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    assert mse_f0(frames, tmp_path / "ref.png") == 0.0
    assert mse_f0(frames, frames[0]) == 0.0
    # A reference twice the size with extra width is scaled to cover and centre-cropped, as for generation.
    big = np.asarray(Image.fromarray(frames[0]).resize((2 * W, 2 * H), Image.Resampling.LANCZOS))
    wide = np.concatenate([np.zeros((2 * H, 40, 3), np.uint8), big, np.zeros((2 * H, 40, 3), np.uint8)], axis=1)
    assert mse_f0(frames, wide) < 20.0  # only resampling error remains
    other = panning(1, 0.0, seed=5)[0]
    assert mse_f0(frames, other) == pytest.approx(np.mean((frames[0].astype(float) - other) ** 2))


# -- flow metrics -------------------------------------------------------------------------------------------------

def _linear_blend_smoothness(frames: np.ndarray) -> float:
    """VBench's recipe with the crudest interpolator (the mean of the two neighbours), for comparison."""
    f = frames.astype(float)
    errors = [np.mean(np.abs(np.round((f[t - 1] + f[t + 1]) / 2) - f[t])) for t in range(1, len(f) - 1, 2)]
    return (255 - np.mean(errors)) / 255


def test_motion_smoothness_follows_the_motion_not_just_the_change() -> None:
    steady = panning(9, 3.0)
    jittery = panning(9, 3.0, jitter=4.0)
    assert motion_smoothness(np.repeat(steady[:1], 5, axis=0)) == 1.0
    smooth = motion_smoothness(steady)
    assert smooth > 0.99  # steady motion is re-created almost exactly by warping along the flow
    assert smooth > _linear_blend_smoothness(steady) + 0.01  # which blending the neighbours cannot do
    assert motion_smoothness(jittery) < smooth - 0.02
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(steady[:2])


def test_dynamic_degree_thresholds_as_vbench() -> None:
    # Magnitudes are reported at a 256-pixel short side: 1 px/frame at a 96-pixel short side is 2.67.
    moving, magnitude = dynamic_degree(panning(9, 1.0), fps=8)
    assert not moving and magnitude == pytest.approx(256 / H, rel=0.1)
    moving, magnitude = dynamic_degree(panning(9, 3.0), fps=8)  # 8 px at 256: over VBench's 6
    assert moving and magnitude == pytest.approx(3 * 256 / H, rel=0.1)
    assert not dynamic_degree(panning(9, 3.0), fps=4)[0]  # under 8 fps the threshold grows: 6 * 8 / 4 = 12
    # At 24 fps every third frame is used, so the same per-frame speed moves three times as far per pair.
    assert dynamic_degree(panning(25, 1.0), fps=24)[1] == pytest.approx(3 * 256 / H, rel=0.1)
    assert dynamic_degree(np.repeat(panning(1, 0.0), 4, axis=0)) == (False, 0.0)
    with pytest.raises(ValueError, match="fps"):
        dynamic_degree(panning(4, 1.0), fps=0)


# -- all at once --------------------------------------------------------------------------------------------------

def test_loop_scores_tell_a_loop_from_a_clip() -> None:
    loop = loop_scores(panning(10, 3.0, period=10), fps=8)  # the texture repeats once per cycle: a perfect loop
    clip = loop_scores(panning(10, 3.0), fps=8, flow=False)
    assert set(SCORE_KEYS) <= set(loop) and (loop["num_frames"], loop["height"], loop["width"]) == (10, H, W)
    assert loop["seam_ratio"] == pytest.approx(1.0, abs=0.1) and clip["seam_ratio"] > 1.5
    assert loop["first_last_mse"] < clip["first_last_mse"] / 2
    assert loop["first_last_ssim"] > clip["first_last_ssim"]
    assert loop["dynamic_degree"] == 1.0 and loop["motion_smoothness"] > 0.98
    assert loop["mse_f0"] is None and loop["clip_score"] is None  # no reference, no CLIP


def test_loop_scores_skip_what_cannot_be_measured() -> None:
    tiny = panning(4, 1.0)[:, :8, :8]
    scores = loop_scores(tiny, reference=tiny[0])
    assert scores["first_last_ssim"] is None and scores["ssim_motion"] is None  # under SSIM's 11x11 window
    assert scores["motion_smoothness"] is None and scores["dynamic_degree"] is None
    assert scores["mse_f0"] == 0.0 and scores["first_last_mse"] >= 0
    fast = loop_scores(panning(5, 2.0), flow=False)
    assert fast["motion_smoothness"] is None and fast["ssim_motion"] is not None
    for bad in (panning(1, 1.0), np.zeros((4, 16, 16), np.uint8)):
        with pytest.raises(ValueError):
            loop_scores(bad)
    with pytest.raises(ValueError, match="fps"):
        loop_scores(panning(4, 1.0), fps=math.nan)


def test_format_scores_is_one_compact_line() -> None:
    scores = loop_scores(panning(6, 2.0), reference=panning(6, 2.0)[0], flow=False)
    line = format_scores(scores)
    assert "\n" not in line and line.startswith(f"first/last MSE {scores['first_last_mse']:.2f} · ")
    assert "MSE_F0 0.00" in line and "CLIP" not in line and "seam" not in line


# -- CLIP ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    from loopui.models import load_clip

    return load_clip(tiny_clip_dir, device="cpu")


def test_clip_embeddings_are_unit_vectors(clip) -> None:
    frames = panning(3, 5.0)
    e = clip.embed_images(frames)
    assert e.shape == (3, 8) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(e[0], e[2])
    t = clip.embed_text("ocean waves at sunset")
    assert t.shape == (8,) and np.linalg.norm(t) == pytest.approx(1.0, abs=1e-5)


def test_clip_scores_match_the_models_own_forward(clip, tiny_clip_dir) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    frames = panning(4, 8.0)
    prompt = "a koi pond, ripples"
    scores = clip_scores(frames, clip, prompt=prompt, reference=frames[0])
    # Independently: CLIPModel's forward gives logit_scale * cosine for every (frame, prompt) pair.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip_dir)(images=list(frames), return_tensors="pt")
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels["pixel_values"])
        cosine = (out.logits_per_image[:, 0] / model.logit_scale.exp()).numpy()
    assert scores["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cosine, 0))), rel=1e-4)
    image_embeds = torch.nn.functional.normalize(out.image_embeds, dim=-1).numpy()
    assert scores["frame_consistency"] == pytest.approx(float(np.mean(np.sum(image_embeds[:-1] * image_embeds[1:],
                                                                             axis=1))), abs=1e-5)
    assert scores["first_last_clip"] == pytest.approx(float(image_embeds[0] @ image_embeds[-1]), abs=1e-5)
    assert scores["clip_i"] == pytest.approx(float(np.mean(image_embeds @ image_embeds[0])), abs=1e-5)


def test_clip_metrics_join_loop_scores(clip) -> None:
    frames = np.repeat(panning(1, 0.0), 4, axis=0)
    scores = loop_scores(frames, reference=frames[0], prompt="a still texture", clip=clip, flow=False)
    assert scores["frame_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert scores["first_last_clip"] == pytest.approx(1.0, abs=1e-5)
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5) and scores["clip_score"] is not None
    assert "CLIP score" in format_scores(scores)


def test_load_clip_errors_are_one_line(tmp_path: Path) -> None:
    from loopui.models import ModelLoadError, load_clip

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load CLIP model .*empty") as info:
        load_clip(tmp_path / "empty", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="no network"):  # the suite runs with HF_HUB_OFFLINE=1
        load_clip("loopui-tests/no-such-clip", device="cpu")


# -- reading videos -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, fps", [(".mp4", 12), (".gif", 10), (".webp", 8)])
def test_load_video_reads_frames_and_fps(tmp_path: Path, suffix: str, fps: int) -> None:
    frames = panning(6, 2.0)
    path = export_video(frames, tmp_path / f"clip{suffix}", fps=fps)
    got, got_fps = load_video(path)
    assert got.shape == frames.shape and got.dtype == np.uint8
    assert got_fps == pytest.approx(fps, rel=0.02)


def test_load_video_bad_inputs_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a\x00")
    path = export_video(panning(6, 2.0), tmp_path / "ok.gif", fps=8)
    cases = [(tmp_path / "missing.mp4", "not found"), (tmp_path, "not a file"),
             (tmp_path / "text.mp4", "cannot read"), (tmp_path / "bad.gif", "cannot read")]
    for bad, needle in cases:
        with pytest.raises(VideoInputError, match=needle) as info:
            load_video(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(VideoInputError, match="GiB once decoded"):
        load_video(path, max_bytes=H * W * 3 * 2)


# -- on results ---------------------------------------------------------------------------------------------------

def test_generate_loop_fills_the_scores(tiny_i2v_pipe) -> None:
    from loopui.engine import LoopRequest, generate_loop
    from loopui.media import load_reference_image

    image = texture(3)[:, :W].astype(np.uint8)
    request = LoopRequest(prompt="a texture", image=image, num_frames=9, height=32, width=48, num_inference_steps=2,
                          guidance_scale=1.0, anchor_strength=1.0)
    result = generate_loop(tiny_i2v_pipe, request)
    scores, frames = result.scores, result.frames
    reference = np.asarray(load_reference_image(image, 48, 32), dtype=float)
    # The loop plays from its image (rotated by anchor_frame_shift); the wrap scores read the generated cycle, whose
    # last frame is followed by its first, MSE_F0 the frame it plays from.
    cycle = np.roll(frames, result.settings["anchor_frame_shift"], axis=0)
    assert scores["first_last_mse"] == pytest.approx(np.mean((cycle[0].astype(float) - cycle[-1]) ** 2))
    assert scores["mse_f0"] == pytest.approx(np.mean((frames[0].astype(float) - reference) ** 2))
    assert scores["seam_ratio"] == pytest.approx(result.seam_ratio)
    assert scores["cycle_ratio"] == pytest.approx(result.cycle_ratio)
    assert scores["ssim_motion"] == pytest.approx(ssim_motion(cycle))
    assert scores["motion_smoothness"] is None  # the flow metrics are left to `loopui score` (seconds per loop)
