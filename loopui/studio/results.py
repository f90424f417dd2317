"""What a finished (or failed) generation gives the page: the outcome with its files and texts, the gallery's
history entry, and one-line error messages."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from loopui.engine.request import size_text
from loopui.messages import one_line
from loopui.studio.requests import REQUEST_FIELDS

MAX_HISTORY = 12
# The knobs a gallery click restores (the reference image, the painted mask and the clip are not restored).
# A gallery click restores the knobs, not the files: no image, mask, clip or LoRAs (an upload is gone by then).
RESTORED_FIELDS: tuple[str, ...] = tuple(f for f in REQUEST_FIELDS if f not in ("image", "mask", "video", "loras"))

logger = logging.getLogger(__name__)


@dataclass
class LoopOutcome:
    """What one finished generation gives the page."""

    index: int
    video: Path
    files: list[Path]
    strip: Path
    thumb: Path
    seam_ratio: Optional[float]
    seam_text: str
    details: str
    warnings: list[str]
    model_text: str
    shift_skip: int


@dataclass
class HistoryEntry:
    """One loop of the session gallery: its knobs (UI values) and files."""

    index: int
    model: str
    values: dict
    video: str
    files: list[str]
    strip: str
    thumb: str
    caption: str
    used_image: bool = False
    used_video: bool = False
    used_loras: bool = False


def seam_summary(seam_ratio: Optional[float], worst_text: str = "", interior_ratio: Optional[float] = None,
                 cycle_ratio: Optional[float] = None) -> str:
    """The seam, interior and cycle ratios with their meaning in one line (markdown). The verdict reads the cycle
    ratio when there is one (the largest jump anywhere, wrap included: where the loop starts cannot hide it)."""
    if seam_ratio is None:
        return "Seam ratio: not measured (too few frames)."
    judged = seam_ratio if cycle_ratio is None else cycle_ratio
    where = "at the wrap" if cycle_ratio is None else "in the loop"
    verdict = ("seamless" if judged < 1.3 else f"a slight bump {where}" if judged < 2.0 else f"a visible cut {where}")
    line = (f"**Seam ratio {seam_ratio:.2f}** — the jump from the last frame back to the first is "
            f"{seam_ratio:.2f}× the steps around it (≈ 1 is seamless)")
    line += "." if cycle_ratio is not None else f": {verdict}."
    if interior_ratio is not None:
        line += (f" **Interior ratio {interior_ratio:.2f}** — the largest jump inside the loop, same scale "
                 f"(a hidden seam shows here; seam polish lowers it).")
    if cycle_ratio is not None:
        line += (f" **Cycle ratio {cycle_ratio:.2f}** — the largest jump anywhere in the loop, wrap included, "
                 f"against the steps around it (the same wherever the loop starts): {verdict}.")
    return f"{line} {worst_text[:1].upper()}{worst_text[1:]}." if worst_text else line


def _scores_line(scores: dict) -> str:
    """The papers' metrics as one more line under the seam ratio (empty when there are none)."""
    from loopui.media import format_scores

    line = format_scores(scores) if scores else ""
    return f"\n\nScores: {line}." if line else ""


def loop_outcome(index: int, render: Any, stem: Path, loaded: Any, notes: Optional[list] = None) -> LoopOutcome:
    """The page's view of a finished render: its files, the seam strips and thumbnail written beside them, the
    seam and score texts, one line of details and the warnings (``notes`` from loading first)."""
    from PIL import Image

    from loopui.media import seam_strip

    result, plan = render.result, render.result.plan
    strip = stem.with_name(stem.name + "-seam.png")
    # Top: the generated cycle's wrap (last 3 frames, then the first 3; an anchored loop plays from its image, which
    # moves the wrap inside the played loop); below: around the largest jump inside the loop.
    count, shift = len(result.frames), result.anchor_frame_shift
    rows = [seam_strip(result.frames, n=3, around=((count - shift - 1) % count, (count - shift) % count))]
    if result.worst_step is not None:
        rows.append(seam_strip(result.frames, n=3, around=result.worst_step))
    gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([rows[0], gap, *rows[1:]]) if len(rows) > 1 else rows[0]).save(strip)
    thumb = stem.with_name(stem.name + "-thumb.png")
    Image.fromarray(result.frames[0]).save(thumb)
    timings = result.timings
    details = (f"{len(result.frames)} frames · {size_text(plan.width, plan.height)} · L = {plan.num_latents} "
               f"latents · shift {plan.shift_skip} · RoPE scale {plan.rope_scale:.2f} · "
               f"{timings.get('total', 0.0):.1f} s (denoise {timings.get('denoise', 0.0):.1f} s, decode "
               f"{timings.get('decode', 0.0):.1f} s)")
    files = [Path(f) for f in render.files] + [Path(render.sidecar)]
    return LoopOutcome(index=index, video=Path(render.files[0]), files=files, strip=strip, thumb=thumb,
                       seam_ratio=result.seam_ratio,
                       seam_text=seam_summary(result.seam_ratio, result.describe_worst_step(),
                                              result.interior_ratio, result.cycle_ratio) + _scores_line(result.scores),
                       details=details,
                       warnings=list(notes or []) + list(result.warnings) + list(result.scores.get("warnings", [])),
                       model_text=f"{loaded.describe()}; {runtime_text(result)}", shift_skip=plan.shift_skip)


def history_entry(outcome: LoopOutcome, values: dict, model_id: str) -> HistoryEntry:
    """A gallery entry: the UI values that made the loop (to restore them) and its files."""
    kept = {name: values.get(name) for name in RESTORED_FIELDS}
    kept["recipe"] = values.get("recipe")
    prompt = str(values.get("prompt") or "")
    short = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    seam = "" if outcome.seam_ratio is None else f" · seam {outcome.seam_ratio:.2f}"
    caption = f"#{outcome.index} “{short}” · seed {values.get('seed')} · shift {outcome.shift_skip}{seam}"
    return HistoryEntry(index=outcome.index, model=model_id, values=kept, video=str(outcome.video),
                        files=[str(f) for f in outcome.files], strip=str(outcome.strip),
                        thumb=str(outcome.thumb), caption=caption,
                        used_image=values.get("image") is not None,
                        used_video=values.get("video") is not None, used_loras=bool(values.get("loras")))


def error_text(exc: BaseException) -> str:
    """A one-line message for the page from an exception raised by a generation."""
    from loopui.engine.errors import NonFiniteOutput
    from loopui.media import ImageInputError
    from loopui.models import ModelLoadError, OutOfGPUMemory
    from loopui.saliency import SaliencyUnavailable
    from loopui.studio.masks import NO_MASK_MODEL

    text = one_line(exc)
    if isinstance(exc, SaliencyUnavailable) or isinstance(exc.__cause__, SaliencyUnavailable):
        logger.warning("no automatic mask: %s", text)  # the operator's details (path, URL) stay in the log
        return (f"mask_model: {NO_MASK_MODEL.format(model='the mask model')}; "
                f"paint the region that may move, or set motion_region to everything")
    if isinstance(exc, ModelLoadError):
        return _load_error_text(exc, text)
    if isinstance(exc, (ValueError, SaliencyUnavailable, ImageInputError)):
        return text
    if isinstance(exc, (OutOfGPUMemory, NonFiniteOutput)):
        return text[:1].upper() + text[1:]
    return f"generation failed ({type(exc).__name__}): {text}"


def _load_error_text(exc: BaseException, text: str) -> str:
    """A model that could not be fetched or loaded, in whole sentences: the loader's own one-liner can be cut to a
    length limit mid-word, so its reason is rebuilt from the first sentence of the underlying error."""
    cause = exc.__cause__
    head, _, rest = text.partition(": ")
    advice = rest.partition(" -- ")[2]
    if cause is None or not rest:
        return text
    reason = one_line(cause)
    reason = re.split(r"(?<=[a-z0-9)])\. |\s\(", reason, maxsplit=1)[0].rstrip(". ")
    return f"{head}: {reason}." + (f" To fix: {advice}" if advice else "")


def runtime_text(result: Any) -> str:
    """How the denoiser(s) ran, for the status line and the CLI summary: ``attention sage, compiled``."""
    return f"attention {result.attention}" + (", compiled" if result.compiled else "")
