"""What the loop costs: latent-shift sampling vs the stock pipeline, and full vs window mode for long cycles.

A mid-size random-weight CogVideoX (built in code, CPU, float32) runs the stock ``pipe(...)`` and
``generate_loop(...)`` with the same steps, seed and size, interleaved, several repeats; the median ratio is what
the shift costs (the goal: <= 1.03 — nothing but a roll). Then, each in a fresh subprocess so peak memory is its own,
``full`` vs ``window`` mode for cycles of 13, 26 and 52 latents: time and peak resident memory of the denoising.
Timings on shared machines are noisy: read the ratios, not the seconds.

    python bench/bench_speed.py [--repeats 5] [--steps 8] [--markdown docs/bench_speed.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(attention_head_dim=32, num_attention_heads=4, num_layers=4)
HEIGHT, WIDTH = 128, 192  # latent grid 16 x 24, 96 tokens a frame after 2x2 patching


def _pipe():
    import torch

    from loopui.models.demo import build_tiny_cogvideox

    torch.set_num_threads(1)  # one thread: less scheduling noise from whatever else runs on the machine
    return build_tiny_cogvideox(**MODEL)


def loop_vs_stock(repeats: int, steps: int) -> dict:
    """Median seconds of the stock pipeline and of the loop (same work), and their ratio."""
    import torch

    from loopui.engine import LoopRequest, generate_loop

    pipe = _pipe()
    request = LoopRequest(prompt="a lighthouse in a storm", height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                          seed=1)
    stock_times, loop_times = [], []
    for _ in range(repeats + 1):  # the first pair warms caches and is dropped
        start = time.perf_counter()
        pipe(prompt=request.prompt, height=HEIGHT, width=WIDTH, num_frames=49, num_inference_steps=steps,
             guidance_scale=request.guidance_scale, generator=torch.Generator().manual_seed(1), output_type="latent")
        stock_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate_loop(pipe, request, output_type="latent")
        loop_times.append(time.perf_counter() - start)
    stock, loop = statistics.median(stock_times[1:]), statistics.median(loop_times[1:])
    return {"stock_s": stock, "loop_s": loop, "ratio": loop / stock, "repeats": repeats, "steps": steps}


def child(num_latents: int, mode: str, steps: int) -> dict:
    """One long-cycle generation in this process: denoise time and peak RSS above the loaded model's."""
    from loopui.engine import LoopRequest, generate_loop

    pipe = _pipe()
    request = LoopRequest(prompt="a lighthouse in a storm", height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                          seed=1, num_frames=4 * (num_latents - 1) + 1, window_mode=mode)
    generate_loop(pipe, LoopRequest(prompt="warm up", height=HEIGHT, width=WIDTH, num_inference_steps=1),
                  output_type="latent")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = generate_loop(pipe, request, output_type="latent")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"latents": num_latents, "mode": mode, "seconds": seconds, "peak_mib": (peak - base) / 1024,
            "model_calls": result.settings["model_calls"], "rope_scale": result.settings["rope_scale"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[13, 26, 52])
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--child", nargs=2, metavar=("LATENTS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.steps)))
        return 0

    import os

    import torch

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = (f"{os.cpu_count()}-core, {mem_gb:.0f} GB {platform.machine()} ({gpu}), Python "
               f"{platform.python_version()}, torch {torch.__version__}")
    speed = loop_vs_stock(args.repeats, args.steps)
    lines = [f"Machine: {machine}; model: random-weight CogVideoX {MODEL}, {WIDTH}x{HEIGHT}, CPU float32, "
             f"1 thread, {args.steps} steps, median of {args.repeats}.", "",
             "| | stock pipeline | latent-shift loop | ratio |", "|---|---|---|---|",
             f"| 13 latents | {speed['stock_s']:.2f} s | {speed['loop_s']:.2f} s | **{speed['ratio']:.3f}** |", "",
             "| latents | mode | denoise time | peak memory above model | model calls | RoPE scale |",
             "|---|---|---|---|---|---|"]
    for length in args.lengths:
        for mode in ("full", "window"):
            out = subprocess.run([sys.executable, __file__, "--child", str(length), mode, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            lines.append(f"| {length} | {mode} | {row['seconds']:.2f} s | {row['peak_mib']:.0f} MiB | "
                         f"{row['model_calls']} | {row['rope_scale']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
