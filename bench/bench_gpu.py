"""GPU benchmark: every registry model's true-size architecture with random weights (speed does not depend on weight
values), at its native size: seconds per step and per loop, loop vs stock pipeline, frame-invariant vs stock decode,
offload policies, full vs window mode for long cycles, and peak VRAM.

The transformer(s) and VAE are built at full size from the real configs in ``loopui/testing/configs`` (on the meta
device, then materialised on the GPU: a 14B transformer builds in seconds); the text encoder is the faithful shrunk
one (real ``d_model``, so the transformer sees real embedding widths) and the full-size text encoder is measured on
its own. Timings are per denoising step (CUDA-synchronised in the step callback), the first step dropped as warm-up;
"per loop" extrapolates to 50 steps plus the decode. Sections run in priority order inside ``--budget-s`` and every
result is written as soon as it exists, so a cut-off run still reports what it measured.

The "kernels" and "low_vram" sections (bench/bench_stacks.py) time attention kernels, compile, FP8 and group offload
through the request knobs, each figure next to its FLOP bound (loopui/testing/flops.py).

    python bench/bench_gpu.py --out DIR [--budget-s 420] [--sections ...]
    python bench/bench_gpu.py --smoke --out DIR     # the same code on CPU with shrunk models (tests run this)
    python bench/bench_gpu.py --table docs/gpu_bench_h200.json [--out DIR]   # the README table of a bench JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_stacks  # noqa: E402  (bench/ is the script's own folder, on sys.path when run as a script)

T0 = time.monotonic()
STEPS_FOR_LOOP = 50
# (model id, height, width, num_frames, steps, decode?) in priority order. Wan 14B runs at 480p: its 720p step
# (~75k tokens) costs over a minute with CFG, beyond one lease; its per-step cost scales with tokens from here.
MODELS = [
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 81, 3, True),
    ("THUDM/CogVideoX-5b", 480, 720, 49, 3, True),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 704, 1280, 121, 3, False),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81, 2, False),
    ("THUDM/CogVideoX-2b", 480, 720, 49, 3, False),
    ("THUDM/CogVideoX-5b-I2V", 480, 720, 49, 3, False),
    ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 480, 832, 81, 2, False),
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 480, 832, 81, 2, False),
    ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", 480, 832, 81, 2, False),
]
WAN_SMALL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
PROMPT = "ocean waves rolling onto a beach at sunset"


class Bench:
    def __init__(self, out: Path, budget_s: float, smoke: bool) -> None:
        import torch

        self.torch = torch
        self.out = out
        self.budget_s = budget_s
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.results: dict[str, Any] = {"machine": machine(), "sections": {}, "smoke": smoke}
        out.mkdir(parents=True, exist_ok=True)

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.budget_s - (time.monotonic() - T0)

    def save(self) -> None:
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=2, default=str))

    def save_partial(self) -> None:
        """Write what a running section measured so far (a cut-off lease keeps it)."""
        self.save()

    def section(self, name: str, needs_s: float, fn: Callable[[], Any]) -> None:
        if self.left() < needs_s:
            self.results["sections"][name] = {"skipped": f"time budget ({self.left():.0f} s left, needs ~{needs_s:.0f})"}
            self.save()
            return
        start = time.monotonic()
        try:
            value = fn()
            self.results["sections"][name] = {"seconds": round(time.monotonic() - start, 1), **(value or {})}
        except Exception as exc:  # a benchmark section failing must not lose the others' numbers
            self.results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                                              "trace": traceback.format_exc()[-1500:]}
        finally:
            self.free()
        print(f"[{time.monotonic() - T0:6.1f}s] {name}: {json.dumps(self.results['sections'][name])[:400]}",
              flush=True)
        self.save()

    def free(self) -> None:
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.torch.cuda.is_available() and not self.smoke:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if not self.smoke:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        if self.smoke:
            return None
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2)

    # -- building ------------------------------------------------------------------------------------------------
    def build(self, model_id: str, device: Optional[str] = None) -> Any:
        """The stock pipeline of ``model_id``: true-size transformer(s) and VAE, faithful small text encoder."""
        torch = self.torch
        from loopui.testing.faithful import (build_faithful_pipeline, build_true_size, component_class_name,
                                            load_config, shrunk_overrides)
        from loopui.models.registry import REGISTRY

        device = device or self.device
        stored = load_config(model_id)
        spec = REGISTRY[model_id]
        names = [n for n in ("transformer", "transformer_2", "vae") if n in stored]
        if stored.get("image_encoder") and not self.smoke:
            names.append("image_encoder")
        dtype = torch.float32 if self.smoke else getattr(torch, spec.cuda_dtype)
        overrides = None
        if self.smoke:  # the faithful shrink: same code path, CPU-sized
            overrides = {n: shrunk_overrides(component_class_name(stored[n]), stored[n]) for n in names}
        parts = build_true_size(model_id, components=names, device=device, dtype=dtype, config_overrides=overrides)
        if spec.family == "wan" and "vae" in parts:
            parts["vae"] = parts["vae"].float()  # diffusers' Wan examples run the VAE in float32
        if "image_encoder" in parts:
            parts["image_encoder"] = parts["image_encoder"].float()
        small = build_faithful_pipeline(model_id)
        components = {**small.components, **parts}
        components["text_encoder"] = components["text_encoder"].to(device=device, dtype=dtype)
        if components.get("image_encoder") is not None:
            components["image_encoder"] = components["image_encoder"].to(device)
        pipe = type(small)(**components)
        pipe.register_to_config(_name_or_path=model_id)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image_for(self, model_id: str, height: int, width: int) -> Any:
        """A grey reference image for an image-to-video pipeline, None for text-to-video."""
        from loopui.models.registry import REGISTRY

        if not REGISTRY[model_id].image_to_video:
            return None
        import numpy as np
        from PIL import Image

        return Image.fromarray(np.full((height, width, 3), 128, np.uint8))

    def size(self, model_id: str, height: int, width: int, frames: int) -> tuple[int, int, int]:
        from loopui.models.registry import REGISTRY

        if self.smoke and not REGISTRY[model_id].fixed_size:
            return 32, 32, min(frames, 13)
        return height, width, frames

    # -- one timed run -------------------------------------------------------------------------------------------
    def run_stock(self, pipe: Any, height: int, width: int, frames: int, steps: int, image: Any = None) -> dict:
        torch = self.torch
        stamps: list[float] = []

        def on_step(pipeline, i, t, kwargs):
            self.sync()
            stamps.append(time.perf_counter())
            return {}

        kwargs = dict(prompt=PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=on_step)
        if image is not None:
            kwargs["image"] = image
        self.reset_peak()
        self.sync()
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**kwargs)
        return self._timing(start, stamps)

    def run_loop(self, pipe: Any, height: int, width: int, frames: int, steps: int, image: Any = None,
                 **request: Any) -> dict:
        from loopui.engine import LoopRequest, generate_loop

        stamps: list[float] = []
        self.last_stages = stages = []

        def progress(stage: str, step: int, total: int) -> None:
            stages.append(stage)
            if stage == "denoise":
                self.sync()
                stamps.append(time.perf_counter())

        self.reset_peak()
        self.sync()
        start = time.perf_counter()
        result = generate_loop(pipe, LoopRequest(prompt=PROMPT, height=height, width=width, num_frames=frames,
                                                 num_inference_steps=steps, seed=0, image=image,
                                                 anchor_strength=0.0, **request),
                               output_type="latent", callback=progress)
        timing = self._timing(start, stamps)
        timing.update(model_calls_per_step=result.settings["model_calls"] / steps,
                      rope_scale=result.settings["rope_scale"], shift_skip=result.settings["shift_skip"])
        self.last_latents = result.latents
        self.last_result = result
        return timing

    def has_latents(self) -> bool:
        return getattr(self, "last_latents", None) is not None

    def time_decode(self, pipe: Any, frame_invariant: bool = True) -> dict:
        """Seconds and peak VRAM of decoding the last run's latents as a loop is decoded."""
        from loopui.engine.decode import decode_cycle
        from loopui.engine.families import family_for

        latents = self.last_latents.to(self.device)
        self.reset_peak()
        self.sync()
        start = time.perf_counter()
        with self.torch.no_grad():
            video = decode_cycle(pipe, latents, frame_invariant=frame_invariant, family=family_for(pipe))
        self.sync()
        return {"s": round(time.perf_counter() - start, 2), "frames": int(video.shape[2]), "peak_gib": self.peak_gib()}

    def _timing(self, start: float, stamps: list[float]) -> dict:
        steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
        timed = steps[1:] or steps  # the first step carries prompt encoding and kernel warm-up
        return {"step_s": round(statistics.median(timed), 3), "first_step_s": round(steps[0], 3),
                "peak_gib": self.peak_gib()}

    # -- sections ------------------------------------------------------------------------------------------------
    def model_section(self, model_id: str, height: int, width: int, frames: int, steps: int, decode: bool) -> dict:
        height, width, frames = self.size(model_id, height, width, frames)
        build_start = time.perf_counter()
        pipe = self.build(model_id)
        out: dict[str, Any] = {"size": f"{width}x{height}x{frames}", "build_s": round(time.perf_counter()
                                                                                        - build_start, 1)}
        image = self.image_for(model_id, height, width)
        stock = self.run_stock(pipe, height, width, frames, steps, image)
        loop = self.run_loop(pipe, height, width, frames, steps, image)
        out.update(stock=stock, loop=loop)
        if model_id == WAN_SMALL:  # once more, to see how much the order of the runs matters
            out["stock_again"] = self.run_stock(pipe, height, width, frames, steps, image)
        stock_step = min(stock["step_s"], out.get("stock_again", stock)["step_s"])
        out["loop_vs_stock"] = round(loop["step_s"] / stock_step, 3)
        if decode:
            for name, invariant in (("decode_stock", False), ("decode_invariant", True)):
                out[name] = self.time_decode(pipe, frame_invariant=invariant)
        decode_s = out.get("decode_invariant", {}).get("s", 0.0)
        out["loop_s_at_50_steps"] = round(loop["step_s"] * STEPS_FOR_LOOP + decode_s, 1)
        del pipe
        return out

    def windows_section(self, model_id: str, height: int, width: int) -> dict:
        height, width, _ = self.size(model_id, height, width, 81)
        pipe = self.build(model_id)
        out = {}
        from loopui.models.registry import REGISTRY

        trained = REGISTRY[model_id].trained_latent_frames
        for latents in ((trained, 2 * trained, 3 * trained) if not self.smoke else (trained + 3,)):
            frames = (latents - 1) * 4 + 1
            for mode in ("full", "window"):
                try:
                    timing = self.run_loop(pipe, height, width, frames, 2, window_mode=mode)
                except self.torch.cuda.OutOfMemoryError as exc:
                    timing = {"error": f"out of memory: {str(exc)[:120]}"}
                    self.free()
                out[f"{latents}_{mode}"] = timing
        del pipe
        return out

    def offload_section(self, model_id: str, height: int, width: int, frames: int) -> dict:
        height, width, frames = self.size(model_id, height, width, frames)
        out = {}
        for policy in ("model", "sequential"):
            pipe = self.build(model_id, device="cpu")
            if not self.smoke:
                if policy == "model":
                    pipe.enable_model_cpu_offload(device="cuda")
                else:
                    pipe.enable_sequential_cpu_offload(device="cuda")
            out[policy] = self.run_loop(pipe, height, width, frames, 2)
            pipe.remove_all_hooks()
            del pipe
            self.free()
        return out

    def text_encoder_section(self) -> dict:
        torch = self.torch
        from loopui.testing.faithful import build_true_size, component_class_name, load_config, shrunk_overrides

        out = {}
        for model_id in ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "THUDM/CogVideoX-5b"):
            config = load_config(model_id)["text_encoder"]
            overrides = {"text_encoder": shrunk_overrides(component_class_name(config), config)} if self.smoke \
                else None
            encoder = build_true_size(model_id, components=("text_encoder",), device=self.device,
                                      dtype=torch.float32 if self.smoke else torch.bfloat16,
                                      config_overrides=overrides)["text_encoder"]
            self.reset_peak()  # after the build: its float32 materialisation is not what an encode needs
            params = sum(p.numel() for p in encoder.parameters())
            length = int(load_config(model_id)["tokenizer"].get("model_max_length", 226))
            length = min(length, 512)
            ids = torch.randint(0, 100, (2, length), device=self.device)
            self.sync()
            start = time.perf_counter()
            with torch.no_grad():
                encoder(input_ids=ids)
            self.sync()
            weights = sum(p.numel() * p.element_size() for p in encoder.parameters()) / 2**30
            out[model_id] = {"params_b": round(params / 1e9, 2), "weights_gib": round(weights, 2),
                             "encode_s": round(time.perf_counter() - start, 3), "peak_gib": self.peak_gib()}
            del encoder
            self.free()
        return out


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def markdown(results: dict) -> str:
    """The README table from a results JSON."""
    lines = ["| model | size (WxHxF) | step, stock | step, loop | loop / stock | model calls / step | "
             "peak VRAM (denoise) | decode, frame-invariant | one 50-step loop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, value in results["sections"].items():
        if not name.startswith("model:") or "loop" not in value:
            continue
        decode = value.get("decode_invariant")
        lines.append(
            f"| {name[6:]} | {value['size']} | {value['stock']['step_s']:.2f} s | {value['loop']['step_s']:.2f} s | "
            f"{value['loop_vs_stock']:.3f} | {value['loop']['model_calls_per_step']:g} | "
            f"{value['loop']['peak_gib']} GiB | "
            f"{'%.1f s' % decode['s'] if decode else 'n/m'} | "
            f"{value['loop_s_at_50_steps']:.0f} s{'' if decode else ' + decode'} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--smoke", action="store_true", help="CPU, shrunk models: checks the code paths")
    parser.add_argument("--models", nargs="*", default=None, help="model ids (default: all in priority order)")
    parser.add_argument("--sections", nargs="*", default=None,
                        help="only these sections: model ids, 'kernels', 'low_vram' (or 'kernels:<model id>'), "
                             "'windows', 'offload', 'text_encoders'")
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="print the README table (stacks vs FLOP bound) of a bench JSON; also written to "
                             "OUT/gpu_bench_stacks.md")
    args = parser.parse_args(argv)
    if args.table is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        print(bench_stacks.write_table(args.table, args.out / "gpu_bench_stacks.md"), end="")
        return 0
    bench = Bench(args.out, args.budget_s, args.smoke)
    if not args.smoke and not bench.torch.cuda.is_available():
        print("bench_gpu: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 2
    wanted = {m[0]: m for m in MODELS if args.models is None or m[0] in args.models}

    def chosen(name: str) -> bool:
        return args.sections is None or name in args.sections

    def model(model_id: str, needs_s: float) -> None:
        if model_id in wanted and chosen(model_id):
            _, h, w, f, steps, decode = wanted[model_id]
            bench.section(f"model:{model_id}", needs_s, lambda: bench.model_section(model_id, h, w, f, steps, decode))

    def kernels(model_id: str, needs_s: float) -> None:
        if model_id in wanted and (chosen("kernels") or chosen(f"kernels:{model_id}")):
            _, h, w, f, steps, _ = wanted[model_id]
            bench.section(f"kernels:{model_id}", needs_s,
                          lambda: bench_stacks.kernels_section(bench, model_id, h, w, f, steps))

    def low_vram(model_id: str, needs_s: float) -> None:
        if model_id in wanted and (chosen("low_vram") or chosen(f"low_vram:{model_id}")):
            _, h, w, f, steps, _ = wanted[model_id]
            bench.section(f"low_vram:{model_id}", needs_s,
                          lambda: bench_stacks.low_vram_section(bench, model_id, h, w, f, steps))

    # Priority order: the speed stacks of what most users run (issue #16), the 14B on a 24 GB budget, then the
    # native figures of every model, then the stacks of the rest.
    kernels(WAN_SMALL, 60)
    kernels("THUDM/CogVideoX-5b", 90)
    low_vram(WAN_14B, 90)
    kernels("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 120)
    kernels(WAN_14B, 200)
    model(WAN_SMALL, 20)
    model("THUDM/CogVideoX-5b", 45)
    if WAN_SMALL in wanted and chosen("windows"):
        bench.section("windows:" + WAN_SMALL, 80, lambda: bench.windows_section(WAN_SMALL, 480, 832))
    model("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 45)
    model("Wan-AI/Wan2.1-T2V-14B-Diffusers", 80)
    if WAN_SMALL in wanted and chosen("offload"):
        bench.section("offload:" + WAN_SMALL, 45, lambda: bench.offload_section(WAN_SMALL, 480, 832, 81))
    if WAN_SMALL in wanted and chosen("text_encoders"):
        bench.section("text_encoders", 25, bench.text_encoder_section)
    model("THUDM/CogVideoX-2b", 30)
    model("THUDM/CogVideoX-5b-I2V", 40)
    model("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 80)
    model("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 80)
    model("Wan-AI/Wan2.2-I2V-A14B-Diffusers", 80)
    for model_id in ("THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b-I2V", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                     "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"):
        kernels(model_id, 200)
    table = markdown(bench.results)
    (args.out / "gpu_bench.md").write_text(table + "\n")
    (args.out / "gpu_bench_stacks.md").write_text(bench_stacks.stack_table(bench.results) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
