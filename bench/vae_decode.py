"""VAE decode measurements on the faithful VAEs (real configs, shrunk in width/depth, RANDOM weights).

1. Pixel error of decoding the same latents in bfloat16 against float32 (autocast over float32 weights, as
   loopui decodes a float32 VAE on an accelerator; and a VAE cast to bfloat16, as the model manager loads it on
   CUDA), untiled and tiled, and tiled against untiled.
2. Frame invariance against the number of context latents ``c``: the old order (the cycle's last ``c`` latents
   prepended) and the new one (the cycle, then its first ``c`` latents again), against a decode with the whole cycle
   as context; and the wrap check (decoding a rotated cycle, rotated back).
3. Decode seconds on the CPU, old -> new, and latents pushed through the decoder.

    python bench/vae_decode.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from loopui.engine.decode import decode_cycle, decode_with_still
from loopui.engine.families import family_for
from loopui.testing.faithful import build_faithful_pipeline

MODELS = {
    "CogVideoX-2b VAE": "THUDM/CogVideoX-2b",
    "CogVideoX-5b VAE": "THUDM/CogVideoX-5b",
    "Wan 2.1 VAE": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan 2.2 TI2V VAE": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
}


def levels(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] video as 0..255 levels (unrounded), as the pipeline's post-processing maps it."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).cpu()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (levels(a) - levels(b)).abs()
    mse = float((diff ** 2).mean())
    return {"max": round(float(diff.max()), 3), "mean": round(float(diff.mean()), 4),
            "psnr": round(10 * math.log10(255 ** 2 / mse), 1) if mse > 0 else float("inf")}


def old_decode(pipe, latents, family, context):
    """The decode before this change: the cycle's last ``context`` latents prepended, their frames dropped."""
    t, n, r = family.time_dim, latents.shape[family.time_dim], pipe.vae_scale_factor_temporal
    padded = torch.cat([latents.narrow(t, n - context, context), latents], dim=t)
    video = family.decode(pipe, padded)
    return video[:, :, video.shape[2] - r * n:]


def cycle_latents(pipe, family, num_latents, h, w, seed=0):
    z = family.latent_channels(pipe)
    g = torch.Generator().manual_seed(seed)
    shape = (1, num_latents, z, h, w) if family.time_dim == 1 else (1, z, num_latents, h, w)
    return torch.randn(shape, generator=g)


def tile(vae, small: bool):
    if not small:
        vae.disable_tiling()
        return
    if "Wan" in type(vae).__name__:
        size = 4 * vae.spatial_compression_ratio  # 4 latents a tile, 3 a stride
        vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                          tile_sample_stride_height=size * 3 // 4, tile_sample_stride_width=size * 3 // 4)
    else:
        # overlap 1/4: its latent stride (3) times 8 is the kept tile (24 px), so the tiles add up to the frame
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
                          tile_overlap_factor_width=0.25)


class DecoderCount:
    """Counts decoder calls and the latents they are fed."""

    def __init__(self, vae):
        self.calls = self.latents = 0
        self.handle = vae.decoder.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        self.latents += int(args[0].shape[2])

    def close(self):
        self.handle.remove()


def measure(name: str, model_id: str, quick: bool) -> dict:
    pipe = build_faithful_pipeline(model_id)
    family = family_for(pipe)
    vae = pipe.vae
    # Shorter cycles and smaller frames than the models' own (13 / 21 latents, 480p): a shared 2-core CPU.
    n = 7 if family.name == "cogvideox" else 8  # CogVideoX: odd like its 13
    spatial = pipe.vae_scale_factor_spatial
    hw = (4, 6) if spatial == 16 else (6, 8)
    lat = cycle_latents(pipe, family, n, *hw)
    out = {"model_id": model_id, "latents": list(lat.shape),
           "pixels": [hw[0] * spatial, hw[1] * spatial]}
    bf16_vae = copy.deepcopy(vae).to(torch.bfloat16)

    with torch.no_grad():
        # 1. dtype
        ref = {}
        for tiled in (False, True):
            tile(vae, tiled)
            tile(bf16_vae, tiled)
            key = "tiled" if tiled else "untiled"
            fp32 = decode_cycle(pipe, lat, family=family, dtype=torch.float32)
            ref[key] = fp32
            auto = decode_cycle(pipe, lat, family=family, dtype=torch.bfloat16)
            pipe.vae = bf16_vae
            try:
                pure = decode_cycle(pipe, lat, family=family)
            finally:
                pipe.vae = vae
            out[f"bf16_autocast_vs_fp32_{key}"] = compare(auto, fp32)
            out[f"bf16_vae_vs_fp32_{key}"] = compare(pure, fp32)
        out["tiled_vs_untiled_fp32"] = compare(ref["tiled"], ref["untiled"])
        out["fp32_output_std_levels"] = round(float(levels(ref["untiled"]).std()), 2)
        tile(vae, False)

        # 2. context
        full = old_decode(pipe, lat, family, n)  # every latent with the whole cycle before it
        rolled = torch.roll(lat, shifts=n // 2, dims=family.time_dim)
        shift = pipe.vae_scale_factor_temporal * (n // 2)
        contexts = {}
        for c in (1, 2, 3):
            old = old_decode(pipe, lat, family, c)
            new = decode_cycle(pipe, lat, family=family, context=c, dtype=torch.float32)
            new_rot = torch.roll(decode_cycle(pipe, rolled, family=family, context=c, dtype=torch.float32),
                                 shifts=-shift, dims=2)
            old_rot = torch.roll(old_decode(pipe, rolled, family, c), shifts=-shift, dims=2)
            contexts[c] = {"old_vs_full": compare(old, full), "new_vs_full": compare(new, full),
                           "old_rotation": compare(old_rot, old), "new_rotation": compare(new_rot, new)}
            if c == 2:
                contexts[c]["new_vs_old_c2"] = compare(new, old)
        out["context"] = contexts

        # 3. time and decoder load (an anchored loop: the still too), float32 on the CPU
        big = cycle_latents(pipe, family, n, *hw, seed=1)
        reference = big.narrow(family.time_dim, 0, 1).clone()

        def old_way():
            old_decode(pipe, big, family, 2)
            family.decode(pipe, reference)

        def new_way():
            decode_with_still(pipe, big, reference, True, family)

        for label, fn in (("old", old_way), ("new", new_way)):
            counter = DecoderCount(vae)
            fn()
            counter.close()
            best = float("inf")
            for _ in range(1 if quick else 2):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            out[f"anchored_{label}"] = {"seconds": round(best, 3), "decoder_calls": counter.calls,
                                        "latents_decoded": counter.latents}
        out["decode_context"] = family.decode_context
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, model_id in MODELS.items():
        if args.only and args.only not in name:
            continue
        results[name] = measure(name, model_id, args.quick)
        print(name, json.dumps(results[name], indent=1), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
