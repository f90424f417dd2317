"""Benchmark seam polish on the exact toy denoiser: seam and interior ratios, compute and wall-time ratios.

The "model" is ``tests/instrument.py``: the exact posterior-mean denoiser of a Gaussian-process video prior that has
only ever seen clips of the trained length (13 latents), plugged into a real tiny diffusers CogVideoX pipeline
(v-prediction DDIM, trailing timesteps). Ratios are measured on the final latents and averaged over seeds.

    python bench/bench_loop.py                       # 13 (full), 26 and 39 (window mode) latents, seeds 0-2
    python bench/bench_loop.py --latents 13 --length-scale 2 --markdown docs/table.md

Rows: ``floor`` (26 and 39 latents) is non-looping sampling of the whole clip at once, the smoothness of an
ordinary generation; ``plain`` is ordinary sampling (shift 0; in window mode the same windows without shift), the baseline of
every ratio; ``off`` is the reference latent shift; ``mean 3x20%`` is the equal-weight average of 3 offsets over the
last 20 % of steps (the first approach of issue 5, for comparison); then the presets. Compute ratio = model calls /
plain's model calls (a window call counts as one call of the trained length). Wall (and CPU) ratio = time of one
generation / plain's, measured in the same run with the tiny *random-weight transformer* (the instrument costs nothing per call,
so its wall time would only show per-step overhead): the fastest of ``--wall-repeats`` runs (other processes'
load only ever adds time), rows interleaved, one CPU thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from instrument import HEIGHT, LENGTH_SCALE, WIDTH, measure  # noqa: E402  (tests/instrument.py)

from loopui.engine.polish import SEAM_POLISH_PRESETS  # noqa: E402
from loopui.engine.shift import SeamPolish  # noqa: E402

# name -> (shift_skip, seam_polish level, custom SeamPolish or None)
ROWS: dict[str, tuple] = {
    "plain": (0, "off", None),
    "off": (None, "off", None),
    "mean 3x20%": (None, "strong", SeamPolish(num_offsets=3, fraction=0.2)),
    **{level: (None, level, None) for level in SEAM_POLISH_PRESETS if level != "off"},
}


def bench(pipe, num_latents: int, seeds: list[int], steps: int, length_scale: float, rows: list[str]) -> list[dict]:
    """Measure every row for one cycle length; returns one dict per row (means over ``seeds``).

    Cycles longer than 13 latents run in window mode, and get a ``floor`` row first: non-looping sampling with the
    whole clip denoised at once (an idealised long-context model), the smoothness an ordinary generation has.
    """
    mode = "full" if num_latents <= 13 else "window"
    out = []
    names = (["floor"] if mode == "window" else []) + rows
    for name in names:
        skip, level, polish = ROWS["plain" if name == "floor" else name]
        ms = [measure(pipe, num_latents=num_latents, seed=s, shift_skip=skip, seam_polish=level,
                      window_mode="full" if name == "floor" else mode, num_inference_steps=steps,
                      length_scale=length_scale, polish=polish) for s in seeds]
        worst = Counter(m.worst_step for m in ms).most_common(1)[0][0]
        out.append(dict(name=name, latents=num_latents, mode=mode, seam=statistics.mean(m.seam_ratio for m in ms),
                        interior=statistics.mean(m.interior_ratio for m in ms), calls=ms[0].model_calls, worst=worst))
    plain = next(r for r in out if r["name"] == "plain")
    for row in out:
        row["compute"] = row["calls"] / plain["calls"] if row["name"] != "floor" else float("nan")
    return out


def wall_times(pipe, num_latents: int, steps: int, rows: list[str], repeats: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of one generation per row with the real (tiny, random) transformer at 128x192: the fastest
    of ``repeats`` runs (others' load only ever adds time), rows interleaved."""
    from loopui.engine import LoopRequest, generate_loop
    from loopui.engine import polish as polish_module

    mode = "full" if num_latents <= 13 else "window"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name in rows:
            skip, level, polish = ROWS[name]
            request = LoopRequest(prompt="wall time", num_frames=4 * (num_latents - 1) + 1, height=128, width=192,
                                  num_inference_steps=steps, guidance_scale=1.0, seed=0, shift_skip=skip,
                                  window_mode=mode, seam_polish=level, frame_invariant_decoding=False)
            previous = polish_module.SEAM_POLISH_PRESETS[level]
            if polish is not None:
                polish_module.SEAM_POLISH_PRESETS[level] = polish
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                generate_loop(pipe, request, output_type="latent")
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            finally:
                polish_module.SEAM_POLISH_PRESETS[level] = previous
    return {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"  # NaN: not measured / not comparable


def markdown(results: list[dict], seeds: list[int], steps: int, length_scale: float, repeats: int) -> str:
    """A README-ready table (wall and CPU columns only when they were measured)."""
    timed = repeats > 0
    lines = [f"Exact toy denoiser (GP prior, length scale {length_scale:g} latents, {4 * (HEIGHT // 8) * (WIDTH // 8)} "
             f"values per latent frame), {steps} DDIM steps, mean of seeds {', '.join(map(str, seeds))}. "
             "Compute: model calls / plain's"
             + (f"; wall and CPU: time of one generation / plain's with the tiny random transformer (fastest of "
                f"{repeats} runs, one CPU thread, 128x192)." if timed else "."),
             "",
             "| latents (mode) | setting | seam | interior | largest jump (frames) | model calls | compute |"
             + (" wall | CPU |" if timed else ""),
             "|---|---|---:|---:|---|---:|---:|" + ("---:|---:|" if timed else "")]
    for r in results:
        calls = "-" if r["name"] == "floor" else str(r["calls"])
        lines.append(f"| {r['latents']} ({r['mode']}) | {r['name']} | {r['seam']:.3f} | {r['interior']:.3f} | "
                     f"{r['worst'][0]}-{r['worst'][1]} | {calls} | {_ratio(r['compute'])} |"
                     + (f" {_ratio(r['wall'])} | {_ratio(r['cpu'])} |" if timed else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", default="13,26,39", help="comma-separated cycle lengths (>13: window mode)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--length-scale", type=float, default=LENGTH_SCALE)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of: {', '.join(ROWS)}")
    parser.add_argument("--wall-repeats", type=int, default=5, help="runs per row for wall time, fastest kept (0: skip)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if rows[0] != "plain":
        rows = ["plain"] + [r for r in rows if r != "plain"]  # every ratio is relative to plain
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from loopui.models.demo import build_tiny_cogvideox

    # One thread: on a shared CPU, multi-threaded timings swing by 10x with other processes' load.
    torch.set_num_threads(1)
    pipe = build_tiny_cogvideox()
    start = time.perf_counter()
    results = []
    for length in (int(x) for x in args.latents.split(",")):
        block = bench(pipe, length, seeds, args.steps, args.length_scale, rows)
        walls = wall_times(pipe, length, args.steps, rows, args.wall_repeats) if args.wall_repeats > 0 else {}
        for r in block:
            timed = walls and r["name"] in walls
            r["wall"] = walls[r["name"]][0] / walls["plain"][0] if timed else float("nan")
            r["cpu"] = walls[r["name"]][1] / walls["plain"][1] if timed else float("nan")
        results += block
        for r in block:
            print(f"L={r['latents']:2d} {r['mode']:6s} {r['name']:11s} seam {r['seam']:.3f}  interior "
                  f"{r['interior']:.3f}  worst {r['worst']}  calls {r['calls']:4d}  compute {_ratio(r['compute'])}  "
                  f"wall {_ratio(r['wall'])}  cpu {_ratio(r['cpu'])}", flush=True)
    table = markdown(results, seeds, args.steps, args.length_scale, args.wall_repeats)
    print()
    print(table)
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
