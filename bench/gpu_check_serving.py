"""The GPU-only paths of serving, checked on a real CUDA device (no weights needed: tiny models built in code, the
full-size CogVideoX VAE with random weights).

    python bench/gpu_check_serving.py --out DIR

Each check prints one JSON line and the lot is written to DIR/gpu_check_serving.json:
1. eviction: the next model's memory policy is measured after the evicted one gave its VRAM back;
2. a real CUDA out-of-memory error inside the pipeline: clean-up outside the ``except`` block really frees the failed
   run's tensors (inside it they are still held), then one retry with model CPU offload gives the same loop;
3. under model offload a component stranded on the GPU by the failure is back on the CPU after the clean-up;
4. sequential CPU offload runs a loop (on a CPU execution device accelerate's hooks fail, see tests/fake_cuda.py);
5. two overlapping ``generate_loop`` calls on one GPU pipeline equal each run alone;
6. decoding a 720x480, 13-latent cycle with the full-size CogVideoX VAE: peak memory untiled vs tiled, and the
   engine switching tiling on for a pipeline whose caller did not choose.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopui.engine import LoopRequest, generate_loop  # noqa: E402
from loopui.models import ModelManager, memory, save_tiny_cogvideox  # noqa: E402

GIB = 2**30
DEVICE = "cuda:0"
SMALL = dict(prompt="a paper boat on waves", height=32, width=48, num_inference_steps=4, num_frames=17)
results: dict = {}
OUT_DIR = Path(".")


def check(name: str):
    def run(fn):
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - a failed check is reported, the others still run
            results[name] = {"error": traceback.format_exc()[-1500:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps({name: results[name]}), flush=True)
        (OUT_DIR / "gpu_check_serving.json").write_text(json.dumps(results, indent=1))  # partial results survive
        gc.collect()
        torch.cuda.empty_cache()
        return fn

    return run


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    global OUT_DIR
    OUT_DIR = Path(args.out)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    folder = save_tiny_cogvideox(Path(tempfile.mkdtemp()) / "tiny")
    results["machine"] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)}
    print(json.dumps(results["machine"]), flush=True)

    @check("1_eviction_then_measure")
    def _():
        manager = ModelManager(max_models=1)
        seen = {}
        measure = memory.auto_policy

        def spy(spec, device):
            seen.setdefault("allocated_when_measured", []).append(allocated())
            return measure(spec, device)

        memory.auto_policy = spy
        try:
            first = manager.get(str(folder), device=DEVICE)
            held = allocated()
            with manager.use("demo", device=DEVICE) as second:
                generate_loop(second.pipe, LoopRequest(**SMALL), output_type="latent")
        finally:
            memory.auto_policy = measure
        return {"first_policy": first.policy, "allocated_with_first_MiB": held / 2**20,
                "allocated_when_second_measured_MiB": [a / 2**20 for a in seen["allocated_when_measured"]],
                "loaded": [m.spec.model_id for m in manager.loaded()]}

    @check("2_real_oom_cleanup_and_retry")
    def _():
        manager = ModelManager(max_models=1)
        request = LoopRequest(**SMALL)
        with manager.use("demo", device=DEVICE, offload="none") as loaded:
            reference = generate_loop(loaded.pipe, request, output_type="latent").latents
        baseline = allocated()
        ballast_gib = 8
        state = {"calls": 0}

        def explode(module, args, kwargs):
            state["calls"] += 1
            if state["calls"] == 2:
                ballast = torch.empty(ballast_gib * GIB, dtype=torch.uint8, device=DEVICE)  # noqa: F841 - held
                torch.empty(4096 * GIB, dtype=torch.uint8, device=DEVICE)  # a real CUDA OOM

        # Control: a clean-up inside the except block (what the manager used to do).
        inside = {}
        transformer = manager.get("demo", device=DEVICE).pipe.transformer
        handle = transformer.register_forward_pre_hook(explode, with_kwargs=True)
        try:
            generate_loop(manager.get("demo", device=DEVICE).pipe, request, output_type="latent")
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            inside["allocated_GiB"] = (allocated() - baseline) / GIB
        after_except = (allocated() - baseline) / GIB
        # The manager: clean-up outside the except block, then one retry with model CPU offload.
        state["calls"] = 0
        at_cleanup = []
        empty = torch.cuda.empty_cache

        def recording_empty_cache():
            at_cleanup.append(((allocated() - baseline) / GIB, sys.exc_info()[0] is not None))
            empty()

        torch.cuda.empty_cache = recording_empty_cache
        notes = []
        try:
            latents = manager.run("demo", lambda m: generate_loop(m.pipe, request, output_type="latent").latents,
                                  device=DEVICE, progress=lambda s, f, msg: notes.append(msg) if s == "memory" else 0)
        finally:
            torch.cuda.empty_cache = empty
            handle.remove()
        policy = manager.loaded()[0].policy
        return {"ballast_GiB": ballast_gib, "held_during_except_cleanup_GiB": inside["allocated_GiB"],
                "held_after_leaving_except_GiB": after_except,
                "manager_first_cleanup_GiB_and_in_except": at_cleanup[:1], "policy_after_retry": policy,
                "note": notes, "retried_equals_reference_max_diff": float((latents - reference).abs().max())}

    @check("3_model_offload_component_back_on_cpu")
    def _():
        manager = ModelManager(max_models=1)
        loaded = manager.get("demo", device=DEVICE, offload="model")
        transformer = loaded.pipe.transformer
        where: dict = {"transformer_when_it_failed": [], "transformer_after_cleanup": []}

        def fail(module, args, kwargs):
            # Inside the transformer's forward: accelerate's hook has moved the whole transformer to the GPU.
            where["transformer_when_it_failed"].append(str(next(transformer.parameters()).device))
            raise torch.cuda.OutOfMemoryError("injected after the transformer was moved to the GPU")

        recover = memory.recover

        def spy(loaded_model):
            recover(loaded_model)
            where["transformer_after_cleanup"].append(str(next(transformer.parameters()).device))

        memory.recover = spy
        handle = transformer.transformer_blocks[0].register_forward_pre_hook(fail, with_kwargs=True)
        try:
            manager.run("demo", lambda m: generate_loop(m.pipe, LoopRequest(**SMALL), output_type="latent"),
                        device=DEVICE, offload="model")
        except Exception as exc:  # noqa: BLE001 - the second failure is expected (the hook fails every call)
            where["final_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        finally:
            handle.remove()
            memory.recover = recover
        where["policy_after"] = manager.loaded()[0].policy
        return where

    @check("4_sequential_offload_runs")
    def _():
        manager = ModelManager(max_models=1)
        with manager.use("demo", device=DEVICE, offload="sequential") as loaded:
            out = generate_loop(loaded.pipe, LoopRequest(**SMALL))
        return {"frames": list(out.frames.shape), "policy": loaded.policy}

    @check("5_overlapping_calls_one_gpu_pipeline")
    def _():
        from loopui.models.demo import build_tiny_cogvideox

        pipe = build_tiny_cogvideox().to(DEVICE)
        requests = [LoopRequest(**dict(SMALL, num_inference_steps=8), seed=s) for s in (1, 2)]
        alone = [generate_loop(pipe, r, output_type="latent").latents for r in requests]
        together: dict = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(
            i, generate_loop(pipe, requests[i], output_type="latent").latents)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"max_diff": [float((together[i] - alone[i]).abs().max()) for i in (0, 1)]}

    @check("6_full_size_vae_decode_memory")
    def _():
        from diffusers import AutoencoderKLCogVideoX

        from loopui.models.demo import build_tiny_cogvideox

        vae = AutoencoderKLCogVideoX().to(DEVICE, torch.bfloat16).eval()  # CogVideoX's VAE, random weights
        z = torch.randn(1, 16, 15, 60, 90, device=DEVICE, dtype=torch.bfloat16)  # 13 latents + 2 of context
        peaks = {}
        for label, tiled in (("untiled", False), ("tiled", True)):
            vae.enable_tiling() if tiled else vae.disable_tiling()
            torch.cuda.reset_peak_memory_stats()
            base = allocated()
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    frames = vae.decode(z).sample
                torch.cuda.synchronize()
                peaks[label] = {"peak_GiB": round((torch.cuda.max_memory_allocated() - base) / GIB, 2),
                                "seconds": round(time.perf_counter() - start, 2), "frames": frames.shape[2]}
                del frames
            except torch.cuda.OutOfMemoryError as exc:
                peaks[label] = {"oom": str(exc)[:120]}
            gc.collect()
            torch.cuda.empty_cache()
        pipe = build_tiny_cogvideox().to(DEVICE)
        flags = []
        handle = pipe.vae.decoder.register_forward_pre_hook(
            lambda *a: flags.append((pipe.vae.use_tiling, pipe.vae.use_slicing)))
        generate_loop(pipe, LoopRequest(**SMALL))
        handle.remove()
        peaks["engine_switched_tiling_on_for_caller_pipe"] = sorted(set(flags))
        peaks["restored_after"] = [pipe.vae.use_tiling, pipe.vae.use_slicing]
        return peaks


if __name__ == "__main__":
    main()
