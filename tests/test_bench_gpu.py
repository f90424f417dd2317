"""The GPU benchmark's code paths, on CPU with shrunk models (``--smoke``): what runs on a lent GPU is tested here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
