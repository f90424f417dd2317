"""``loopui score``: looping videos (ours or any other program's) scored with the looping-video papers' metrics."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from loopui.cli.common import EXIT_OK, fail
from loopui.messages import one_line


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` sub-command's arguments to ``parser``."""
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="Video files (MP4, GIF, WebP, ...), as played.")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="Reference image: MSE_F0 (frame 0 vs. the image) and, with --clip, CLIP-I.")
    parser.add_argument("--prompt", default=None, metavar="TEXT", help="The prompt: CLIP score (needs --clip).")
    parser.add_argument("--clip", default=None, metavar="ID_OR_DIR",
                        help="CLIP model (hub id or local folder, e.g. openai/clip-vit-base-patch32) for CLIP score, "
                             "CLIP-I, frame consistency and Loop-C in CLIP space. Default: none (those are skipped).")
    parser.add_argument("--fps", type=float, default=None,
                        help="Playback rate for dynamic degree (default: the file's, else 8).")
    parser.add_argument("--fast", action="store_true",
                        help="Skip the optical-flow metrics (motion smoothness, dynamic degree): about 0.2 s per "
                             "frame on a CPU.")
    parser.add_argument("--json", action="store_true", help="Print a JSON list, one object per file.")
    parser.add_argument("--device", default=None, help="Torch device for CLIP (default: cuda when available).")
    parser.add_argument("--verbose", "-v", action="store_true", help="Log details.")


def _score_table(rows: Sequence[dict]) -> str:
    """Metrics down, files across (one column per file), with each metric's better direction."""
    from loopui.media.scores import SCORES, format_score

    names = [Path(row["file"]).name for row in rows]
    header = ["metric", "better", *names]
    shown = [info for info in SCORES if any(row.get(info.key) is not None for row in rows)]
    body = [[info.label, info.arrow, *[format_score(info.key, row.get(info.key)) for row in rows]] for info in shown]
    body.append(["frames", "", *[f"{row['num_frames']} @ {row['fps']:g} fps" for row in rows]])
    body.append(["size", "", *[f"{row['width']}x{row['height']}" for row in rows]])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *body]]
    lines += [f"{name}: warning: {warning}" for name, row in zip(names, rows) for warning in row.get("warnings", [])]
    return "\n".join(lines)


def run_score(args: argparse.Namespace) -> int:
    """Score every video of ``args`` and print a table (or JSON); 0, or 2 on a bad input."""
    import json

    from loopui.media import ImageInputError, VideoInputError, load_video, loop_scores, open_image

    # 1. Check everything before the slow parts: the options, the reference image, every video
    if args.prompt is not None and args.clip is None:
        return fail("--prompt is only used by the CLIP score: pass --clip MODEL too")
    if args.prompt is not None and not args.prompt.strip():
        return fail("prompt is empty [--prompt]")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        return fail(f"fps must be a positive number, got {args.fps:g} [--fps]")
    try:
        reference = None if args.image is None else open_image(args.image)
        videos = []
        for path in args.videos:
            frames, fps = load_video(path)
            if len(frames) < 2:
                raise VideoInputError(f"video file {path!r} has {len(frames)} frame; a loop needs at least 2")
            videos.append((path, frames, args.fps or fps))
    except ImageInputError as exc:
        return fail(f"{one_line(exc)} [--image]")
    except VideoInputError as exc:
        return fail(one_line(exc))

    # 2. CLIP, when asked for
    clip = None
    if args.clip is not None:
        from loopui.models import ModelLoadError, load_clip

        try:
            clip = load_clip(args.clip, device=args.device)
        except ModelLoadError as exc:
            return fail(one_line(exc))
        except (ValueError, RuntimeError) as exc:  # e.g. an unknown --device
            return fail(f"{one_line(exc)} [--device]")

    # 3. Score and print
    rows = []
    for path, frames, fps in videos:
        scores = loop_scores(frames, reference=reference, prompt=args.prompt, clip=clip, fps=fps, flow=not args.fast)
        rows.append({"file": str(path), **scores})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_score_table(rows))
    return EXIT_OK
