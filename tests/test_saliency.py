"""The saliency room on CPU, offline: a tiny ONNX model stands in for u2netp (see saliency_fixtures.py)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopui.engine.request import knob_info
from loopui.saliency import (
    MASK_MODEL_INFO,
    MASK_MODELS,
    MaskResult,
    SaliencyUnavailable,
    clear_session_cache,
    compute_saliency,
    load_rgb_image,
    load_user_mask,
    overlay_mask,
    postprocess_mask,
    resolve_mask,
    weights_available,
    weights_path,
)
from saliency_fixtures import install_tiny_u2netp, red_square_image, use_rembg_home, write_tiny_saliency_onnx

BOX = (24, 16, 72, 48)  # x0, y0, x1, y1 of the red square in the 96x64 test image


@pytest.fixture
def empty_home(monkeypatch, tmp_path):
    """rembg home with no weights; downloads raise ConnectionError."""
    home = use_rembg_home(monkeypatch, tmp_path / "rembg")
    yield home
    clear_session_cache()


@pytest.fixture
def tiny_home(empty_home):
    """rembg home holding the tiny u2netp stand-in."""
    install_tiny_u2netp(empty_home)
    return empty_home


def square_mask(size: int = 80, box: tuple = (30, 30, 50, 50)) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1.0
    return mask


def inside_outside(mask: np.ndarray, box=BOX, margin: int = 3) -> tuple:
    """Mask values well inside the box and well outside it (resampling softens a few pixels at the edge)."""
    x0, y0, x1, y1 = box
    inside = mask[y0 + margin:y1 - margin, x0 + margin:x1 - margin]
    far = np.ones_like(mask, dtype=bool)
    far[max(y0 - margin, 0):y1 + margin, max(x0 - margin, 0):x1 + margin] = False
    return inside, mask[far]


# --- defaults and registry ---------------------------------------------------------------------------------------

def test_defaults_equal_loop_request_knobs():
    for func in (postprocess_mask, resolve_mask):
        params = inspect.signature(func).parameters
        assert params["threshold"].default == knob_info("mask_threshold")["default"]
        assert params["grow"].default == knob_info("mask_grow")["default"]
        assert params["feather"].default == knob_info("mask_feather")["default"]
        assert params["invert"].default is False
    for func in (compute_saliency, resolve_mask):
        assert inspect.signature(func).parameters["model_name"].default == knob_info("mask_model")["default"]
    assert MASK_MODELS[0] == knob_info("mask_model")["default"]


def test_registry_matches_rembg():
    from rembg.sessions import sessions

    assert MASK_MODELS == ("u2netp", "isnet-general-use", "birefnet-general", "u2net")
    for name in MASK_MODELS:
        info = MASK_MODEL_INFO[name]
        assert sessions[name].name() == name  # a real rembg session of that name exists
        assert info.filename == f"{name}.onnx"  # the file name rembg's download_models saves under
        assert name in info.label and info.size_mb > 0


def test_import_is_light():
    code = ("import sys, loopui, loopui.saliency; "
            "bad = [m for m in ('gradio', 'rembg', 'onnxruntime', 'torch', 'pooch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- weights, sessions, compute_saliency -------------------------------------------------------------------------

def test_weights_path_follows_rembg_env(empty_home, monkeypatch, tmp_path):
    expected = empty_home / "models" / "u2netp" / "u2netp.onnx"
    assert weights_path("u2netp") == expected
    assert not weights_available("u2netp")
    install_tiny_u2netp(empty_home)
    assert weights_available("u2netp")
    # Without U2NET_HOME, rembg reads REMBG_HOME.
    monkeypatch.delenv("U2NET_HOME")
    monkeypatch.setenv("REMBG_HOME", str(tmp_path / "other"))
    assert weights_path("isnet-general-use") == tmp_path / "other" / "models" / "isnet-general-use" / \
        "isnet-general-use.onnx"


@pytest.mark.parametrize("env", [
    {"U2NET_HOME": "u2"}, {"REMBG_HOME": "rh"}, {"XDG_DATA_HOME": "xdg"}, {},
    {"REMBG_HOME": "rh", "XDG_DATA_HOME": "xdg"},
])
def test_home_and_weights_path_match_rembg(monkeypatch, tmp_path, env):
    from rembg.sessions import sessions

    from loopui.saliency import rembg_home

    for name in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    cls = sessions["u2netp"]
    assert rembg_home() == Path(cls.rembg_home())
    assert weights_path("u2netp") == Path(cls.model_dir()) / "u2netp.onnx"
    legacy = Path(cls.legacy_home()) / "u2netp.onnx"  # a file downloaded by an older rembg is found too
    legacy.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_saliency_onnx(legacy)
    assert weights_path("u2netp") == Path(cls.resolve_existing("u2netp.onnx"))


@pytest.mark.parametrize("name", ["u2netp", "u2net", "isnet-general-use", "birefnet-general"])
def test_prediction_equals_rembgs(empty_home, name):
    """Our onnxruntime path feeds and reads each model exactly as rembg's session of the same name."""
    from rembg import new_session, remove

    write_tiny_saliency_onnx(empty_home / "models" / name / f"{name}.onnx", size=None)
    rng = np.random.default_rng(1)
    image = (rng.random((70, 110, 3)) * 255).astype(np.uint8)
    ours = np.round(compute_saliency(image, name) * 255).astype(np.uint8)
    theirs = remove(image, session=new_session(name), only_mask=True)
    np.testing.assert_array_equal(ours, theirs)


def test_first_mask_in_a_fresh_process_skips_rembgs_heavy_imports(tmp_path):
    """rembg's package import compiles pymatting's numba kernels on a fresh install (74 s measured); the mask
    path must not import it when the weights are on disk."""
    install_tiny_u2netp(tmp_path)
    code = ("import sys, time; sys.path.insert(0, 'tests'); start = time.perf_counter(); "
            "from loopui.saliency import compute_saliency; from saliency_fixtures import red_square_image; "
            "mask = compute_saliency(red_square_image()); "
            "heavy = [m for m in ('rembg', 'pymatting', 'numba', 'pooch', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy; assert mask.max() > 0.9; "
            "print(f'first mask in a fresh process: {time.perf_counter() - start:.2f} s')")
    env = {**os.environ, "U2NET_HOME": str(tmp_path), "MODEL_CHECKSUM_DISABLED": "1",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}  # as on a fresh install, should numba load
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout.strip(), file=sys.__stderr__)


@pytest.mark.parametrize("as_pil", [False, True])
def test_red_square_mask_from_tiny_u2netp(tiny_home, as_pil):
    image = red_square_image()
    mask = compute_saliency(Image.fromarray(image) if as_pil else image)
    assert mask.shape == (64, 96) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    inside, outside = inside_outside(mask)
    assert inside.min() > 0.9
    assert outside.max() < 0.1


def test_session_created_once_across_threads(tiny_home, monkeypatch):
    from loopui.saliency import models

    calls = []
    real = models.OnnxSaliencySession

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "OnnxSaliencySession", counting)
    image = red_square_image()
    results = []
    threads = [threading.Thread(target=lambda: results.append(compute_saliency(image))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    compute_saliency(image)
    assert len(results) == 4 and len(calls) == 1
    clear_session_cache()
    compute_saliency(image)
    assert len(calls) == 2


def test_custom_model_path_through_u2net_custom(empty_home):
    custom = write_tiny_saliency_onnx(empty_home / "custom" / "tiny.onnx")
    assert not weights_available("u2netp")  # the custom file is used, not u2netp
    inside, outside = inside_outside(compute_saliency(red_square_image(), model_path=custom))
    assert inside.min() > 0.9 and outside.max() < 0.1
    result = resolve_mask(red_square_image(), model_path=custom, feather=0)
    assert result.source == "model" and result.model_name == "u2net_custom"


def test_custom_model_path_errors(empty_home, tmp_path):
    outside_home = write_tiny_saliency_onnx(tmp_path / "elsewhere" / "tiny.onnx")
    with pytest.raises(ValueError, match="inside rembg's model folder"):
        compute_saliency(red_square_image(), model_path=outside_home)
    with pytest.raises(SaliencyUnavailable, match="not found"):
        compute_saliency(red_square_image(), model_path=empty_home / "missing.onnx")


def test_missing_weights_raise_saliency_unavailable(empty_home):
    expected = empty_home / "models" / "u2netp" / "u2netp.onnx"
    with pytest.raises(SaliencyUnavailable) as info:
        compute_saliency(red_square_image())
    message = str(info.value)
    assert "u2netp" in message and str(expected) in message and "U2NET_HOME" in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, OSError)  # the blocked download, not some other failure
    with pytest.raises(SaliencyUnavailable, match="birefnet-general"):
        resolve_mask(red_square_image(), model_name="birefnet-general")


def test_corrupt_weights_raise_saliency_unavailable(empty_home):
    path = empty_home / "models" / "u2netp" / "u2netp.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    with pytest.raises(SaliencyUnavailable, match="could not load"):
        compute_saliency(red_square_image())


def test_unknown_model_name_lists_known_ones(empty_home):
    for call in (lambda: compute_saliency(red_square_image(), "nope"), lambda: weights_path("nope"),
                 lambda: resolve_mask(red_square_image(), model_name="nope")):
        with pytest.raises(ValueError, match="'nope'.*u2netp.*birefnet-general"):
            call()


def test_bad_image_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        compute_saliency(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="float values"):
        compute_saliency(np.full((4, 4, 3), 200.0))


# --- postprocess_mask ---------------------------------------------------------------------------------------------

def test_threshold_binarises_at_cut_off():
    ramp = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (3, 1))
    for threshold in (0.0, 0.3, 0.5, 1.0):
        out = postprocess_mask(ramp, threshold=threshold, feather=0)
        np.testing.assert_array_equal(out, (ramp >= threshold).astype(np.float32))
    # uint8 0..255 reads like float 0..1.
    np.testing.assert_array_equal(postprocess_mask((ramp * 255).round().astype(np.uint8), feather=0),
                                  postprocess_mask(ramp, feather=0))


@pytest.mark.parametrize("grow", [1, 3, 7])
def test_grow_dilates_by_a_euclidean_disk(grow):
    mask = square_mask()
    out = postprocess_mask(mask, grow=grow, feather=0)
    # Independent count: pixels whose nearest square pixel lies within `grow` (clamped offsets to the square).
    yy, xx = np.mgrid[0:80, 0:80]
    dy = np.maximum(np.maximum(30 - yy, yy - 49), 0)
    dx = np.maximum(np.maximum(30 - xx, xx - 49), 0)
    expected = (dx ** 2 + dy ** 2) <= grow ** 2
    np.testing.assert_array_equal(out.astype(bool), expected)
    assert out.sum() > mask.sum() + 4 * 20 * grow - 1  # at least the four side strips


@pytest.mark.parametrize("grow", [1, 4, 9])
def test_negative_grow_erodes(grow):
    out = postprocess_mask(square_mask(), grow=-grow, feather=0)
    assert out.sum() == (20 - 2 * grow) ** 2
    assert out[40, 40] == 1.0 and out[30 + grow - 1, 40] == 0.0 and out[30 + grow, 40] == 1.0


def test_feather_softens_only_near_the_edge():
    feather = 8
    out = postprocess_mask(square_mask(), feather=feather)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    assert out[40, 40] == 1.0  # 10 px from the edge: interior stays 1
    assert out[5, 5] == 0.0 and out[40, 20] == 0.0  # far background stays 0
    row = out[40, 24:57]
    edge = out[40, 27:33]  # the pixels within feather/2 of the left edge at x = 30
    assert np.all((edge > 0.0) & (edge < 1.0))
    assert np.all(np.diff(row[:len(row) // 2]) >= 0)  # ramps up monotonically into the square
    assert abs(out.sum() - 400) < 0.05 * 400  # the ramp is centred on the edge: area about unchanged


def test_invert_is_the_complement():
    mask = square_mask()
    np.testing.assert_array_equal(postprocess_mask(mask, invert=True, feather=0),
                                  1.0 - postprocess_mask(mask, feather=0))
    np.testing.assert_allclose(postprocess_mask(mask, invert=True), 1.0 - postprocess_mask(mask), atol=1e-6)
    # Grow acts on the inverted (moving) region: the still square shrinks.
    assert postprocess_mask(mask, invert=True, grow=2, feather=0).sum() == 80 * 80 - 16 * 16


def test_postprocess_constant_masks_and_bad_values():
    for const in (0.0, 1.0):
        flat = np.full((10, 12), const, dtype=np.float32)
        np.testing.assert_array_equal(postprocess_mask(flat, grow=3, feather=4), flat)
    for kwargs, word in (({"threshold": 1.5}, "threshold"), ({"grow": 2.5}, "grow"), ({"feather": -1}, "feather"),
                         ({"threshold": float("nan")}, "threshold")):
        with pytest.raises(ValueError, match=word):
            postprocess_mask(square_mask(), **kwargs)
    with pytest.raises(ValueError, match="HxW"):
        postprocess_mask(np.zeros((4, 4, 3)))


# --- overlay_mask -------------------------------------------------------------------------------------------------

def test_overlay_tints_only_the_mask():
    image = red_square_image()
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[:, :48] = 1.0
    out = overlay_mask(image, mask, color=(0, 255, 0), alpha=0.5)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 48:], image[:, 48:])
    np.testing.assert_array_equal(out[0, 0], [0, 128, 128])  # blue half-tinted green
    # A mask at another size is resized to the image.
    small = overlay_mask(image, mask[::4, ::4], color=(0, 255, 0), alpha=0.5)
    np.testing.assert_array_equal(small[:, :40], out[:, :40])
    np.testing.assert_array_equal(small[:, 56:], image[:, 56:])
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(image, mask, alpha=2.0)


# --- resolve_mask -------------------------------------------------------------------------------------------------

def test_user_mask_wins_even_without_weights(empty_home):
    user = np.zeros((64, 96), dtype=np.uint8)
    user[:, :30] = 255  # the left strip may move, whatever the model would say
    result = resolve_mask(red_square_image(), user_mask=user, feather=0)
    assert isinstance(result, MaskResult)
    assert result.source == "user" and result.model_name is None
    np.testing.assert_array_equal(result.mask, user / 255.0)
    assert "your mask" in result.message


def test_user_mask_forms_are_read_and_resized(empty_home, tmp_path):
    expected = np.zeros((64, 96), dtype=np.float32)
    expected[:, :48] = 1.0
    half = np.zeros((32, 48), dtype=np.uint8)
    half[:, :24] = 255  # half the image size: resized to 96x64
    painted = np.zeros((64, 96, 4), dtype=np.uint8)
    painted[:, :48, 3] = 255  # an ImageEditor layer: black strokes, painted = alpha
    red_strokes = np.zeros((64, 96, 3), dtype=np.uint8)
    red_strokes[:, :48, 0] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(half, mode="L").save(path)
    for user in (half, painted, red_strokes, expected.astype(bool), Image.fromarray(painted, mode="RGBA"),
                 path, str(path)):
        result = resolve_mask(red_square_image(), user_mask=user, feather=0)
        assert result.source == "user"
        np.testing.assert_array_equal(result.mask, expected, err_msg=type(user).__name__)


def test_all_black_user_mask_wins_even_without_weights(empty_home):
    # "Nothing moves" is a valid request: the model is not consulted (its weights are missing here).
    result = resolve_mask(red_square_image(), user_mask=np.zeros((64, 96), dtype=np.uint8), feather=0)
    assert result.source == "user" and result.model_name is None
    assert not result.mask.any() and result.coverage == 0.0
    assert load_user_mask(np.zeros((4, 4), dtype=np.uint8)).shape == (4, 4)
    assert load_user_mask(None) is None


def test_model_mask_when_no_user_mask(tiny_home):
    result = resolve_mask(red_square_image(), feather=0)
    assert result.source == "model" and result.model_name == "u2netp"
    inside, outside = inside_outside(result.mask)
    assert inside.min() == 1.0 and outside.max() == 0.0
    assert result.raw is not None and result.raw.shape == (64, 96)
    assert abs(result.coverage - (48 * 32) / (96 * 64)) < 0.02
    inverted = resolve_mask(red_square_image(), invert=True, feather=0)
    np.testing.assert_array_equal(inverted.mask, 1.0 - result.mask)


def test_bad_user_mask_raises_value_error(empty_home, tmp_path):
    with pytest.raises(ValueError, match="float values"):
        load_user_mask(np.full((4, 4), 255.0))
    with pytest.raises(ValueError, match="not found"):
        resolve_mask(red_square_image(), user_mask=tmp_path / "nope.png")
    with pytest.raises(ValueError, match="mask must be"):
        resolve_mask(red_square_image(), user_mask=42)


def test_load_rgb_image_applies_exif_rotation(tmp_path):
    image = Image.fromarray(red_square_image())  # 96 wide, 64 high
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    assert load_rgb_image(path).size == (64, 96)
