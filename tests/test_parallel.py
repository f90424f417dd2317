"""One loop across several processes (issue 9, part 2): diffusers context parallelism, as far as a CPU allows.

What runs here: two processes started by torchrun, gloo backend, on the CPU -- diffusers' real Ulysses context
parallelism on a tiny Wan pipeline with the loop wrapper installed (tests/cp_worker.py; its one shim is that each
process claims one accelerator, because diffusers 0.42.1 computes the device as ``rank % device_count()``). What
cannot run here: NCCL on GPUs, and ``generate_loop`` on a Wan pipeline end to end (the Wan family lands separately);
the CLI's ``--parallel`` is checked up to the point where it needs a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loopui.cli import main

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


def test_context_parallel_on_two_processes_matches_one_process_with_the_roll_outside(tmp_path):
    command = [*TORCHRUN, "--master-port", str(_free_port()), str(ROOT / "tests" / "cp_worker.py")]
    done = subprocess.run(command, cwd=ROOT, env={**_env(), "CP_OUT": str(tmp_path)}, capture_output=True,
                          text=True, timeout=600)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)
               if (tmp_path / f"rank{r}.json").exists()]
    assert len(reports) == 2, done.stderr[-3000:]
    for report in reports:
        assert report["ok"], report.get("error")
        # The sequence really was split: 12 tokens (3 latent frames of 2x2 patches), 6 per process.
        assert report["tokens_per_process"] == [6]
        # The loop (rolled before, rolled back after the transformer) comes out the same as on one process.
        assert report["max_diff"] < 1e-6
        # A RoPE scale set on every process (in place) matches the same scale on one process -- and changes
        # the result, so the comparison means something.
        assert report["max_diff_scaled_in_place"] < 1e-6 and report["differs_from_unscaled"] > 1e-5
        assert report["tables_restored"]
        # Rebuilding the rotary module instead loses the context-parallel split hook on it: a loud failure.
        assert report["rebuilt_rope"].startswith("RuntimeError") and "must match" in report["rebuilt_rope"]


def test_parallel_outside_torchrun_says_how_to_launch(capsys, monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code = main(["generate", "--model", "demo", "--prompt", "x", "--parallel", "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "torchrun --nproc-per-node N -m loopui generate --parallel" in err[0]


def test_parallel_refuses_cogvideox_before_loading_anything(capsys, monkeypatch, tmp_path):
    from loopui.models import PipelineLoader

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    loads = []
    monkeypatch.setattr(PipelineLoader, "load", lambda self, *a, **k: loads.append(a))
    code = main(["generate", "--model", "demo", "--prompt", "x", "--parallel", "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and loads == []
    assert "context-parallel plan" in err and "cogvideox" in err and "--devices" in err


def test_torchrun_entry_point_exists_and_fails_clearly_for_cogvideox(tmp_path):
    command = [*TORCHRUN, "--master-port", str(_free_port()), "-m", "loopui", "generate", "--parallel",
               "--model", "demo", "--prompt", "x", "-o", str(tmp_path / "o.mp4")]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("loopui: error:")]
    # One line per process; torchrun may stop the second before it prints once the first has failed.
    assert 1 <= len(lines) <= 2
    assert all("cogvideox, which has none in diffusers" in line for line in lines)
    assert not (tmp_path / "o.mp4").exists()


def test_torchrun_context_and_plans(tiny_pipe):
    from loopui.engine.parallel import enable_context_parallel, torchrun_context

    context = torchrun_context({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (context.rank, context.world_size, context.is_main) == (1, 4, False)
    with pytest.raises(ValueError, match="not integers"):
        torchrun_context({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="makes no sense"):
        torchrun_context({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert enable_context_parallel(tiny_pipe, 1) == []  # one process: nothing to split, nothing touched
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel has no context-parallel plan"):
        enable_context_parallel(tiny_pipe, 2)
