"""What a LoRA costs a loop: model calls and wall time without a LoRA, with one unfused and with it fused.

Wan 2.1 T2V 1.3B's real configuration (``loopui.testing.faithful``) at its real width (12 heads of 128, feed-forward
8960) but only a few blocks, random weights, CPU float32, a reduced size. A LoRA of rank ``--rank`` on every attention
and feed-forward projection (written in code, diffusers/PEFT keys) is applied through ``generate_loop`` exactly as a
request does: ``never`` keeps it as PEFT adapters (two extra thin matmuls per projection per call), ``always``
folds it into the weights (``fuse_lora``) once -- the first request pays the folding and the copy of the original
weights kept for switching back, later requests of the same set run at the plain model's speed. Runs are
interleaved, several repeats, medians of CPU seconds (one thread) reported; the first request of each mode
(loading, folding) is timed apart. Each loop includes the prompt encoding and the latent shift (no decoding).

    python bench/bench_loras.py [--repeats 3] [--steps 4] [--rank 32] [--json docs/bench_loras.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SHRINK = dict(layers=2, heads=12, ffn_dim=8960)  # real width, two of the 30 blocks
HEIGHT, WIDTH, FRAMES = 128, 128, 21  # 6 latents of 16 x 16: 384 tokens after 2x2 patching


def _pipe(seed: int = 0):
    from loopui.testing.faithful import build_faithful_pipeline

    return build_faithful_pipeline(MODEL_ID, seed=seed, **SHRINK)


def run(repeats: int, steps: int, rank: int, threads: int = 1) -> dict:
    """Model calls and median seconds per loop for: no LoRA, LoRA unfused, LoRA fused (and each mode's first
    request, which loads / folds)."""
    import torch

    from loopui.engine import LoopRequest, generate_loop
    from loopui.models.lora import reset_loras, set_fuse_policy
    from loopui.testing.lora_files import write_lora

    torch.set_num_threads(threads)
    pipe = _pipe()
    folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    lora = write_lora(pipe.transformer, folder / "style.safetensors", rank=rank, std=0.05)
    base = dict(prompt="a koi pond, ripples, top view", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=steps, seed=3)
    plain = LoopRequest(**base)
    with_lora = LoopRequest(**base, loras=[f"{lora}:0.8"])

    def timed(request) -> tuple[float, int]:
        # CPU seconds of this (one-thread) process: what other users of a shared machine do barely moves them.
        start = time.process_time()
        result = generate_loop(pipe, request, output_type="latent")
        return time.process_time() - start, result.model_calls

    out: dict = {"model": MODEL_ID, "shrink": SHRINK, "size": f"{WIDTH}x{HEIGHT}x{FRAMES}", "steps": steps,
                 "rank": rank, "repeats": repeats, "threads": threads, "platform": platform.processor() or "cpu"}
    timed(plain)  # warm-up
    first: dict = {}
    for mode in ("never", "always"):
        reset_loras(pipe)
        set_fuse_policy(pipe, mode)
        first[mode] = timed(with_lora)[0]  # loads the file once (never) / folds the set in (always)
        reset_loras(pipe)
    times: dict[str, list[float]] = {"none": [], "never": [], "always": []}
    calls: dict[str, int] = {}
    for _ in range(repeats):
        for mode in ("none", "never", "always"):
            if mode != "none":
                set_fuse_policy(pipe, mode)
            seconds, calls[mode] = timed(plain if mode == "none" else with_lora)
            times[mode].append(seconds)
            if mode == "always":
                reset_loras(pipe)  # unfold (exact weights back): the next round's plain run is the stock model
    # The steady state of fusing: the set stays folded between requests of the same set.
    set_fuse_policy(pipe, "always")
    timed(with_lora)
    steady = [timed(with_lora)[0] for _ in range(repeats)]
    reset_loras(pipe)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    out.update(
        model_calls={"no_lora": calls["none"], "lora_unfused": calls["never"], "lora_fused": calls["always"]},
        seconds={"no_lora": medians["none"], "lora_unfused": medians["never"],
                 "lora_fused_with_fold_and_unfold": medians["always"], "lora_fused_steady": statistics.median(steady),
                 "first_unfused_with_load": first["never"], "first_fused_with_load_and_fold": first["always"]},
    )
    out["ratio_vs_no_lora"] = {k: round(v / medians["none"], 3) for k, v in out["seconds"].items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.steps, args.rank, args.threads)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
