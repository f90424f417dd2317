"""The GPU bench's "kernels" and "low_vram" sections, and the README table of a bench JSON (bench/bench_gpu.py).

"kernels:<model>": one model at its native size (true-size random weights), run through the library as a user would
(``generate_loop`` with the request knobs ``attention``, ``compile``, ``quantize``): s/step with attention native
and each installed kernel (``loopui.models.accel.resolve_attention``), then the fastest kernel with compile, with
FP8 (``loopui.models.quantize.quantize_pipeline`` on a fresh build; int8 where FP8 does not fit the device), and
both; every figure carries the FLOP bound of its stack (``loopui.testing.flops``) and measured / bound; a 50-step loop
adds the decode. "low_vram:<model>": the 14B with FP8 and group offload (``loopui.models.memory.place(pipe,
"group", device)``), peak VRAM against a 24 GB card. A name the library does not have yet turns into that stack's
``{"error": ...}`` and the section goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

STEPS_FOR_LOOP = 50
LOW_VRAM_GOAL_GIB = 24.0


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def flops_for(bench: Any, model_id: str, height: int, width: int, frames: int):
    """The step's FLOP count of the transformer the bench builds (the shrunk one in smoke mode)."""
    from loopui.testing.faithful import component_class_name, load_config, shrunk_overrides
    from loopui.testing.flops import step_flops

    overrides = None
    if bench.smoke:
        config = load_config(model_id)["transformer"]
        overrides = shrunk_overrides(component_class_name(config), config)
    return step_flops(model_id, height, width, frames, transformer_overrides=overrides)


def installed_kernels(device: str) -> tuple[list[str], dict]:
    """The attention kernels that resolve on ``device``, and why each other one does not."""
    from loopui.models.accel import ATTENTION_KERNELS, resolve_attention

    ok, missing = [], {}
    for name in (n for n in ATTENTION_KERNELS if n != "native"):  # the library's own table of kernels
        try:
            ok.append(resolve_attention(name, device))
        except ValueError as exc:
            missing[name] = str(exc)
    return ok, missing


def _quantize_mode(device: str) -> str:
    from loopui.models.quantize import resolve_quantize

    # FP8 where the GPU has it (cc >= 8.9); the library answers int8 (or refuses) elsewhere, the CPU included
    try:
        return resolve_quantize("fp8", device)
    except ValueError:
        return resolve_quantize("int8", device)


def run_stack(bench: Any, pipe: Any, flops: Any, sizes: tuple, steps: int, image: Any, attention: str,
              compile: bool, quantize: str) -> dict:
    """One timed loop with these knobs; what the engine reports it ran, the bound of that stack, measured / bound."""
    from loopui.testing.flops import stack_bound_s

    before = None
    if compile:
        from loopui.models.accel import compile_count

        before = compile_count()
    height, width, frames = sizes
    timing = bench.run_loop(pipe, height, width, frames, steps, image, attention=attention, compile=compile,
                            quantize=quantize)
    result = bench.last_result
    ran_attention = getattr(result, "attention", None)
    compiled = getattr(result, "compiled", None)
    # A knob the engine does not read yet runs today's path silently: say so instead of timing it as the stack.
    if attention not in ("native", "auto") and ran_attention != attention:
        raise RuntimeError(f"asked attention {attention!r}, the engine reports {ran_attention!r} "
                           "(LoopResult.attention)")
    if compile and compiled is not True:
        raise RuntimeError(f"asked compile, the engine reports compiled={compiled!r} (LoopResult.compiled)")
    bound = stack_bound_s(flops, quantize, ran_attention or attention)
    timing.update(attention=ran_attention, compiled=compiled, quantize=quantize, bound_s=float(f"{bound:.4g}"),
                  vs_bound=round(timing["step_s"] / bound, 2))
    if compile:
        from loopui.models.accel import compile_count

        timing["graphs_compiled"] = compile_count() - before
        timing["compile_stage_reported"] = "compile" in bench.last_stages
    return timing


def kernels_section(bench: Any, model_id: str, height: int, width: int, frames: int, steps: int) -> dict:
    """Every installed attention kernel, then the fastest with compile / FP8 / both, each against its FLOP bound."""
    sizes = bench.size(model_id, height, width, frames)
    flops = flops_for(bench, model_id, *sizes)
    out: dict[str, Any] = {"size": f"{sizes[1]}x{sizes[0]}x{sizes[2]}", "flops": flops.to_dict()}
    stacks: dict[str, dict] = {}
    out["stacks"] = stacks
    image = bench.image_for(model_id, sizes[0], sizes[1])

    def attempt(pipe: Any, label: str, needs_s: float, attention: str, compile: bool = False,
                quantize: str = "none") -> Optional[dict]:
        if bench.left() < needs_s:
            stacks[label] = {"skipped": f"time budget ({bench.left():.0f} s left)"}
            return None
        try:
            stacks[label] = run_stack(bench, pipe, flops, sizes, steps, image, attention, compile, quantize)
        except Exception as exc:  # one stack failing (a missing name, out of memory) must not lose the others
            stacks[label] = _error(exc)
            bench.free()
        bench.save_partial()
        return stacks[label] if "step_s" in stacks[label] else None

    # 1. Today's path, then every kernel that resolves here.
    pipe = bench.build(model_id)
    per_step = 1.0 if bench.smoke else 2.5 * steps * flops.bound_s()
    attempt(pipe, "native", per_step, "native")
    try:
        kernels, out["kernels_unavailable"] = installed_kernels(bench.device)
    except Exception as exc:  # loopui.models.accel not merged yet
        kernels, out["kernels_unavailable"] = [], _error(exc)
    for name in kernels:
        attempt(pipe, name, per_step, name)
    timed = {k: v for k, v in stacks.items() if "step_s" in v}
    best = min(timed, key=lambda k: timed[k]["step_s"]) if timed else "native"
    out["best_kernel"] = best

    # 2. The fastest kernel compiled: the first loop compiles, the second at the same size must not recompile.
    compile_needs = per_step + (20.0 if bench.smoke else 120.0)
    first = attempt(pipe, f"{best}+compile", compile_needs, best, compile=True)
    again = attempt(pipe, f"{best}+compile again", per_step, best, compile=True) if first else None
    if first and again:
        out["compile_s"] = round(first["first_step_s"] - again["first_step_s"], 1)
        out["recompiles_on_second_loop"] = again.get("graphs_compiled")

    # 3. Decode once (the stacks differ in the transformer only): a 50-step loop = steps + decode.
    decode = bench.time_decode(pipe) if bench.has_latents() else None
    out["decode"] = decode
    del pipe
    bench.free()

    # 4. Quantized on a fresh build (quantization is in place and compiled blocks stay compiled).
    try:
        mode = _quantize_mode(bench.device)
        from loopui.models.quantize import pipeline_quantization, quantize_pipeline

        pipe = bench.build(model_id)
        quantize_pipeline(pipe, mode)
        out["quantized"] = pipeline_quantization(pipe)
    except Exception as exc:  # loopui.models.quantize not merged yet, or torchao missing
        stacks["quantize"] = _error(exc)
        pipe = None
    if pipe is not None:
        attempt(pipe, f"{best}+{mode}", per_step, best, quantize=mode)
        if not bench.smoke:  # the CPU smoke compiles once (above); the same call with quantize is GPU time only
            attempt(pipe, f"{best}+{mode}+compile", compile_needs, best, compile=True, quantize=mode)
        del pipe
        bench.free()

    decode_s = decode["s"] if decode else 0.0
    for value in stacks.values():
        if "step_s" in value:
            value["loop_s_at_50_steps"] = round(value["step_s"] * STEPS_FOR_LOOP + decode_s, 1)
            value["loop_bound_s"] = float(f"{value['bound_s'] * STEPS_FOR_LOOP:.4g}")
    return out


def low_vram_section(bench: Any, model_id: str, height: int, width: int, frames: int, steps: int) -> dict:
    """FP8 (int8 where FP8 does not fit) + group offload: the peak VRAM of a loop, against a 24 GB card."""
    from loopui.models.memory import place
    from loopui.models.quantize import pipeline_quantization, quantize_pipeline

    sizes = bench.size(model_id, height, width, frames)
    flops = flops_for(bench, model_id, *sizes)
    mode = _quantize_mode(bench.device)
    # built and quantized on the device (seconds), then handed to the offload policy from the CPU as a loaded model is
    pipe = bench.build(model_id)
    quantize_pipeline(pipe, mode)
    pipe.to("cpu")
    bench.free()
    place(pipe, "group", bench.device)
    out: dict[str, Any] = {"size": f"{sizes[1]}x{sizes[0]}x{sizes[2]}", "quantized": pipeline_quantization(pipe),
                           "policy": "group"}
    out["run"] = run_stack(bench, pipe, flops, sizes, steps, bench.image_for(model_id, *sizes[:2]), "auto", False,
                           mode)
    peak = out["run"]["peak_gib"]
    out["fits_24gb"] = None if peak is None else peak <= LOW_VRAM_GOAL_GIB
    from loopui.models.memory import remove_offload

    remove_offload(pipe)  # diffusers' group offload hooks too (accelerate's remove_all_hooks leaves them)
    del pipe
    return out


# -- the README table ------------------------------------------------------------------------------------------------
def _size_of(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(v) for v in text.split("x"))
    return height, width, frames


def stack_rows(results: dict) -> list[dict]:
    """One row per (model, stack) of a bench JSON: the "kernels"/"low_vram" sections, and the native loop of older
    "model:" sections (their bound computed here from the size they ran at)."""
    from loopui.testing.flops import stack_bound_s, step_flops

    rows = []
    smoke = results.get("smoke", False)
    for name, value in results.get("sections", {}).items():
        kind, _, model_id = name.partition(":")
        if kind == "kernels" and "stacks" in value:
            for stack, run in value["stacks"].items():
                if "step_s" in run:
                    rows.append(dict(model=model_id, size=value["size"], stack=stack, **run))
        elif kind == "low_vram" and "run" in value:
            rows.append(dict(model=model_id, size=value["size"], stack=f"{value['quantized']} + group offload",
                             **value["run"]))
        elif kind == "model" and "loop" in value and not smoke:
            bound = stack_bound_s(step_flops(model_id, *_size_of(value["size"])))
            loop = value["loop"]
            rows.append(dict(model=model_id, size=value["size"], stack="native (before #16)", step_s=loop["step_s"],
                             bound_s=float(f"{bound:.4g}"), vs_bound=round(loop["step_s"] / bound, 2),
                             loop_s_at_50_steps=value.get("loop_s_at_50_steps"), peak_gib=loop["peak_gib"]))
    return rows


def stack_table(results: dict) -> str:
    """Markdown: model, size, stack, s/step, bound, measured / bound, 50-step loop, peak VRAM."""
    lines = ["| model | size (WxHxF) | stack | s / step | bound (H200) | measured / bound | one 50-step loop | "
             "peak VRAM |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in stack_rows(results):
        loop = row.get("loop_s_at_50_steps")
        peak = row.get("peak_gib")
        lines.append(f"| {row['model']} | {row['size']} | {row['stack']} | {row['step_s']:.3f} s | "
                     f"{row['bound_s']:.3g} s | {row['vs_bound']:.3g} | {'%.1f s' % loop if loop else 'n/m'} | "
                     f"{'%.1f GiB' % peak if peak is not None else 'n/m'} |")
    return "\n".join(lines)


def write_table(json_path: Path, out: Optional[Path] = None) -> str:
    """The README table of the bench JSON at ``json_path`` (written to ``out`` when given)."""
    table = stack_table(json.loads(Path(json_path).read_text())) + "\n"
    if out is not None:
        Path(out).write_text(table)
    return table

