"""The looping-video papers' metrics on a played loop of pixels; :func:`loop_scores` gives them all at once.

Every metric reads decoded frames ``(F, H, W, 3)`` uint8 in the order they play (frame F-1 is followed by frame 0),
never latents. Pixel values are 0..255 throughout. Where a paper's metric needs trained weights (VBench's AMT and RAFT
networks) we use a weight-free stand-in and say exactly how it differs; CLIP metrics need a CLIP model and are
skipped without one.

=====================  =========================================================================================
key                    definition (and how it differs from the source)
=====================  =========================================================================================
``seam_ratio``         ours: the wrap step mean |frame 0 - frame F-1| / the median of the 8 steps around it (see
                       :mod:`.metrics`); about 1 when the wrap is like the steps beside it.
``interior_ratio``     ours: the largest other step, each against the median of the steps around it: a hidden seam.
``cycle_ratio``        ours: the largest step of the whole cycle (wrap included) against the steps around it, the
                       same for every rotation of the loop: where the wrap is placed cannot hide a jump from it.
``first_last_mse``     Mobius (Bi et al., SIGGRAPH 2025, arXiv:2502.20307), Table 1 "MSE": "the MSE of the first
                       frame and the last frame". Here: mean over pixels and channels of (frame 0 - frame F-1)^2 on
                       0..255 values; the paper does not state its value range or resolution.
``first_last_ssim``    A pixel stand-in for LoopAnimate's (Wang et al., arXiv:2404.09172) "Loop-C" first/last frame
                       consistency: SSIM(frame 0, frame F-1) (1 = identical). Not the paper's number: the
                       CLIP-space reading is ``first_last_clip``.
``ssim_motion``        ours: mean over t = 0..F-2 of 1 - SSIM(frame t, frame t+1); 0 = still. An amount of motion
                       in the spirit of LoopAnimate's motion column; we could not check the paper's own formula, so
                       it is not named after it.
``mse_f0``             LoopAnimate's MSE_F0: mean (frame 0 - reference)^2 on 0..255, the reference fitted to the
                       frame size by cover-and-centre-crop (as loopui fits reference images for generation).
``motion_smoothness``  VBench (Huang et al., CVPR 2024) motion smoothness, as reported by Mobius: drop the odd
                       frames, re-create each odd frame t from frames t-1 and t+1, score (255 - mean |re-created -
                       real|) / 255. VBench re-creates frames with the AMT-S network; we warp both neighbours half
                       way along one TV-L1 optical flow (scikit-image, no weights; computed at a 128-pixel short side
                       and scaled up) and average them, a classical flow interpolator: smooth, steady motion still
                       scores near 1, but occlusions and large motion are re-created worse than by AMT, so values
                       run somewhat lower than VBench's.
``dynamic_degree``     VBench dynamic degree: 1.0 if the clip moves, else 0.0 (a set's mean is the share of moving
                       clips, Mobius's "dynamic score"). Frames sub-sampled to about 8 fps; per consecutive pair the
                       mean of the top 5 % flow magnitudes; moving when at least round(4 * n / 16) pairs exceed
                       6 * (short side / 256) * max(1, 8 / fps) pixels. VBench uses RAFT flow at full size; we use
                       TV-L1 at a 128-pixel short side, magnitudes scaled to the frame's size (the threshold is
                       proportional to size, so only flow accuracy differs), and require at least one pair.
``flow_magnitude``     The same per-pair top-5 % flow magnitudes averaged, in pixels per frame at a 256-pixel short
                       side (VBench's threshold is 6 at 8 fps): a continuous amount of motion.
``clip_score``         Mobius Table 1 "CLIP": mean over frames of 100 * max(cos(CLIP(frame), CLIP(prompt)), 0)
                       (torchmetrics' CLIPScore, per frame). The papers' CLIP variant is not stated; ours is the one
                       you pass.
``clip_i``             CLIP-I: mean over frames of cos(CLIP(frame), CLIP(reference)) (DreamBooth-style, 0..1 scale).
``frame_consistency``  Mean over t of cos(CLIP(frame t), CLIP(frame t+1)) (the usual CLIP frame consistency).
``first_last_clip``    Loop-C in CLIP space: cos(CLIP(frame 0), CLIP(frame F-1)).
=====================  =========================================================================================

FVD (Frechet Video Distance, common in video-generation papers) is not computed: it compares a set of generated
videos with a set of real ones through a trained I3D network, and loopui scores single loops without weights.

SSIM everywhere is Wang et al. (2004) on BT.601 luma: Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range 255
(scikit-image ``structural_similarity``). Metrics read the clip as the papers do, as a clip from frame 0 to F-1;
with ``rotation`` (an anchored loop played from its image) they read the generated cycle, so that frame F-1 to 0 is
the real wrap, except MSE_F0 and CLIP-I, which are about the frame the loop is played from.

``warnings`` says when the seam scores cannot mean much: a still video (every step 0: a "perfect" loop by every
measure), a near-still one (a typical step under half a grey level, where codec noise outweighs the motion) and
noise (frames as different from their neighbours as from frames far away in the cycle, so no step can stand out).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import numpy as np

from loopui.media._arrays import as_frames, check_fps, luma
from loopui.media.flow import DEFAULT_FPS, dynamic_degree, motion_smoothness

if TYPE_CHECKING:
    from loopui.media.metrics import LoopMetrics

logger = logging.getLogger(__name__)

# SSIM's 11x11 Gaussian window (sigma 1.5) needs frames at least this big.
MIN_SSIM_SIDE = 11
# Half a grey level (mean absolute difference over the frame) is what H.264 alone moves a still by, mostly at the
# wrap (its first frame is the only key frame): the seam ratios count smaller steps as this much, so that codec noise
# does not divide into absurd ratios (a still MP4 read seam 41), and a typical step under it makes a near-still.
CODEC_NOISE_STEP = 0.5
# Noise: neighbouring frames are at least this close to as different as distant ones (smooth motion: well under 0.5).
NOISE_RATIO = 0.8
NOISE_SHORT_SIDE = 32


class FrameEmbedder(Protocol):
    """What the CLIP metrics need (``loopui.models.load_clip`` returns one)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, D)`` float embeddings."""
        ...

    def embed_text(self, text: str) -> np.ndarray:
        """A prompt -> ``(D,)`` float embedding."""
        ...


@dataclass(frozen=True)
class ScoreInfo:
    """How to show one score: its label, which way is better (``"lower"``, ``"higher"``, ``"1"`` for about one, or
    ``""`` for a plain measurement), its source and its decimals."""

    key: str
    label: str
    better: str
    source: str
    digits: int

    @property
    def arrow(self) -> str:
        """``↓``, ``↑``, ``≈1`` or empty."""
        return {"lower": "↓", "higher": "↑", "1": "≈1"}.get(self.better, "")


SCORES: tuple[ScoreInfo, ...] = (
    ScoreInfo("seam_ratio", "seam ratio", "1", "ours", 3),
    ScoreInfo("interior_ratio", "interior ratio", "1", "ours", 3),
    ScoreInfo("cycle_ratio", "cycle ratio", "1", "ours", 3),
    ScoreInfo("first_last_mse", "first/last MSE", "lower", "Mobius T1", 2),
    ScoreInfo("first_last_ssim", "first/last SSIM (Loop-C stand-in)", "higher", "ours, for LoopAnimate", 4),
    ScoreInfo("ssim_motion", "SSIM motion", "", "ours", 4),
    ScoreInfo("mse_f0", "MSE_F0", "lower", "LoopAnimate", 2),
    ScoreInfo("motion_smoothness", "motion smoothness", "higher", "VBench (TV-L1)", 4),
    ScoreInfo("dynamic_degree", "dynamic degree", "higher", "VBench (TV-L1)", 2),
    ScoreInfo("flow_magnitude", "flow magnitude", "", "VBench (TV-L1)", 2),
    ScoreInfo("clip_score", "CLIP score", "higher", "Mobius T1", 2),
    ScoreInfo("clip_i", "CLIP-I", "higher", "CLIP", 4),
    ScoreInfo("frame_consistency", "frame consistency", "higher", "CLIP", 4),
    ScoreInfo("first_last_clip", "Loop-C (CLIP)", "higher", "CLIP", 4),
)
SCORE_KEYS: tuple[str, ...] = tuple(info.key for info in SCORES)
# The compact line (CLI summary, page) leaves out what is already shown beside it (seam, interior and cycle ratios).
_COMPACT = ("first_last_mse", "first_last_ssim", "ssim_motion", "mse_f0", "motion_smoothness", "dynamic_degree",
            "clip_score", "clip_i")


def score_info(key: str) -> ScoreInfo:
    """The :class:`ScoreInfo` of a score key."""
    for info in SCORES:
        if info.key == key:
            return info
    raise KeyError(f"unknown score {key!r}; known: {', '.join(SCORE_KEYS)}")


def format_score(key: str, value: Any) -> str:
    """A score as text with its decimals; ``-`` when missing."""
    if value is None:
        return "-"
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.{score_info(key).digits}f}"


def format_scores(scores: dict[str, Any]) -> str:
    """The papers' metrics in one compact line, e.g. ``first/last MSE 12.30 · first/last SSIM (Loop-C stand-in)
    0.9120 · ...``."""
    parts = [f"{score_info(key).label} {format_score(key, scores[key])}" for key in _COMPACT
             if scores.get(key) is not None]
    return " · ".join(parts)


# -- frames -----------------------------------------------------------------------------------------------------------

def _fit_reference(reference: Any, width: int, height: int) -> np.ndarray:
    from loopui.media.images import load_reference_image

    return np.asarray(load_reference_image(reference, width, height), dtype=np.uint8)


# -- pixel metrics ----------------------------------------------------------------------------------------------------

def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def frame_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two ``(H, W, 3)`` uint8 frames on BT.601 luma (Wang et al. 2004: Gaussian sigma 1.5, K1 0.01,
    K2 0.03, data range 255). Raises ``ValueError`` for frames under 11 pixels on a side."""
    from skimage.metrics import structural_similarity

    if min(a.shape[:2]) < MIN_SSIM_SIDE:
        raise ValueError(f"SSIM needs frames of at least {MIN_SSIM_SIDE}x{MIN_SSIM_SIDE} pixels, got {a.shape[:2]}")
    return float(structural_similarity(luma(a), luma(b), data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def first_last_mse(frames: Any) -> float:
    """Mobius Table 1 MSE: mean (frame 0 - frame F-1)^2 over pixels and channels, 0..255 values."""
    x = as_frames(frames)
    return _mse(x[0], x[-1])


def first_last_ssim(frames: Any) -> float:
    """A pixel stand-in for LoopAnimate's Loop-C (first/last frame consistency): SSIM(frame 0, frame F-1),
    1 = identical."""
    x = as_frames(frames)
    return frame_ssim(x[0], x[-1])


def ssim_motion(frames: Any) -> float:
    """An amount of motion: mean over consecutive pairs of 1 - SSIM (0 = a still clip)."""
    x = as_frames(frames)
    return float(np.mean([1.0 - frame_ssim(x[t], x[t + 1]) for t in range(len(x) - 1)]))


def mse_f0(frames: Any, reference: Any) -> float:
    """LoopAnimate's MSE_F0: mean (frame 0 - reference)^2, 0..255, the reference (path, PIL image or array)
    fitted to the frame size by cover-and-centre-crop."""
    x = as_frames(frames, minimum=1)
    return _mse(x[0], _fit_reference(reference, x.shape[2], x.shape[1]))


# -- optical flow (weight-free stand-ins for VBench's networks) -------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm == 0, 1.0, norm)


def clip_scores(frames: Any, clip: FrameEmbedder, prompt: Optional[str] = None,
                reference: Any = None) -> dict[str, Optional[float]]:
    """CLIP score (with ``prompt``), CLIP-I (with ``reference``), frame consistency and Loop-C in CLIP space.

    See the module table for the definitions; ``clip`` embeds frames and text (``loopui.models.load_clip``).
    """
    x = as_frames(frames)
    e = _unit(clip.embed_images(x))
    if e.shape[0] != len(x):
        raise ValueError(f"the CLIP embedder returned {e.shape[0]} embeddings for {len(x)} frames")
    out: dict[str, Optional[float]] = {
        "frame_consistency": float(np.mean(np.sum(e[:-1] * e[1:], axis=-1))),
        "first_last_clip": float(e[0] @ e[-1]),
        "clip_score": None,
        "clip_i": None,
    }
    if prompt is not None and prompt.strip():
        text = _unit(clip.embed_text(prompt))
        out["clip_score"] = float(np.mean(100.0 * np.maximum(e @ text, 0.0)))
    if reference is not None:
        ref = _unit(clip.embed_images(_fit_reference(reference, x.shape[2], x.shape[1])[None]))[0]
        out["clip_i"] = float(np.mean(e @ ref))
    return out


# -- all of them --------------------------------------------------------------------------------------------------

def _optional(name: str, compute, *args) -> Any:
    """Run one metric; a clip too small or short for it gives None (logged), other errors propagate."""
    try:
        return compute(*args)
    except ValueError as exc:
        logger.debug("%s not measured: %s", name, exc)
        return None


def _rotation(rotation: Any, num_frames: int) -> int:
    if isinstance(rotation, bool) or not isinstance(rotation, (int, np.integer)) or not 0 <= rotation < num_frames:
        raise ValueError(f"rotation must be a whole number from 0 to the number of frames - 1 ({num_frames - 1}), "
                         f"got {rotation!r}")
    return int(rotation)


def pixel_loop_metrics(frames: Any, rotation: int = 0) -> "LoopMetrics":
    """:func:`loopui.media.loop_metrics` of played pixel frames, measured at the generated cycle's wrap.

    ``rotation``: how many frames the played loop was rotated forward from the generated cycle (an anchored loop is
    played from its image: ``anchor_frame_shift`` in a loopui sidecar), so played frame 0 is cycle frame
    ``rotation``. The seam is measured between cycle frames F-1 and 0; frame numbers in the result are played ones.
    Steps under :data:`CODEC_NOISE_STEP` grey levels count as that much: codec noise at that level must not turn
    into huge ratios.
    """
    from dataclasses import replace

    from loopui.media.metrics import loop_metrics

    x = as_frames(frames)
    rotation = _rotation(rotation, len(x))
    metrics = loop_metrics(np.roll(x, rotation, axis=0), floor=CODEC_NOISE_STEP)
    if rotation == 0:
        return metrics

    def played(pair: tuple[int, int]) -> tuple[int, int]:
        return ((pair[0] - rotation) % len(x), (pair[1] - rotation) % len(x))

    return replace(metrics, worst_step=played(metrics.worst_step),
                   worst_interior_step=played(metrics.worst_interior_step))


def _small_luma(x: np.ndarray) -> np.ndarray:
    """``(F, h, w)`` float32 luma, the short side brought down to NOISE_SHORT_SIDE by box averaging."""
    from PIL import Image

    height, width = x.shape[1:3]
    scale = min(1.0, NOISE_SHORT_SIDE / min(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = []
    for frame in x:
        image = Image.fromarray(luma(frame).astype(np.float32), mode="F")
        out.append(np.asarray(image if scale == 1.0 else image.resize(size, Image.Resampling.BOX), dtype=np.float32))
    return np.stack(out)


def _noise_ratio(x: np.ndarray) -> Optional[float]:
    """The median step between neighbouring frames / the largest median step between frames k apart (k = 2..F/2,
    around the cycle), on small luma frames; about 1 when neighbours are no closer than distant frames (noise),
    well under 1 for motion. None for fewer than 4 frames."""
    if len(x) < 4:
        return None
    small = _small_luma(x)
    lag = [float(np.median(np.abs(np.roll(small, -k, axis=0) - small).mean(axis=(1, 2))))
           for k in range(1, len(x) // 2 + 1)]
    far = max(lag[1:])
    return None if far == 0.0 else lag[0] / far


def loop_warnings(frames: Any, metrics: Optional["LoopMetrics"] = None) -> list[str]:
    """Why the seam scores of these played frames may mean little: a still video, a near-still one, or noise.

    Each warning is one line starting with its kind (``still:``, ``near-still:``, ``noise:``); none for an ordinary
    moving video. ``metrics`` (from :func:`pixel_loop_metrics`) saves measuring the steps again.
    """
    x = as_frames(frames)
    metrics = pixel_loop_metrics(x) if metrics is None else metrics
    if metrics.max_step == 0.0:
        return ["still: no frame differs from the next, so every loop score is trivially perfect and says nothing"]
    if metrics.median_step < CODEC_NOISE_STEP:
        return [f"near-still: a typical step between frames is {metrics.median_step:.2f} grey levels, under the "
                f"{CODEC_NOISE_STEP:g} that codec noise alone makes, so the seam ratios say little"]
    ratio = _noise_ratio(x)
    if ratio is not None and ratio >= NOISE_RATIO:
        return [f"noise: frames differ from their neighbours as much as from frames far apart in the cycle "
                f"({ratio:.2f}x), as noise, flicker or cuts do, so no step can stand out as a seam"]
    return []


def loop_scores(frames: Any, reference: Any = None, prompt: Optional[str] = None,
                clip: Optional[FrameEmbedder] = None, fps: Optional[float] = None,
                flow: bool = True, rotation: int = 0) -> dict[str, Any]:
    """Every metric of the module table for one played loop, as a JSON-ready dict.

    Args:
        frames: ``(F, H, W, 3)`` uint8 (or float in [0, 1]) as played, F >= 2.
        reference: the reference image (path, PIL image or array) for ``mse_f0`` and ``clip_i``; None skips them.
        prompt: the prompt, for ``clip_score`` (needs ``clip``).
        clip: a CLIP embedder (``loopui.models.load_clip``); None skips the CLIP metrics.
        fps: playback rate, for dynamic degree (default 8, VBench's reference rate).
        flow: False skips the optical-flow metrics (``motion_smoothness``, ``dynamic_degree``, ``flow_magnitude``),
            the only slow ones (about 0.2 s per frame on a CPU).
        rotation: how many frames the played loop was rotated forward from the generated cycle (an anchored loop
            starts on its image; ``anchor_frame_shift`` in a loopui sidecar). The wrap scores (seam and interior
            ratios, first/last MSE and SSIM, Loop-C) are then measured at the cycle's real wrap, MSE_F0 on the
            played frame 0. 0 (the default) reads the file as it plays.

    Returns:
        ``num_frames``, ``height``, ``width``, ``fps``, every key of :data:`SCORE_KEYS` (a metric that was not
        asked for or cannot be measured -- frames too small, too few, no reference -- is None) and ``warnings``: a
        list of lines saying why the seam scores may mean little (:func:`loop_warnings`), empty for ordinary video.

    Raises:
        ValueError: frames of the wrong shape or dtype, fewer than 2 frames, a bad fps or rotation.
        loopui.media.ImageInputError: an unreadable reference image.
    """
    played = as_frames(frames)
    fps = DEFAULT_FPS if fps is None else fps
    check_fps(fps)
    seams = pixel_loop_metrics(played, rotation)
    x = np.roll(played, rotation, axis=0)  # the generated cycle: frame F-1 to frame 0 is its real wrap
    scores: dict[str, Any] = dict(num_frames=int(x.shape[0]), fps=float(fps), width=int(x.shape[2]),
                                  height=int(x.shape[1]))
    scores.update({key: None for key in SCORE_KEYS})
    scores.update(seam_ratio=float(seams.seam_ratio), interior_ratio=float(seams.interior_ratio),
                  cycle_ratio=float(seams.cycle_ratio), first_last_mse=_mse(x[0], x[-1]),
                  first_last_ssim=_optional("first_last_ssim", frame_ssim, x[0], x[-1]),
                  ssim_motion=_optional("ssim_motion", ssim_motion, x))
    if reference is not None:
        scores["mse_f0"] = mse_f0(played, reference)
    if flow:
        scores["motion_smoothness"] = _optional("motion_smoothness", motion_smoothness, x)
        dynamic = _optional("dynamic_degree", dynamic_degree, x, fps)
        if dynamic is not None:
            scores["dynamic_degree"] = 1.0 if dynamic[0] else 0.0
            scores["flow_magnitude"] = dynamic[1]
    if clip is not None:
        scores.update(clip_scores(x, clip, prompt=prompt, reference=reference))
    scores["warnings"] = loop_warnings(played, seams)
    return scores


def mean_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Per-key means over several score dicts (None entries left out; None when no row has the key)."""
    out: dict[str, Optional[float]] = {}
    for key in SCORE_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
