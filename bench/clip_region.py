"""``loop_region`` on the exact toy instrument: what is held, the seams at the joins, the noise of pulled latents.

The "user's clip" is a plain (non-looping) sample of the instrument's own prior, so a held latent should join its
regenerated neighbour like any two neighbouring latents of a sample do. Per (latents, loop_region, init_strength),
mean over seeds of the final latents:

- ``held``: latents equal to the clip (max |difference| < 1e-5), measured, not taken from the weights;
- ``seam`` / ``interior``: the loop's seam ratio and largest interior step over the mean step (1 = no seam);
- ``join``: the largest step between a held latent and its regenerated neighbour, over the mean step;
- ``distance``: mean |loop - clip| over the clip's mean magnitude (about 1.4 for an unrelated sample);
- ``std``: the smallest and largest per-latent std of the latents right after the first pulled step (noise level
  ``s`` given): at high noise every latent, free, held or partly pulled (the taper), should have about 1.

    python bench/clip_region.py                      # 13 and 21 latents, loop_region 0.3 / 0.5, seeds 0-2
    python bench/clip_region.py --latents 13 --regions 0.5 --inits 1.0 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instrument import HEIGHT, WIDTH, installed  # noqa: E402  (tests/instrument.py)

from loopui.engine import LoopRequest, generate_loop  # noqa: E402
from loopui.engine.conditioning import ImageConditioning  # noqa: E402
from loopui.engine.families import family_for  # noqa: E402
from loopui.media import loop_metrics  # noqa: E402


def plain_sample(pipe, latents: int, seed: int, steps: int) -> torch.Tensor:
    with installed(pipe):
        return generate_loop(pipe, LoopRequest(prompt="gp", num_frames=4 * (latents - 1) + 1, height=HEIGHT,
                                               width=WIDTH, guidance_scale=1.0, seed=seed, shift_skip=0,
                                               seam_polish="off", num_inference_steps=steps),
                             output_type="latent").latents


def clip_loop(pipe, clip: torch.Tensor, seed: int, loop_region: float, init_strength: float, steps: int) -> dict:
    """The instrument's loop of ``clip`` (latents in, latents out: the VAE is bypassed) and its figures."""
    family = family_for(pipe)
    latents = clip.shape[1]
    first_pull: dict = {}
    after_step = ImageConditioning.after_step

    def spy(self, step, x, level, *args, **kwargs):
        out = after_step(self, step, x, level, *args, **kwargs)
        if step >= self.init_steps and not first_pull:
            first_pull.update(std=out[0].float().flatten(1).std(dim=1), s=level.s)
        return out

    family.encode_video = lambda _pipe, frames, *a, **k: clip.clone() if len(frames) > 1 else clip[:, :1].clone()
    ImageConditioning.after_step = spy
    try:
        with installed(pipe):
            result = generate_loop(pipe, LoopRequest(
                prompt="gp", video=np.zeros((4 * (latents - 1) + 1, HEIGHT, WIDTH, 3), np.uint8), fps=8,
                num_frames=4 * (latents - 1) + 1, height=HEIGHT, width=WIDTH, guidance_scale=1.0, seed=seed + 100,
                init_strength=init_strength, loop_region=loop_region, num_inference_steps=steps),
                output_type="latent")
    finally:
        del family.encode_video
        ImageConditioning.after_step = after_step
    out = result.latents[0]
    metrics = loop_metrics(out)
    held = ((out - clip[0]).flatten(1).abs().max(dim=1).values < 1e-5).tolist()
    steps_ = (out[1:] - out[:-1]).flatten(1).abs().mean(dim=1)
    joins = [k for k in range(latents - 1) if held[k] != held[k + 1]]
    join = max((float(steps_[k]) / metrics.mean_step for k in joins), default=float("nan"))
    std = first_pull.get("std")
    spread = None if std is None else (float(std.min()), float(std.max()))
    return {"held": sum(held), "seam": metrics.seam_ratio, "interior": metrics.interior_ratio, "join": join,
            "distance": float((out - clip[0]).abs().mean() / clip.abs().mean()), "std": spread,
            "s": first_pull.get("s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[13, 21])
    parser.add_argument("--regions", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--inits", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox()
    print("| latents | loop_region | init_strength | held | seam | interior | join | distance | "
          "per-latent std at the first pull: min / max (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for latents in args.latents:
        clips = {seed: plain_sample(pipe, latents, seed, args.steps) for seed in args.seeds}
        for region in args.regions:
            for init in args.inits:
                runs = [clip_loop(pipe, clips[s], s, region, init, args.steps) for s in args.seeds]
                mean = {k: statistics.mean(r[k] for r in runs) for k in ("held", "seam", "interior", "join",
                                                                            "distance")}
                stds = [r["std"] for r in runs if r["std"] is not None]
                low = min(s[0] for s in stds) if stds else float("nan")
                high = max(s[1] for s in stds) if stds else float("nan")
                print(f"| {latents} | {region} | {init} | {mean['held']:.1f} | {mean['seam']:.3f} | "
                      f"{mean['interior']:.3f} | {mean['join']:.3f} | {mean['distance']:.2f} | "
                      f"{low:.2f} / {high:.2f} ({runs[0]['s']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
