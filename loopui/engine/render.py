"""``render_loop``: generate a loop and write its files — the one function the CLI and the UI both call."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import LoopInterrupted
from .loop import LoopResult, ProgressCallback, generate_loop
from .plan import LoopPlan
from .request import LoopRequest

logger = logging.getLogger(__name__)


@dataclass
class RenderResult:
    result: LoopResult
    files: list
    sidecar: Path


def check_outputs(outputs: Sequence) -> list[Path]:
    """Output paths as ``Path``s; raises ``ValueError`` for a missing or unsupported suffix before any work."""
    from loopui.media import SUPPORTED_SUFFIXES

    paths = [Path(p) for p in outputs]
    if not paths:
        raise ValueError("no output file given")
    for path in paths:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(f"unsupported output {str(path)!r}: use one of {', '.join(SUPPORTED_SUFFIXES)}")
    return paths


def render_loop(pipe, request: Optional[LoopRequest], outputs: Sequence, model_id: Optional[str] = None,
                callback: Optional[ProgressCallback] = None, cancel_event: Optional[threading.Event] = None,
                plan: Optional[LoopPlan] = None) -> RenderResult:
    """Generate with :func:`generate_loop`, export every output (by suffix) and write a JSON sidecar beside the first.

    The sidecar holds the model, every setting (resolved), the seed, the seam metrics, the papers' scores and timings:
    enough to reproduce the loop. A caller that planned already passes its ``plan`` (see :func:`generate_loop`).
    ``cancel_event`` is honoured while denoising, decoding and between files (the files
    already written by this call are removed).
    """
    from loopui import __version__
    from loopui.media import export_video, write_sidecar

    paths = check_outputs(outputs)
    result = generate_loop(pipe, request, output_type="np", callback=callback, cancel_event=cancel_event, plan=plan)
    if model_id:
        result.model_id = model_id
    files: list[Path] = []
    for index, path in enumerate(paths):
        if cancel_event is not None and cancel_event.is_set():
            # A stopped run leaves no half set of files behind.
            for written in files:
                written.unlink(missing_ok=True)
            raise LoopInterrupted(f"stopped while writing the files ({index} of {len(paths)} written, removed)")
        if callback:
            callback("export", index, len(paths))
        files.append(Path(export_video(result.frames, path, fps=result.plan.fps)))
    if callback:
        callback("export", len(paths), len(paths))
    settings = result.settings
    recipe = {"recipe": dict(result.plan.recipe)} if result.plan.recipe is not None else {}
    sidecar = write_sidecar(paths[0], {
        "loopui_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": settings["model"],
        **recipe,  # the speed recipe that filled some values (they are in the settings)
        "seed": result.plan.request.seed,
        "settings": settings,
        "seam_ratio": result.seam_ratio,
        "interior_ratio": result.interior_ratio,
        "cycle_ratio": result.cycle_ratio,
        "worst_step": list(result.worst_step) if result.worst_step else None,
        "worst_step_text": result.describe_worst_step(),
        "latent_seam_ratio": result.latent_seam_ratio,
        "latent_interior_ratio": result.latent_interior_ratio,
        "latent_cycle_ratio": result.latent_cycle_ratio,
        "scores": result.scores,
        "num_frames_written": int(result.frames.shape[0]),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "warnings": result.warnings,
        "files": [str(f) for f in files],
    })
    return RenderResult(result=result, files=files, sidecar=Path(sidecar))
