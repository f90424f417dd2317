"""Make assets/readme_loop.gif: plain sampling vs the latent-shift loop on the exact toy video model.

The toy model (tests/instrument.py) is the exact denoiser of a smooth Gaussian-process video prior, plugged into a
real tiny CogVideoX pipeline, so what the GIF shows is the sampler itself. Three latent channels are shown as RGB;
each latent step is linearly interpolated into 4 frames (as a VAE would make 4 frames of it), across the wrap too.

    python scripts/make_readme_gif.py [--output assets/readme_loop.gif]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _smooth(latents: np.ndarray) -> np.ndarray:
    """Spatial blur for display only: the prior's pixels are independent, so the raw field is static-like noise.

    A fixed spatial filter commutes with the temporal behaviour, so seams are shown exactly as they are.
    """
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(latents, sigma=(0, 0, 1.2, 1.2), mode="wrap")


def _render(latents: np.ndarray, lo: float, hi: float, scale: int) -> list[np.ndarray]:
    """(T, C, h, w) latents -> cyclic 4x interpolated RGB frames, upscaled by ``scale``."""
    length = latents.shape[0]
    frames = []
    for t in range(length):
        a, b = latents[t], latents[(t + 1) % length]
        for s in range(4):
            x = (1 - s / 4) * a + (s / 4) * b
            rgb = np.clip((x[:3] - lo) / (hi - lo), 0, 1).transpose(1, 2, 0)
            img = Image.fromarray((rgb * 255).astype(np.uint8))
            frames.append(np.asarray(img.resize((img.width * scale, img.height * scale), Image.BICUBIC)))
    return frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "assets" / "readme_loop.gif")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from instrument import installed  # tests/instrument.py

    from loopui.engine import LoopRequest, generate_loop
    from loopui.media import export_video, loop_metrics
    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox()
    panels = {}
    for label, skip in (("plain sampling", 0), ("latent-shift loop", None)):
        request = LoopRequest(prompt="toy", height=128, width=192, num_inference_steps=50, guidance_scale=1.0,
                              seed=args.seed, shift_skip=skip)
        with installed(pipe):
            result = generate_loop(pipe, request, output_type="latent")
        latents = result.latents[0].numpy()
        metrics = loop_metrics(latents)
        latents = _smooth(latents)
        panels[f"{label}  seam {metrics.seam_ratio:.2f}x"] = latents
    values = np.concatenate([v[:, :3].ravel() for v in panels.values()])
    lo, hi = np.percentile(values, 1), np.percentile(values, 99)
    rendered = {k: _render(v, lo, hi, scale=7) for k, v in panels.items()}
    frames = []
    for i in range(len(next(iter(rendered.values())))):
        tiles = []
        for label, seq in rendered.items():
            tile = Image.new("RGB", (seq[i].shape[1], seq[i].shape[0] + 18), "white")
            tile.paste(Image.fromarray(seq[i]), (0, 18))
            ImageDraw.Draw(tile).text((4, 3), label, fill="black")
            tiles.append(np.asarray(tile))
        gap = np.full((tiles[0].shape[0], 8, 3), 255, np.uint8)
        frames.append(np.concatenate([tiles[0], gap, tiles[1]], axis=1))
    path = export_video(np.stack(frames), args.output, fps=16)
    print(f"wrote {path} ({len(frames)} frames); " + "; ".join(panels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
