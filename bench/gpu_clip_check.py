"""GPU check of the clip path at true size: Wan 2.1 1.3B (random weights, real architecture), a synthetic 81-frame
832x480 clip through resample, VAE encode, a 3-step loop with seam polish and frame-invariant decode; seconds of each
phase and peak VRAM. Prints one JSON line and writes it to --out.

    python bench/gpu_clip_check.py --out DIR [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import Bench  # noqa: E402

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from loopui.engine import LoopRequest, generate_loop
    from loopui.engine.families import family_for
    from loopui.media import resample_clip

    bench = Bench(args.out, 600, args.smoke)
    height, width, frames = (32, 48, 17) if args.smoke else (480, 832, 81)
    pipe = bench.build(MODEL)
    yy, xx = np.mgrid[0:height, 0:width]
    clip = np.stack([np.stack([(xx + 4 * t) % 256, yy % 256, np.full_like(xx, 90)], -1) for t in range(frames + 20)])
    clip = clip.astype(np.uint8)
    out: dict = {"size": f"{width}x{height}x{frames}", "machine": bench.results["machine"]}
    start = time.perf_counter()
    fitted, _ = resample_clip(clip, 16.0, frames, 16.0, width, height)
    out["resample_s"] = round(time.perf_counter() - start, 2)
    bench.reset_peak()
    bench.sync()
    start = time.perf_counter()
    with torch.no_grad():
        latents = family_for(pipe).encode_video(pipe, list(fitted), height, width, bench.device, torch.float32)
    bench.sync()
    out["encode_s"], out["encode_peak_gib"] = round(time.perf_counter() - start, 2), bench.peak_gib()
    out["latents"] = list(latents.shape)
    for name, extra in (("text_loop", {}), ("clip_loop", {"video": clip})):
        bench.reset_peak()
        bench.sync()
        start = time.perf_counter()
        result = generate_loop(pipe, LoopRequest(prompt="waves", height=height, width=width, num_frames=frames,
                                                 num_inference_steps=3, seed=0, **extra))
        bench.sync()
        out[name] = {"total_s": round(time.perf_counter() - start, 2), "peak_gib": bench.peak_gib(),
                     "frames": int(result.frames.shape[0]), "model_calls": result.settings["model_calls"],
                     "timings": {k: round(v, 2) for k, v in result.timings.items()},
                     "init_strength": result.settings["init_strength"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_clip_check.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
