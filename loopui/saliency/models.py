"""Saliency models: a tiny registry of rembg model names, their weight files, a session cache and the raw mask.

rembg (2.0.86) looks for a model's weights at ``<home>/models/<name>/<name>.onnx`` (and, for files downloaded by
older versions, at ``<legacy home>/<name>.onnx``), where ``<home>`` is ``$U2NET_HOME`` if set, else
``$REMBG_HOME``, else ``$XDG_DATA_HOME/rembg``, else ``~/.rembg``. A file already there is used without a
download or checksum; otherwise ``new_session`` downloads it with pooch, which fails offline with
``requests.ConnectionError`` (an ``OSError``). We turn that into ``SaliencyUnavailable`` with the exact path.

rembg is imported lazily (it takes ~1.5 s and pulls in onnxruntime), never at ``import loopui.saliency``.
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
    from rembg.sessions import sessions  # lazy: heavy import

    return sessions[name]


def rembg_home() -> Path:
    """The folder rembg keeps models under (``$U2NET_HOME`` / ``$REMBG_HOME`` / ...); no network, nothing created."""
    return Path(_session_class(DEFAULT_MASK_MODEL).rembg_home())


def weights_path(model_name: str) -> Path:
    """Where the weights of ``model_name`` are, or where rembg expects them (``<home>/models/<name>/<file>``).

    Asks rembg's own session class, so it follows rembg's environment variables. No network call.
    """
    info = mask_model_info(model_name)
    cls = _session_class(info.name)
    existing = cls.resolve_existing(info.filename)
    return Path(existing) if existing is not None else Path(cls.model_dir()) / info.filename


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
    """Check a custom ONNX path the way rembg will (must exist, must lie inside rembg's home)."""
    cls = _session_class(CUSTOM_SESSION)
    try:
        resolved = Path(cls.validate_model_path(model_path=os.fspath(model_path)))
    except ValueError as err:
        raise ValueError(f"model_path {os.fspath(model_path)!r} must lie inside rembg's model folder "
                         f"{cls.rembg_home()} (set U2NET_HOME to a folder that contains it)") from err
    if not resolved.is_file():
        raise SaliencyUnavailable(f"custom mask model file not found: {resolved}; a painted mask still works")
    return resolved


def _get_session(model_name: str, model_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> Any:
    """The cached rembg session for ``model_name`` (or for the custom file ``model_path``), created once.

    The key includes the weights path, so pointing ``U2NET_HOME`` elsewhere gets a fresh session.
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
        from rembg import new_session

        kwargs = {"model_path": str(path)} if model_path is not None else {}
        start = time.perf_counter()
        if info is not None and not path.is_file():
            logger.info("downloading mask model %s (~%g MB) to %s", info.name, info.size_mb, path)
        try:
            with _quiet_pooch():
                session = new_session(name, **kwargs)
        except OSError as err:
            # requests.ConnectionError / HTTPError (offline, blocked, 404) and disk errors while downloading.
            if info is None:
                raise SaliencyUnavailable(f"cannot read custom mask model {path}: {err}") from err
            raise SaliencyUnavailable(_missing_message(
                info, path, f"weights not found at {path} and the download failed ({type(err).__name__})")) from err
        except ValueError as err:
            # pooch's checksum mismatch on a download.
            if info is None:
                raise
            reason = f"the download to {path} failed its checksum ({_first_line(err)})"
            raise SaliencyUnavailable(_missing_message(info, path, reason)) from err
        except _load_errors() as err:
            label = info.name if info is not None else f"custom model {path.name}"
            raise SaliencyUnavailable(f"mask model {label!r} could not load {path}: {type(err).__name__}: "
                                      f"{_first_line(err)}; replace the file (delete it to re-download); "
                                      f"a painted mask still works") from err
        logger.info("loaded mask model %s from %s in %.2fs", name, path, time.perf_counter() - start)
        _SESSIONS[key] = session
        return session


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
    rgb = to_rgb_array(image)
    if model_path is None:
        mask_model_info(model_name)  # validate before importing anything heavy
    session = _get_session(model_name, model_path)
    from rembg import remove

    start = time.perf_counter()
    # rembg min-max normalises the prediction; a flat image gives 0/0 -> NaN, which we map to 0 below.
    with np.errstate(invalid="ignore", divide="ignore"):
        # An ndarray in gives an HxW uint8 array out (a PIL image would give a PIL "L" image, and rembg would
        # also apply its EXIF rotation, so the mask could stop matching our pixels).
        out = remove(rgb, session=session, only_mask=True)
    mask = np.asarray(out)
    if mask.ndim == 3:  # defensive: an "LA"/RGB result from another rembg version
        mask = mask[..., 0]
    mask = _normalise_raw(mask)
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
