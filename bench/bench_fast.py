"""Fast loops: model calls and wall time per loop at 4 / 8 / 50 steps, with and without the loop cache; and the exact
toy instrument's seam figures for the few-step samplers (issue 15).

Two tables:

- **speed** -- a tiny random-weight WanPipeline on the CPU (speed does not depend on the weights; reduced size): model
  calls and seconds of denoising per loop (the fastest of ``--repeats`` runs, one CPU thread), for UniPC at 50 steps
  with CFG (the stock recipe), the same with ``step_cache="loop"``, UniPC at 8 and 4 steps, and the emulated
  distilled sampler (``scheduler="lcm"`` at lightx2v's 4 noise levels, guidance 1: one call per step).
- **quality** (``--instrument``) -- the exact Gaussian-process prior inside the same pipeline, Wan's 21 latents, at the
  automatic defaults (seam polish ``fast``): seam and interior ratios, model calls per step, and for the cache the
  distance to the uncached run and the lag correlation at the shift skip (ghosting).

    python bench/bench_fast.py                          # speed table (21 latents, 128x128)
    python bench/bench_fast.py --instrument             # + the instrument table (a few minutes on a CPU)
    python bench/bench_fast.py --smoke                  # seconds: tiny sizes, 1 repeat, 1 seed (the test runs this)
    python bench/bench_fast.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# name -> request knobs (steps, guidance, scheduler, sigmas, step cache); sigmas filled in for "distilled".
SPEED_ROWS: dict[str, dict] = {
    "UniPC 50, CFG": dict(num_inference_steps=50, guidance_scale=5.0),
    "UniPC 50, CFG, loop cache": dict(num_inference_steps=50, guidance_scale=5.0, step_cache="loop"),
    "UniPC 8, CFG": dict(num_inference_steps=8, guidance_scale=5.0),
    "UniPC 4, CFG": dict(num_inference_steps=4, guidance_scale=5.0),
    "distilled 4 (lcm, lightx2v sigmas), no CFG": dict(num_inference_steps=4, guidance_scale=1.0, scheduler="lcm"),
}


def _knobs(row: dict) -> dict:
    from loopui.engine.schedules import distilled_sigmas

    knobs = dict(row)
    if knobs.get("scheduler") == "lcm":
        knobs["sigmas"] = distilled_sigmas(knobs["num_inference_steps"])
    return knobs


def speed(pipe, num_latents: int, size: int, repeats: int) -> list[dict]:
    """Model calls and the fastest denoising time of each speed row (rows interleaved, one CPU thread)."""
    from loopui.engine import LoopRequest, generate_loop

    times: dict[str, list[float]] = {name: [] for name in SPEED_ROWS}
    calls: dict[str, int] = {}
    for _ in range(repeats):
        for name, row in SPEED_ROWS.items():
            request = LoopRequest(prompt="speed", num_frames=4 * (num_latents - 1) + 1, height=size, width=size,
                                  seed=0, frame_invariant_decoding=False, **_knobs(row))
            start = time.perf_counter()
            result = generate_loop(pipe, request, output_type="latent")
            times[name].append(time.perf_counter() - start)
            calls[name] = result.model_calls
    base = min(times["UniPC 50, CFG"])
    return [dict(row=name, model_calls=calls[name], seconds=min(t), relative=min(t) / base)
            for name, t in times.items()]


def instrument(pipe, seeds: list[int], steps_list: list[int]) -> list[dict]:
    """The few-step samplers at the defaults, and the loop cache at 50 steps, on the exact toy instrument."""
    from instrument import measure

    from loopui.engine.schedules import distilled_sigmas

    rows = []
    samplers = {"UniPC": dict(scheduler="unipc"), "Euler": dict(scheduler="euler"),
                "distilled (lcm)": dict(scheduler="lcm")}
    for label, knobs in samplers.items():
        for steps in steps_list:
            extra = dict(knobs, sigmas=distilled_sigmas(steps)) if knobs["scheduler"] == "lcm" else knobs
            runs = [measure(pipe, num_latents=21, seed=s, seam_polish="fast", num_inference_steps=steps, **extra)
                    for s in seeds]
            rows.append(dict(sampler=label, steps=steps, seam=statistics.mean(m.seam_ratio for m in runs),
                             interior=statistics.mean(m.interior_ratio for m in runs),
                             calls_per_step=runs[0].model_calls / steps))
    cache_steps = max(steps_list)
    for s in seeds:
        plain = measure(pipe, num_latents=21, seed=s, seam_polish="fast", num_inference_steps=cache_steps)
        cached = measure(pipe, num_latents=21, seed=s, seam_polish="fast", num_inference_steps=cache_steps,
                         step_cache="loop")
        rows.append(dict(sampler="UniPC + loop cache", steps=cache_steps, seed=s, seam=cached.seam_ratio,
                         interior=cached.interior_ratio, calls_per_step=cached.model_calls / cache_steps,
                         skipped=1 - cached.model_calls / plain.model_calls,
                         relative_error=cached.relative_error(plain), lag_correlation=cached.lag_correlation(),
                         uncached_lag_correlation=plain.lag_correlation()))
    return rows


def speed_markdown(rows: list[dict], num_latents: int, size: int, repeats: int) -> str:
    lines = [f"Tiny random-weight WanPipeline on the CPU, {num_latents} latents at {size}x{size}, one thread, "
             f"denoising only (fastest of {repeats}):", "",
             "| loop | model calls | seconds | vs UniPC 50 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['row']} | {r['model_calls']} | {r['seconds']:.2f} | {r['relative']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def instrument_markdown(rows: list[dict], seeds: list[int]) -> str:
    lines = [f"Exact toy instrument in a WanPipeline, 21 latents, seam polish `fast` (default), seeds "
             f"{', '.join(map(str, seeds))}:", "",
             "| sampler | steps | seam | interior | model calls / step | cache: skipped, error vs uncached, lag corr |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cache = "" if "skipped" not in r else (f"{100 * r['skipped']:.0f} %, {100 * r['relative_error']:.1f} %, "
                                               f"{r['lag_correlation']:.3f} (uncached {r['uncached_lag_correlation']:.3f})")
        label = r["sampler"] + (f" (seed {r['seed']})" if "seed" in r else "")
        lines.append(f"| {label} | {r['steps']} | {r['seam']:.3f} | {r['interior']:.3f} | "
                     f"{r['calls_per_step']:.2f} | {cache} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=21)
    parser.add_argument("--size", type=int, default=128, help="height = width of the speed runs (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--instrument", action="store_true", help="also the instrument's seam table")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat and seed: seconds")
    parser.add_argument("--json", type=Path, help="write every row to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.latents, args.size, args.repeats, args.seeds = 6, 32, 1, "0"

    import torch

    from tiny_wan import build_tiny_wan

    torch.set_num_threads(1)
    pipe = build_tiny_wan()
    out: dict = {"speed": speed(pipe, args.latents, args.size, args.repeats)}
    print(speed_markdown(out["speed"], args.latents, args.size, args.repeats))
    if args.instrument:
        seeds = [int(s) for s in args.seeds.split(",")]
        out["instrument"] = instrument(pipe, seeds, [4, 8] if args.smoke else [4, 6, 8, 50])
        print(instrument_markdown(out["instrument"], seeds))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
