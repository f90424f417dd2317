"""The GPU benchmark's code paths, on CPU with shrunk models (``--smoke``): what runs on a lent GPU is tested here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_every_section_it_is_asked_for(tmp_path):
    wan = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    done = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--smoke", "--out", str(tmp_path), "--models", wan,
         "--sections", wan, "windows", "text_encoders"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    sections = results["sections"]
    model = sections[f"model:{wan}"]
    assert "error" not in model, model
    # Wan: conditional and unconditional call per step, plus seam polish fast's extra pass per call at each polished
    # step (chosen by noise level: at 3 steps one or two of them).
    assert model["loop"]["model_calls_per_step"] in ((2 * 3 + 2) / 3, (2 * 3 + 4) / 3)
    assert model["loop_vs_stock"] > 0 and model["decode_invariant"]["frames"] == 4 + model["decode_stock"]["frames"] - 1
    windows = sections[f"windows:{wan}"]
    assert windows["24_window"]["model_calls_per_step"] > windows["24_full"]["model_calls_per_step"]  # 3 past 21
    assert "error" not in sections["text_encoders"]
    assert (tmp_path / "gpu_bench.md").read_text().startswith("| model |")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_gpu_bench_smoke_runs_the_speed_stacks_against_their_flop_bound(tmp_path):
    # kernels on the 1.3B, FP8/int8 + group offload on the 14B (both shrunk): the code paths a GPU lease runs
    wan, wan14 = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    done = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--smoke", "--out", str(tmp_path), "--models", wan, wan14,
         "--sections", f"kernels:{wan}", f"low_vram:{wan14}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sections = json.loads((tmp_path / "gpu_bench.json").read_text())["sections"]
    assert set(sections) == {f"kernels:{wan}", f"low_vram:{wan14}"}
    kernels = sections[f"kernels:{wan}"]
    assert "error" not in kernels, kernels
    # the bound of the model that ran (the shrunk transformer at the smoke size), from its config
    from loopui.testing.faithful import component_class_name, load_config, shrunk_overrides
    from loopui.testing.flops import step_flops

    config = load_config(wan)["transformer"]
    flops = step_flops(wan, 32, 32, 13, transformer_overrides=shrunk_overrides(component_class_name(config), config))
    assert kernels["flops"]["passes"] == 2 and kernels["flops"]["bound_bf16_s"] == float(f"{flops.bound_s():.4g}")
    native = kernels["stacks"]["native"]
    assert native["bound_s"] == kernels["flops"]["bound_bf16_s"]
    assert native["vs_bound"] == pytest.approx(native["step_s"] / native["bound_s"], rel=0.01)
    assert native["loop_s_at_50_steps"] == pytest.approx(50 * native["step_s"] + kernels["decode"]["s"], abs=0.1)
    assert kernels["decode"]["frames"] == 16  # 4 latents, frame-invariant: the borrowed context is not output

    compiled = kernels["stacks"].get("native+compile", {})
    if _has("loopui.models.accel"):
        # a CPU has no GPU kernel: each one refused in one line that names it
        assert set(kernels["kernels_unavailable"]) == {"flash", "flash3", "sage", "xformers"}
        assert all("\n" not in why and name in why for name, why in kernels["kernels_unavailable"].items())
        again = kernels["stacks"]["native+compile again"]
        assert compiled["compiled"] is True and compiled["graphs_compiled"] >= 1 and compiled["compile_stage_reported"]
        assert again["graphs_compiled"] == 0, again  # the loop's rotations keep every shape: no recompile
    else:
        assert "loopui.models.accel" in compiled["error"]

    low_vram = sections[f"low_vram:{wan14}"]
    if _has("loopui.models.quantize"):
        int8 = kernels["stacks"]["native+int8"]
        assert int8["quantize"] == "int8" and int8["bound_s"] == native["bound_s"]  # int8 weight-only computes bf16
        assert "error" not in low_vram, low_vram
        assert low_vram["quantized"] == "int8" and low_vram["policy"] == "group"
        assert low_vram["run"]["step_s"] > 0 and low_vram["run"]["vs_bound"] > 0
    else:
        assert "loopui.models.quantize" in kernels["stacks"]["quantize"]["error"]
        assert "loopui.models.quantize" in low_vram["error"]
    table = (tmp_path / "gpu_bench_stacks.md").read_text().splitlines()
    assert table[0].startswith("| model |") and any(f"| {wan} | 32x32x13 | native |" in line for line in table)


def test_the_table_of_the_h200_runs_so_far_is_the_committed_one(tmp_path):
    done = subprocess.run([sys.executable, "bench/bench_gpu.py", "--table", "docs/gpu_bench_h200.json", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (ROOT / "docs" / "gpu_bench_h200_stacks.md").read_text()
    rows = [line for line in done.stdout.splitlines() if "native (before #16)" in line]
    assert len(rows) == 9  # every registry model the old runs measured
    # the figure: the 1.3B loop at 2.2x its bf16 bound
    wan = "| Wan-AI/Wan2.1-T2V-1.3B-Diffusers | 832x480x81 | native (before #16) |"
    assert rows[0].startswith(f"{wan} 1.244 s | 0.572 s | 2.17 |")
