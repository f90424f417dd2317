"""Saliency models: a tiny registry of rembg model names, their weight files, a session cache and the raw mask.

rembg (2.0.86) looks for a model's weights at ``<home>/models/<name>/<name>.onnx`` (and, for files downloaded by
older versions, at ``<legacy home>/<name>.onnx``), where ``<home>`` is ``$U2NET_HOME`` if set, else
``$REMBG_HOME``, else ``$XDG_DATA_HOME/rembg``, else ``~/.rembg``. A file already there is used without a
download or checksum; otherwise ``new_session`` downloads it with pooch, which fails offline with
``requests.ConnectionError`` (an ``OSError``). We turn that into ``SaliencyUnavailable`` with the exact path.

Only the mask is needed here, so a model whose weights are on disk runs through onnxruntime directly, with rembg's
own pre- and post-processing for that model (``_PREPROCESSING``; a test checks the result equals rembg's). rembg's
package import compiles pymatting's numba kernels on a fresh install (over a minute on a small CPU) for matting that
a mask never uses; it is imported only to download missing weights. Nothing heavy loads at
``import loopui.saliency``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np

from .masks import ImageLike, to_rgb_array

logger = logging.getLogger(__name__)

HOME_ENV_VARS = ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME")
CUSTOM_SESSION = "u2net_custom"  # rembg's session for a user-supplied U^2-Net-style ONNX file (model_path=)

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class _Preprocessing:
    """How rembg 2.0.86 feeds one model and reads its output (rembg/sessions/<model>.py, ``predict``)."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    size: int
    sigmoid: bool = False


_PREPROCESSING: Dict[str, _Preprocessing] = {
    "u2netp": _Preprocessing(*_IMAGENET, 320),
    "u2net": _Preprocessing(*_IMAGENET, 320),
    CUSTOM_SESSION: _Preprocessing(*_IMAGENET, 320),
    "isnet-general-use": _Preprocessing((0.5, 0.5, 0.5), (1.0, 1.0, 1.0), 1024),
    "birefnet-general": _Preprocessing(*_IMAGENET, 1024, sigmoid=True),
}


class OnnxSaliencySession:
    """One saliency model on onnxruntime, predicting exactly as rembg's session of the same name does."""

    def __init__(self, model_name: str, path: Path) -> None:
        import onnxruntime as ort

        self.model_name = model_name
        self.path = path
        self.preprocessing = _PREPROCESSING[model_name]
        options = ort.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        if threads.isdigit():  # as rembg's new_session does
            options.inter_op_num_threads = options.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if ort.get_device() == "GPU" and "CUDAExecutionProvider" in available
                     else ["CPUExecutionProvider"])
        self.inner_session = ort.InferenceSession(str(path), sess_options=options, providers=providers)

    def predict(self, image: Any) -> np.ndarray:
        """The mask of a PIL image: ``(H, W)`` uint8 at the image's size, min-max normalised (rembg's output)."""
        from PIL import Image

        prep = self.preprocessing
        size = (prep.size, prep.size)
        pixels = np.array(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))
        pixels = pixels / max(np.max(pixels), 1e-6)
        normalised = (pixels - np.array(prep.mean)) / np.array(prep.std)
        feed = {self.inner_session.get_inputs()[0].name:
                np.expand_dims(normalised.transpose((2, 0, 1)), 0).astype(np.float32)}
        pred = self.inner_session.run(None, feed)[0][:, 0, :, :]
        if prep.sigmoid:
            pred = 1 / (1 + np.exp(-pred))
        high, low = np.max(pred), np.min(pred)
        pred = np.squeeze((pred - low) / (high - low))
        if self.model_name == "u2net":
            pred = pred.clip(0, 1)
        mask = Image.fromarray((pred * 255).astype("uint8"), mode="L")
        return np.asarray(mask.resize(image.size, Image.Resampling.LANCZOS))


class SaliencyUnavailable(RuntimeError):
    """The saliency model cannot run here (weights missing and not downloadable, or unreadable).

    The message names the model, the exact file path rembg expects and the environment variable to set.
    Callers catch it and fall back to a painted mask or to "everything moves".
    """


@dataclass(frozen=True)
class MaskModelInfo:
    """One selectable saliency model: rembg's name for it, a one-line description and its weights."""

    name: str
    description: str
    size_mb: float  # approximate download size, for messages and the dropdown label
    filename: str  # the file rembg expects in <home>/models/<name>/
    url: str  # where rembg downloads it from (the saved file name can differ from the URL's)

    @property
    def label(self) -> str:
        """Dropdown label, e.g. ``"u2netp: fast preview, rough edges (~5 MB)"``."""
        return f"{self.name}: {self.description} (~{self.size_mb:g} MB)"


_RELEASES = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
MASK_MODEL_INFO: Dict[str, MaskModelInfo] = {
    info.name: info
    for info in (
        MaskModelInfo("u2netp", "fast preview, rough edges", 4.7, "u2netp.onnx", _RELEASES + "u2netp.onnx"),
        MaskModelInfo("isnet-general-use", "sharper edges, slower", 179, "isnet-general-use.onnx",
                      _RELEASES + "isnet-general-use.onnx"),
        MaskModelInfo("birefnet-general", "best quality, slowest, large", 973, "birefnet-general.onnx",
                      _RELEASES + "BiRefNet-general-epoch_244.onnx"),
        MaskModelInfo("u2net", "the classic U^2-Net, medium", 176, "u2net.onnx", _RELEASES + "u2net.onnx"),
    )
}
MASK_MODELS: Tuple[str, ...] = ("u2netp", "isnet-general-use", "birefnet-general", "u2net")  # first = default
DEFAULT_MASK_MODEL = MASK_MODELS[0]

_SESSIONS: Dict[Tuple[str, str], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def mask_model_info(model_name: str) -> MaskModelInfo:
    """Registry entry of ``model_name``; ``ValueError`` listing the known names when it is not one of them."""
    if not isinstance(model_name, str) or model_name not in MASK_MODEL_INFO:
        raise ValueError(f"unknown mask model {model_name!r}; choose one of: {', '.join(MASK_MODELS)}")
    return MASK_MODEL_INFO[model_name]


def _session_class(name: str) -> Any:
    from rembg.sessions import sessions  # heavy (compiles numba kernels on a fresh install): downloads only

    return sessions[name]


def _legacy_home() -> Path:
    # rembg 2.0.86 BaseSession.legacy_home: the old flat folder, still read.
    return Path(os.path.expanduser(os.getenv("U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"),
                                                                        ".u2net"))))


def rembg_home() -> Path:
    """The folder rembg keeps models under (``$U2NET_HOME`` / ``$REMBG_HOME`` / ...); no network, nothing created.

    Follows rembg 2.0.86's ``BaseSession.rembg_home`` (a test compares the two) without importing rembg.
    """
    if os.getenv("U2NET_HOME"):
        return _legacy_home()
    xdg = os.getenv("XDG_DATA_HOME")
    default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
    return Path(os.path.expanduser(os.getenv("REMBG_HOME", default)))


def weights_path(model_name: str) -> Path:
    """Where the weights of ``model_name`` are, or where rembg expects them (``<home>/models/<name>/<file>``).

    Looks where rembg looks (its model folder, then its old flat folder), following its environment variables.
    No network call, no rembg import.
    """
    info = mask_model_info(model_name)
    preferred = rembg_home() / "models" / info.name / info.filename
    for candidate in (preferred, _legacy_home() / info.filename):
        if candidate.exists():
            return candidate
    return preferred


def weights_available(model_name: str) -> bool:
    """Whether the weights of ``model_name`` are on disk already (so no download is needed). No network call."""
    return weights_path(model_name).is_file()


def _missing_message(info: MaskModelInfo, path: Path, reason: str) -> str:
    return (f"mask model {info.name!r} is unavailable: {reason}; download {info.url} (~{info.size_mb:g} MB) "
            f"to that path, or set U2NET_HOME to a folder holding models/{info.name}/{info.filename}; "
            f"a painted mask still works")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_errors() -> Tuple[type, ...]:
    """Exceptions onnxruntime raises for an unreadable model file (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    names = ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidArgument", "InvalidGraph", "RuntimeException")
    return tuple(getattr(ort_state, n) for n in names if hasattr(ort_state, n))


def _custom_model_path(model_path: Union[str, "os.PathLike[str]"]) -> Path:
    """Check a custom ONNX path the way rembg's ``u2net_custom`` does (must exist, must lie inside rembg's home or
    its old flat folder)."""
    resolved = Path(os.path.abspath(os.path.expanduser(os.fspath(model_path))))
    roots = [Path(os.path.abspath(rembg_home())), Path(os.path.abspath(_legacy_home()))]
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise ValueError(f"model_path {os.fspath(model_path)!r} must lie inside rembg's model folder "
                         f"{rembg_home()} (set U2NET_HOME to a folder that contains it)")
    if not resolved.is_file():
        raise SaliencyUnavailable(f"custom mask model file not found: {resolved}; a painted mask still works")
    return resolved


def _get_session(model_name: str, model_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> Any:
    """The cached session for ``model_name`` (or for the custom file ``model_path``), created once.

    The key includes the weights path, so pointing ``U2NET_HOME`` elsewhere gets a fresh session. Missing weights
    are downloaded through rembg (the only time rembg itself is imported).
    """
    if model_path is not None:
        name, path = CUSTOM_SESSION, _custom_model_path(model_path)
        info = None
    else:
        info = mask_model_info(model_name)
        name, path = info.name, weights_path(model_name)
    key = (name, str(path))
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None:
            return session
        start = time.perf_counter()
        if info is not None and not path.is_file():
            path = _download(info, path)
        try:
            session = OnnxSaliencySession(name, path)
        except _load_errors() as err:
            label = info.name if info is not None else f"custom model {path.name}"
            raise SaliencyUnavailable(f"mask model {label!r} could not load {path}: {type(err).__name__}: "
                                      f"{_first_line(err)}; replace the file (delete it to re-download); "
                                      f"a painted mask still works") from err
        logger.info("loaded mask model %s from %s in %.2fs", name, path, time.perf_counter() - start)
        _SESSIONS[key] = session
        return session


def _download(info: MaskModelInfo, path: Path) -> Path:
    """Download the weights of ``info`` with rembg's own downloader (pooch, with rembg's checksums)."""
    logger.info("downloading mask model %s (~%g MB) to %s", info.name, info.size_mb, path)
    try:
        with _quiet_pooch():
            return Path(_session_class(info.name).download_models())
    except OSError as err:
        # requests.ConnectionError / HTTPError (offline, blocked, 404) and disk errors while downloading.
        raise SaliencyUnavailable(_missing_message(
            info, path, f"weights not found at {path} and the download failed ({type(err).__name__})")) from err
    except ValueError as err:  # pooch's checksum mismatch
        reason = f"the download to {path} failed its checksum ({_first_line(err)})"
        raise SaliencyUnavailable(_missing_message(info, path, reason)) from err


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Silence pooch's own "Downloading data from ..." stderr line; we log the download ourselves, and offline
    the CLI must print one error line only. (pooch's progress bar, shown once bytes flow, is unaffected.)"""
    import pooch  # rembg's downloader; its logger is not registered with logging, so ask pooch for it

    pooch_logger = pooch.get_logger()
    previous = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pooch_logger.setLevel(previous)


def clear_session_cache() -> None:
    """Forget every cached rembg session (tests call this after pointing ``U2NET_HOME`` elsewhere)."""
    with _SESSIONS_LOCK:
        _SESSIONS.clear()


def compute_saliency(image: ImageLike, model_name: str = DEFAULT_MASK_MODEL,
                     model_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> np.ndarray:
    """The raw soft saliency mask of ``image``: float32 ``(H, W)`` in [0, 1] at the image's size (1 = object).

    ``image``: PIL image, ``HxWx3`` uint8 array or path (paths are opened upright; arrays and PIL images are
    used pixel for pixel). ``model_name`` is one of ``MASK_MODELS``; ``model_path`` instead runs a custom
    U^2-Net-style ONNX file (320x320 input, ImageNet normalisation) through rembg's ``u2net_custom`` session;
    rembg requires it to lie inside its home folder. Raises ``SaliencyUnavailable`` when the weights are missing
    and cannot be downloaded, ``ValueError`` for an unknown model or bad image.
    """
    from PIL import Image

    rgb = to_rgb_array(image)
    if model_path is None:
        mask_model_info(model_name)  # validate before importing anything heavy
    session = _get_session(model_name, model_path)

    start = time.perf_counter()
    # The prediction is min-max normalised; a flat image gives 0/0 -> NaN, which we map to 0 below.
    with np.errstate(invalid="ignore", divide="ignore"):
        out = session.predict(Image.fromarray(rgb))
    mask = _normalise_raw(np.asarray(out))
    if mask.shape != rgb.shape[:2]:
        from .masks import resize_mask

        mask = resize_mask(mask, (rgb.shape[1], rgb.shape[0]))
    logger.debug("saliency %s on %dx%d in %.3fs", session.model_name, rgb.shape[1], rgb.shape[0],
                 time.perf_counter() - start)
    return mask


def _normalise_raw(mask: np.ndarray) -> np.ndarray:
    """rembg's uint8 0..255 mask (or a float one) -> float32 in [0, 1], NaN -> 0."""
    if np.issubdtype(mask.dtype, np.integer):
        mask = mask.astype(np.float32) / 255.0
    mask = mask.astype(np.float32)
    return np.clip(np.nan_to_num(mask, nan=0.0), 0.0, 1.0)
