"""Tests for loopui.media: seam metrics, export/read-back, sidecars, seam strips, reference images and masks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopui.media import (
    SUPPORTED_SUFFIXES,
    ImageInputError,
    LoopMetrics,
    export_video,
    load_mask_image,
    load_reference_image,
    loop_metrics,
    read_video,
    seam_ratio,
    seam_strip,
    write_sidecar,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers


def smooth_cycle(num_frames: int = 16, height: int = 16, width: int = 24) -> np.ndarray:
    """uint8 (T, H, W, 3) whose pixels move along sinusoids of one full period over the clip: a perfect loop."""
    phase = 2 * np.pi * np.arange(num_frames)[:, None, None, None] / num_frames
    # spatial phase offsets spread over the whole circle make every step (including the wrap) equally large
    offsets = np.linspace(0, 2 * np.pi, height * width * 3, endpoint=False).reshape(1, height, width, 3)
    return np.round(127.5 + 100 * np.sin(phase + offsets)).astype(np.uint8)


def ramp(num_frames: int = 16) -> np.ndarray:
    """Frames brighten by 10 per step, so the wrap jumps back by 10 * (T - 1)."""
    return np.broadcast_to(10 * np.arange(num_frames, dtype=np.uint8)[:, None, None, None], (num_frames, 8, 8, 3))


def gradient_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth, distinct frames that survive lossy codecs well (red: x, green: y, blue: time)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 255 * x // max(width - 1, 1)
        frames[t, ..., 1] = 255 * y // max(height - 1, 1)
        frames[t, ..., 2] = 40 * t
    return frames


def frame_durations(path: Path) -> tuple[int, list[int], int | None]:
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            durations.append(im.info["duration"])
        return im.n_frames, durations, im.info.get("loop")


# ---------------------------------------------------------------------------------------------------------------
# seam metrics


def test_smooth_cycle_has_seam_about_one() -> None:
    frames = smooth_cycle()
    ratio = seam_ratio(frames)
    assert 0.9 <= ratio <= 1.1
    m = loop_metrics(frames)
    assert m.seam_ratio == ratio
    assert 0.9 <= m.interior_ratio <= 1.1
    assert m.num_frames == 16


def test_wrap_jump_is_found() -> None:
    m = loop_metrics(ramp(16))
    assert m.seam_ratio == pytest.approx(15.0)
    assert m.seam_ratio > 3
    assert m.worst_step == (15, 0)
    assert m.interior_ratio == pytest.approx(1.0)
    assert m.mean_step == pytest.approx(10.0)
    assert m.wrap_step == pytest.approx(150.0)
    assert "largest jump between frames 15 and 0" in m.describe()


def test_interior_jump_is_found() -> None:
    # rolling the ramp moves its jump from the wrap to between frames 4 and 5
    frames = np.roll(ramp(16), 5, axis=0)
    m = loop_metrics(frames)
    assert m.worst_interior_step == (4, 5)
    assert m.worst_step == (4, 5)
    assert m.interior_ratio > 3
    assert m.seam_ratio < 1.1
    assert "between frames 4 and 5" in m.describe()


def test_latent_shaped_float_input() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 16, 8, 8)).astype(np.float32)
    num_frames = 12
    full = 2 * np.pi * np.arange(num_frames)[:, None, None, None] / num_frames
    latents = a * np.cos(full) + b * np.sin(full)  # (T, C, H, W)
    assert latents.shape == (12, 16, 8, 8)
    assert 0.9 <= seam_ratio(latents) <= 1.1
    # half a period: the wrap jumps from the far end straight back to the start
    half = np.pi * np.arange(num_frames)[:, None, None, None] / (num_frames - 1)
    m = loop_metrics(a * np.cos(half) + b * np.sin(half))
    assert m.seam_ratio > 3
    assert m.worst_step == (num_frames - 1, 0)


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    frames = ramp(8)
    t = torch.from_numpy(frames.astype(np.float32)).to(torch.bfloat16).requires_grad_(True)
    assert seam_ratio(t) == pytest.approx(seam_ratio(frames))


def test_uint8_differences_do_not_wrap_around() -> None:
    frames = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    frames[1] = 255
    # 0 -> 255 -> 0 -> (wrap) 0: with uint8 arithmetic 0 - 255 would wrap to 1
    m = loop_metrics(frames)
    assert m.mean_step == pytest.approx(255.0)
    assert m.wrap_step == 0.0


def test_static_clip() -> None:
    m = loop_metrics(np.full((5, 4, 4, 3), 7, dtype=np.uint8))
    assert m.seam_ratio == 1.0
    assert m.interior_ratio == 1.0


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        seam_ratio(np.zeros((1, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        seam_ratio(np.array([[0.0], [np.nan], [1.0]]))
    with pytest.raises(ValueError, match="dtype"):
        seam_ratio(np.array(["a", "b"]))


def test_metrics_to_dict_is_json_ready() -> None:
    d = loop_metrics(ramp(4)).to_dict()
    again = json.loads(json.dumps(d))
    assert again["worst_step"] == [3, 0]
    assert again["seam_ratio"] == pytest.approx(3.0)
    assert set(again) == set(LoopMetrics.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("height,width", [(32, 48), (33, 45)])
def test_mp4_roundtrip(tmp_path: Path, height: int, width: int) -> None:
    import imageio.v3 as iio

    frames = gradient_frames(6, height, width)
    path = export_video(frames, tmp_path / "out.mp4", fps=8)
    assert path == tmp_path / "out.mp4"
    back = read_video(path)
    # odd sizes are padded by one pixel to the next even size; even sizes are exact
    assert back.shape == (6, height + height % 2, width + width % 2, 3)
    assert np.abs(back[:, :height, :width].astype(int) - frames).mean() < 6  # colours survive (no RGB/BGR swap)
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(8.0)
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: index before media
    assert not list(tmp_path.glob("*partial*"))


def test_mp4_padding_repeats_the_edge(tmp_path: Path) -> None:
    frames = gradient_frames(4, 15, 21)
    back = read_video(export_video(frames, tmp_path / "odd.mp4", fps=10))
    assert back.shape[1:3] == (16, 22)
    assert np.abs(back[:, -1].astype(int) - back[:, -2]).mean() < 6
    assert np.abs(back[:, :, -1].astype(int) - back[:, :, -2]).mean() < 6


def test_mp4_probe_with_ffmpeg(tmp_path: Path) -> None:
    import imageio_ffmpeg

    path = export_video(gradient_frames(3, 16, 16), tmp_path / "probe.mp4", fps=12)
    # ffmpeg without an output prints the stream description to stderr and exits non-zero
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert "Video: h264" in probe.stderr
    assert "yuv420p" in probe.stderr


def test_gif_loops_with_exact_timing(tmp_path: Path) -> None:
    frames = gradient_frames(6, 16, 20)
    path = export_video(frames, tmp_path / "deep" / "dir" / "out.gif", fps=8)
    assert path.is_file()
    n, durations, loop = frame_durations(path)
    # One palette for all frames: frames equal after quantisation are merged by the encoder, their time kept.
    assert 4 <= n <= 6
    assert loop == 0
    assert set(durations) <= {120, 130, 250, 260}  # 125 ms cannot be stored in 10 ms ticks ...
    assert sum(durations) == 750  # ... but the total stays exact
    assert read_video(path).shape == (n, 16, 20, 3)


def test_gif_too_fast_is_capped(tmp_path: Path) -> None:
    _, durations, _ = frame_durations(export_video(gradient_frames(4, 8, 8), tmp_path / "fast.gif", fps=100))
    assert min(durations) >= 20


def test_webp_loops_with_exact_timing(tmp_path: Path) -> None:
    path = export_video(gradient_frames(6, 16, 20), tmp_path / "out.webp", fps=24)
    n, durations, loop = frame_durations(path)
    assert n == 6
    assert loop == 0
    assert set(durations) <= {41, 42}
    assert sum(durations) == 250
    assert read_video(path).shape == (6, 16, 20, 3)


def test_float_frames_are_scaled(tmp_path: Path) -> None:
    frames = gradient_frames(3, 8, 8)
    back = read_video(export_video(frames.astype(np.float32) / 255, tmp_path / "f.webp", fps=4))
    assert np.abs(back.astype(int) - frames).mean() < 6


def test_export_rejects_bad_input(tmp_path: Path) -> None:
    frames = gradient_frames(2, 8, 8)
    with pytest.raises(ValueError, match=r"\.mp4.*\.gif.*\.webp"):
        export_video(frames, tmp_path / "out.avi", fps=8)
    with pytest.raises(ValueError, match="no frames"):
        export_video(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "out.gif", fps=8)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        export_video(np.zeros((2, 8, 8), np.uint8), tmp_path / "out.gif", fps=8)
    with pytest.raises(ValueError, match="dtype int64"):
        export_video(frames.astype(np.int64), tmp_path / "out.gif", fps=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        export_video(frames.astype(np.float32), tmp_path / "out.gif", fps=8)  # 0..255 floats
    with pytest.raises(ValueError, match="fps"):
        export_video(frames, tmp_path / "out.gif", fps=0)
    assert list(tmp_path.iterdir()) == []


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == (".mp4", ".gif", ".webp")


def test_read_video_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "nope.mp4")


def test_write_sidecar(tmp_path: Path) -> None:
    metrics = loop_metrics(ramp(4))
    data = {"prompt": "a cat", "metrics": metrics, "scale": np.float32(0.5), "where": tmp_path}
    sidecar = write_sidecar(tmp_path / "clips" / "loop.mp4", data)
    assert sidecar == tmp_path / "clips" / "loop.json"
    back = json.loads(sidecar.read_text())
    assert back["prompt"] == "a cat"
    assert back["metrics"]["worst_step"] == [3, 0]
    assert back["scale"] == 0.5
    assert back["where"] == str(tmp_path)
    with pytest.raises(ValueError, match="json"):
        write_sidecar(tmp_path / "x.json", {})


def test_seam_strip_shows_the_wrap() -> None:
    frames = np.zeros((6, 4, 5, 3), dtype=np.uint8)
    frames[..., 0] = (10 * np.arange(6))[:, None, None]  # frame t is the colour 10 * t
    strip = seam_strip(frames, n=2)
    assert strip.shape == (4, 2 * 2 * 5 + 2, 3)
    shown = [int(strip[0, col, 0]) for col in (0, 5, 12, 17)]
    assert shown == [40, 50, 0, 10]
    assert tuple(strip[0, 10]) == (255, 0, 255)  # separator


def test_seam_strip_around_interior_and_cyclic() -> None:
    frames = np.zeros((8, 2, 3, 3), dtype=np.uint8)
    frames[..., 1] = (10 * np.arange(8))[:, None, None]
    strip = seam_strip(frames, n=3, around=(4, 5))
    left = [int(strip[0, 3 * i, 1]) for i in range(3)]
    right = [int(strip[0, 3 * 3 + 2 + 3 * i, 1]) for i in range(3)]
    assert left == [20, 30, 40]
    assert right == [50, 60, 70]
    strip = seam_strip(frames, n=2, around=(0, 7))
    assert [int(strip[0, c, 1]) for c in (0, 3, 8, 11)] == [70, 0, 70, 0]


def test_seam_strip_rejects_bad_arguments() -> None:
    frames = gradient_frames(4, 4, 4)
    with pytest.raises(ValueError, match="n must"):
        seam_strip(frames, n=5)
    with pytest.raises(ValueError, match="around"):
        seam_strip(frames, around=(0, 4))
    with pytest.raises(ValueError, match="around"):
        seam_strip(frames, around=(1,))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# reference images

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def bands(colours: list[tuple[int, int, int]], band: int, height: int, vertical: bool = True) -> np.ndarray:
    """Image of side-by-side colour bands, each `band` pixels wide (or tall when vertical=False)."""
    strip = np.concatenate([np.broadcast_to(np.array(c, np.uint8), (height, band, 3)) for c in colours], axis=1)
    return strip if vertical else strip.transpose(1, 0, 2)


def close(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.abs(pixel.astype(int) - colour).max() <= tol)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:] = BLUE
    stored[:10, :10] = RED  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = np.asarray(load_reference_image(tmp_path / "phone.jpg", width=20, height=40))
    assert out.shape == (40, 20, 3)  # portrait once upright
    assert close(out[2, 17], RED)  # the corner is now top-right
    assert close(out[2, 2], BLUE)
    assert close(out[37, 2], BLUE)


def test_rgba_is_flattened_onto_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, :2, 3] = 255  # ... opaque on the left, transparent on the right
    rgba[:, 2:, 3] = 0
    out = np.asarray(load_reference_image(rgba, 4, 4))
    assert close(out[1, 0], RED, tol=2)
    assert close(out[1, 3], WHITE, tol=2)
    half = np.asarray(load_reference_image(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), 4, 4))
    assert close(half[0, 0], (127, 127, 127), tol=2)  # 50 % black over white


def test_cmyk_converted(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    cmyk.save(tmp_path / "print.jpg", quality=95)
    for src in (cmyk, tmp_path / "print.jpg"):
        out = load_reference_image(src, 8, 8)
        assert out.mode == "RGB"
        assert close(np.asarray(out)[4, 4], RED, tol=20)


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as probe:
        assert probe.mode.startswith("I")
    out = np.asarray(load_reference_image(tmp_path / "deep.png", 64, 8))
    assert out[0, 0].max() <= 2
    assert out[0, -1].min() >= 253
    assert 110 <= int(out[0, 32, 0]) <= 145  # mid-grey, where clipping at 255 would give white
    rgb16 = np.full((4, 4, 3), 32768, np.uint16)
    assert close(np.asarray(load_reference_image(rgb16, 4, 4))[0, 0], (128, 128, 128), tol=2)


def test_palette_and_la_and_gray_arrays() -> None:
    palette = Image.new("RGB", (6, 6), GREEN).convert("P")
    assert close(np.asarray(load_reference_image(palette, 6, 6))[3, 3], GREEN, tol=4)
    la = Image.new("LA", (6, 6), (0, 0))  # fully transparent black
    assert close(np.asarray(load_reference_image(la, 6, 6))[3, 3], WHITE, tol=2)
    gray = np.full((6, 6), 0.25, np.float32)
    assert close(np.asarray(load_reference_image(gray, 6, 6))[3, 3], (64, 64, 64), tol=1)


@pytest.mark.parametrize(
    "image,size",
    [
        (bands([RED, GREEN, BLUE, WHITE], 25, 50), (50, 50)),  # too wide: crop left and right
        (bands([RED, GREEN, BLUE, WHITE], 50, 100), (50, 50)),  # too wide and too big: scale, then crop
        (bands([RED, GREEN, BLUE, WHITE], 25, 50, vertical=False), (50, 50)),  # too tall: crop top and bottom
    ],
)
def test_cover_then_centre_crop(image: np.ndarray, size: tuple[int, int]) -> None:
    out = np.asarray(load_reference_image(image, *size))
    assert out.shape == (size[1], size[0], 3)
    vertical = image.shape[1] > image.shape[0]
    first, last = (out[25, 3], out[25, -4]) if vertical else (out[3, 25], out[-4, 25])
    assert close(first, GREEN)  # the outer bands (red, white) were cropped away evenly
    assert close(last, BLUE)


def test_aspect_is_kept_when_upscaling() -> None:
    out = np.asarray(load_reference_image(bands([RED, BLUE], 2, 4), width=40, height=20))
    assert out.shape == (20, 40, 3)
    assert close(out[10, 2], RED) and close(out[10, 37], BLUE)


def test_bomb_rejected_from_header(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageInputError, match="megapixels"):
        load_reference_image(tmp_path / "big.png", 8, 8, max_pixels=5000)
    with pytest.raises(ImageInputError, match="megapixels"):
        load_mask_image(tmp_path / "big.png", 8, 8, max_pixels=5000)
    with pytest.raises(ImageInputError, match="megapixels"):
        load_reference_image(np.zeros((100, 100, 3), np.uint8), 8, 8, max_pixels=5000)


def test_pil_bomb_check_becomes_our_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    for pil_limit in (1000, 500):  # over the limit: warning; over twice the limit: error
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with pytest.raises(ImageInputError, match="decompression bomb"):
            load_reference_image(tmp_path / "big.png", 8, 8)


def test_non_image_and_missing_files_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="notes.png"):
        load_reference_image(tmp_path / "notes.png", 8, 8)
    with pytest.raises(ImageInputError, match="missing.jpg"):
        load_reference_image(str(tmp_path / "missing.jpg"), 8, 8)
    with pytest.raises(ImageInputError, match="notes.png"):
        load_mask_image(tmp_path / "notes.png", 8, 8)


def test_bad_arrays_and_sizes_rejected() -> None:
    with pytest.raises(ImageInputError, match=r"\(H, W, 2\)|got \(4, 4, 2\)"):
        load_reference_image(np.zeros((4, 4, 2), np.uint8), 4, 4)
    with pytest.raises(ImageInputError, match="int64"):
        load_reference_image(np.zeros((4, 4, 3), np.int64), 4, 4)
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        load_reference_image(np.full((4, 4, 3), 200.0), 4, 4)
    with pytest.raises(ImageInputError, match="int"):
        load_reference_image(42, 4, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        load_reference_image(np.zeros((4, 4, 3), np.uint8), 0, 4)


# ---------------------------------------------------------------------------------------------------------------
# masks


def test_mask_from_arrays() -> None:
    gray = np.array([[0, 255], [51, 255]], np.uint8)
    m = load_mask_image(gray, 2, 2)
    assert m.dtype == np.float32 and m.shape == (2, 2)
    np.testing.assert_allclose(m, [[0, 1], [0.2, 1]], atol=1e-6)
    np.testing.assert_array_equal(load_mask_image(np.eye(3, dtype=bool), 3, 3), np.eye(3))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = WHITE
    rgb[1, 1] = GREEN
    # Brightest channel, not luma: a pure green stroke counts as fully painted (the same rule as loopui.saliency).
    np.testing.assert_allclose(load_mask_image(rgb, 2, 2), [[1, 0], [0, 1]], atol=1e-3)


def test_mask_uses_painted_alpha_else_colour() -> None:
    painted = np.zeros((4, 4, 4), np.uint8)  # gr.ImageEditor layer: black brush, alpha marks the strokes
    painted[1:3, 1:3, 3] = 255
    m = load_mask_image(painted, 4, 4)
    assert m[1, 1] == 1.0 and m[0, 0] == 0.0
    opaque = np.full((4, 4, 4), 255, np.uint8)
    opaque[:2, ..., :3] = 0
    m = load_mask_image(opaque, 4, 4)
    assert m[0, 0] == 0.0 and m[3, 3] == 1.0  # alpha carries nothing: the colour decides


def test_mask_from_file_and_pil(tmp_path: Path) -> None:
    a = np.zeros((8, 8), np.uint8)
    a[:, 4:] = 255
    Image.fromarray(a).save(tmp_path / "mask.png")
    for src in (tmp_path / "mask.png", Image.fromarray(a), Image.fromarray(a).convert("1")):
        m = load_mask_image(src, 8, 8)
        assert m[0, 0] == 0.0 and m[0, 7] == 1.0


def test_mask_resize_keeps_feathering_and_matches_reference_crop() -> None:
    step = np.zeros((4, 4), np.uint8)
    step[:, 2:] = 255
    m = load_mask_image(step, 16, 16)
    assert m.shape == (16, 16)
    assert ((m > 0.05) & (m < 0.95)).any()  # bilinear leaves a soft edge
    assert m.min() >= 0.0 and m.max() <= 1.0
    # white on the right half of a 2:1 image; a square fit keeps the central square, same as the reference image
    wide = np.zeros((50, 100), np.uint8)
    wide[:, 60:] = 255  # the central square is columns 25..74, so the edge lands at output column 35
    m = load_mask_image(wide, 50, 50)
    assert m[25, 10] == 0.0 and m[25, 30] == 0.0 and m[25, 40] == 1.0
    ref = np.asarray(load_reference_image(np.repeat(wide[..., None], 3, axis=-1), 50, 50))[..., 0] / 255
    assert np.abs(ref - m).mean() < 0.02
