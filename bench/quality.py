"""Quality benchmark: a loop per prompt and sampler, scored with the looping-video papers' metrics (Table-1 style).

    python bench/quality.py --model THUDM/CogVideoX-5b --prompts assets/prompts.txt --out bench/results/quality
    python bench/quality.py --model demo --prompts assets/prompts.txt --limit 2 --steps 2 --frames 17 \\
        --height 32 --width 48 --out /tmp/quality          # a CPU smoke run (the demo model makes noise)
    python bench/quality.py --model demo --instrument --limit 1 --seeds 0,1,2 --height 128 --width 192 \
        --save-videos                                      # the exact toy model: the README's table

Rows (``--samplers``, all by default):

- ``plain``: ``shift_skip`` 0, ordinary non-looping sampling (the baseline, Mobius's "CogVideoX" row);
- ``shift``: the Mobius latent shift at the defaults (seam polish off, the paper's trajectory);
- ``fast``, ``balanced``, ``strong``: latent shift with that seam polish level;
- ``window``: a cycle twice as long (2L latents), denoised in wrapping windows of the trained length.

Each row is the mean over prompts and seeds of every metric of ``loopui.media.loop_scores`` (CLIP score, CLIP-I,
frame consistency with ``--clip``), plus seconds per loop. Writes ``quality.md`` (the table) and ``quality.json``
(the table, the configuration and every loop's scores) into ``--out``; ``--save-videos`` keeps the loops as MP4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (row label, LoopRequest overrides); "frames_scale" doubles the cycle (window mode).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain (shift 0)", {"shift_skip": 0}),
    "shift": ("latent shift", {}),
    "fast": ("seam polish fast", {"seam_polish": "fast"}),
    "balanced": ("seam polish balanced", {"seam_polish": "balanced"}),
    "strong": ("seam polish strong", {"seam_polish": "strong"}),
    "window": ("window mode (2L)", {"window_mode": "window", "frames_scale": 2}),
}


def read_prompts(path: Path, limit: Optional[int] = None) -> list[str]:
    """Prompts from a text file, one per line; blank lines and ``#`` comments skipped."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    return prompts[:limit] if limit else prompts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="THUDM/CogVideoX-5b", help="hub id, local folder or 'demo'")
    parser.add_argument("--prompts", type=Path, default=ROOT / "assets" / "prompts.txt")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"subset of: {', '.join(SAMPLERS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--frames", type=int, default=49, help="frames requested (window mode: a cycle twice as long)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--clip", default=None, metavar="ID_OR_DIR", help="CLIP model for the CLIP metrics")
    parser.add_argument("--fast", action="store_true", help="skip the optical-flow metrics")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    parser.add_argument("--save-videos", action="store_true", help="also write every loop as MP4 into --out")
    parser.add_argument("--instrument", action="store_true",
                        help="replace the transformer by the exact toy denoiser of tests/instrument.py (it ignores "
                             "the prompt: vary --seeds, not prompts); the README's toy figures")
    return parser


def _request(spec: Any, args: argparse.Namespace, prompt: str, seed: int, overrides: dict[str, Any]) -> Any:
    from loopui.engine import LoopRequest

    overrides = dict(overrides)
    frames = args.frames
    if overrides.pop("frames_scale", 1) != 1:
        length = (frames - 1) // spec.temporal_compression + 1
        frames = spec.temporal_compression * (2 * length - 1) + 1  # exactly 2L latents
    values = dict(prompt=prompt, num_frames=frames, num_inference_steps=args.steps, seed=seed, fps=args.fps,
                  height=args.height or spec.native_height, width=args.width or spec.native_width,
                  scheduler=spec.scheduler, guidance_scale=spec.guidance_scale, use_dynamic_cfg=spec.use_dynamic_cfg)
    values.update(overrides)
    return LoopRequest(**values).validate()


def markdown(rows: Sequence[dict], config: dict) -> str:
    """The Table-1-style comparison: one row per sampler, one column per metric that was measured."""
    from loopui.media.scores import SCORES, format_score

    shown = [info for info in SCORES if any(row.get(info.key) is not None for row in rows)]
    head = (f"Model `{config['model']}`, {config['prompts']} prompts x seeds {config['seeds']}, "
            f"{config['frames']} frames requested, {config['width']}x{config['height']}, {config['steps']} steps, "
            f"{config['device']}. Mean over loops; ↓/↑: lower/higher is better; flow metrics with TV-L1 (no "
            f"weights), see the README's metric notes.")
    cols = ["sampler", "loops", *[f"{info.label} {info.arrow}".rstrip() for info in shown], "s / loop"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for row in rows:
        cells = [row["label"], str(row["loops"]), *[format_score(info.key, row.get(info.key)) for info in shown],
                 f"{row['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run(pipe: Any, requests: dict, clip: Any, args: argparse.Namespace) -> list[dict]:
    """Generate and score every loop; one dict per loop (its sampler, prompt, seed, seconds and scores)."""
    from loopui.engine import generate_loop
    from loopui.media import export_video, loop_scores

    args.out.mkdir(parents=True, exist_ok=True)
    loops: list[dict] = []
    for (name, prompt, seed), request in requests.items():
        t0 = time.perf_counter()
        result = generate_loop(pipe, request)
        seconds = time.perf_counter() - t0  # generation only; scoring is not the sampler's cost
        scores = loop_scores(result.frames, prompt=prompt, clip=clip, fps=request.fps, flow=not args.fast)
        if args.save_videos:
            export_video(result.frames, args.out / f"{name}-{len(loops):03d}.mp4", fps=request.fps)
        loops.append({"sampler": name, "prompt": prompt, "seed": seed, "seconds": seconds,
                      "num_latent_frames": result.settings["num_latent_frames"], **scores})
        print(f"{SAMPLERS[name][0]:22s} seed {seed} seam {scores['seam_ratio']:.3f} interior "
              f"{scores['interior_ratio']:.3f} first/last MSE {scores['first_last_mse']:.1f} ({seconds:.1f} s) "
              f"{prompt[:40]}", flush=True)
    return loops


@contextlib.contextmanager
def _instrument(pipe: Any) -> Iterator[None]:
    sys.path.insert(0, str(ROOT / "tests"))
    from instrument import installed  # tests/instrument.py: the exact posterior-mean denoiser of a GP video prior

    with installed(pipe):
        yield


def main(argv: Optional[Sequence[str]] = None, pipe: Any = None) -> int:
    """Run the benchmark; returns 0 (bad arguments exit 2 with one line). ``pipe``: an already built pipeline of
    ``--model`` to use instead of loading it (a notebook's, or a test's tiny one)."""
    parser = _parser()
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        parser.error(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}")
    if not args.prompts.is_file():
        parser.error(f"prompts file {str(args.prompts)!r} not found")
    prompts = read_prompts(args.prompts, args.limit)
    if not prompts:
        parser.error(f"no prompts in {args.prompts}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")

    from loopui.media.scores import mean_scores
    from loopui.models import ModelLoadError, ModelManager, load_clip, spec_for

    try:
        spec = spec_for(args.model)
        requests = {(name, p, s): _request(spec, args, p, s, SAMPLERS[name][1])
                    for name in samplers for p in prompts for s in seeds}
    except ValueError as exc:
        parser.error(str(exc))
    try:
        if pipe is None:
            loaded = ModelManager(device=args.device).get(args.model, dtype=args.dtype)
            pipe, device = loaded.pipe, loaded.describe()
        else:
            device = f"{spec.model_id} (given pipeline) on {pipe.device}"
        clip = load_clip(args.clip, device=args.device) if args.clip else None
    except (ModelLoadError, ValueError) as exc:
        parser.error(" ".join(str(exc).split()))
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with _instrument(pipe) if args.instrument else contextlib.nullcontext():
        loops = _run(pipe, requests, clip, args)

    rows = []
    for name in samplers:
        mine = [loop for loop in loops if loop["sampler"] == name]
        rows.append({"sampler": name, "label": SAMPLERS[name][0], "loops": len(mine), **mean_scores(mine),
                     "seconds": sum(loop["seconds"] for loop in mine) / len(mine)})
    model = spec.model_id + (" + the exact toy denoiser (tests/instrument.py)" if args.instrument else "")
    config = {"model": model, "prompts": len(prompts), "seeds": seeds, "frames": args.frames,
              "steps": args.steps, "height": requests[next(iter(requests))].height,
              "width": requests[next(iter(requests))].width, "fps": args.fps, "clip": args.clip,
              "flow": not args.fast, "device": device}
    table = markdown(rows, config)
    (args.out / "quality.md").write_text(table, encoding="utf-8")
    (args.out / "quality.json").write_text(json.dumps({"config": config, "rows": rows, "loops": loops}, indent=2)
                                           + "\n", encoding="utf-8")
    print()
    print(table)
    print(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.json'} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
