"""Design sweep for seam polish on the exact toy denoiser: which steps, how many offsets, spread, feathering.

Each row is a ``SeamPolish(num_offsets, fraction, spread, feather)`` measured like ``bench_loop.py`` (mean of seeds,
final latents); ``steps`` is how many final steps are polished. This is the evidence behind the presets in
``loopui/engine/polish.py`` (see docs/seam_polish.md).

    python bench/sweep_polish.py                  # 13 latents (full) and 39 latents (window mode)
    python bench/sweep_polish.py --latents 26 --length-scale 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from instrument import LENGTH_SCALE, measure  # noqa: E402  (tests/instrument.py)

from loopui.engine.shift import SeamPolish  # noqa: E402


def grid(num_latents: int) -> list[tuple[int, int, bool, float]]:
    """(polished steps, offsets, spread, feather) combinations worth measuring for one cycle length."""
    rows = []
    offsets = (2, 3, 4, 7, 13) if num_latents <= 13 else (1, 2, 3, 7, 13)
    for feather in (0.0, 1.0, 2.0):
        for steps in (1, 2, 5, 10):
            for m in offsets:
                if m == 1 and feather == 0.0:
                    continue  # one rotation with equal weights is no polish at all
                if feather == 1.0 and steps > 1:
                    continue  # the exponent is compared at the final step only
                rows.append((steps, m, False, feather))
    rows += [(steps, 3, True, 0.0) for steps in (5, 10)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", default="13,39", help="comma-separated cycle lengths (>13: window mode)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--length-scale", type=float, default=LENGTH_SCALE)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox()
    print(f"length scale {args.length_scale:g}, {args.num_steps} steps, mean of seeds {seeds}\n")
    print("| latents | polished steps | offsets | spread | feather | seam | interior | compute |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for length in (int(x) for x in args.latents.split(",")):
        mode = "full" if length <= 13 else "window"
        plain = measure(pipe, num_latents=length, seed=seeds[0], shift_skip=0, window_mode=mode,
                        num_inference_steps=args.num_steps, length_scale=args.length_scale).model_calls
        for steps, m, spread, feather in [(0, 1, False, 0.0)] + grid(length):
            polish = SeamPolish(num_offsets=m, fraction=steps / args.num_steps, spread=spread, feather=feather)
            ms = [measure(pipe, num_latents=length, seed=s, seam_polish="strong", polish=polish, window_mode=mode,
                          num_inference_steps=args.num_steps, length_scale=args.length_scale) for s in seeds]
            print(f"| {length} ({mode}) | {steps} | {m} | {'yes' if spread else 'no'} | {feather:g} | "
                  f"{statistics.mean(x.seam_ratio for x in ms):.3f} | "
                  f"{statistics.mean(x.interior_ratio for x in ms):.3f} | {ms[0].model_calls / plain:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
