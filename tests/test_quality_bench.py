"""bench/quality.py on the CPU: the tiny demo pipeline, tiny size, 1 step, 2 prompts; its table and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/quality.py)

SMALL = ["--model", "demo", "--limit", "2", "--steps", "1", "--frames", "9", "--height", "32", "--width", "48"]


def test_ships_about_twenty_loopable_prompts() -> None:
    prompts = quality.read_prompts(ROOT / "assets" / "prompts.txt")
    assert 18 <= len(prompts) <= 30 and len(set(prompts)) == len(prompts)


def test_quality_bench_writes_the_table_and_every_loop(tiny_pipe, tiny_clip_dir, tmp_path: Path) -> None:
    out = tmp_path / "quality"
    code = quality.main([*SMALL, "--samplers", "plain,window", "--clip", str(tiny_clip_dir), "--device", "cpu",
                         "--out", str(out)], pipe=tiny_pipe)
    assert code == 0
    data = json.loads((out / "quality.json").read_text())
    rows = {row["sampler"]: row for row in data["rows"]}
    assert list(rows) == ["plain", "window"] and all(row["loops"] == 2 for row in rows.values())
    loops = data["loops"]
    assert len(loops) == 4 and {loop["prompt"] for loop in loops} == set(quality.read_prompts(
        ROOT / "assets" / "prompts.txt", limit=2))
    # 9 frames -> 3 latents -> 12 frames; the window row runs a cycle twice as long (6 latents -> 24 frames).
    assert {loop["num_frames"] for loop in loops if loop["sampler"] != "window"} == {12}
    assert {(loop["num_latent_frames"], loop["num_frames"]) for loop in loops if loop["sampler"] == "window"} == {
        (6, 24)}
    for name, row in rows.items():
        mine = [loop for loop in loops if loop["sampler"] == name]
        for key in ("seam_ratio", "first_last_mse", "motion_smoothness", "clip_score"):
            assert row[key] == pytest.approx(sum(loop[key] for loop in mine) / 2)
    table = (out / "quality.md").read_text()
    assert "| sampler | loops | seam ratio ≈1 |" in table and "CLIP score ↑" in table
    assert "| plain (shift 0) | 2 |" in table and "| window mode (2L) | 2 |" in table


def test_on_the_exact_toy_model_latent_shift_scores_as_a_loop(tiny_pipe, tmp_path: Path) -> None:
    # The instrument ignores the prompt, so one prompt and two seeds; pixels come from the tiny random VAE.
    argv = ["--model", "demo", "--instrument", "--samplers", "plain,shift", "--limit", "1", "--seeds", "0,1",
            "--steps", "10", "--frames", "17", "--height", "32", "--width", "48", "--fast", "--out", str(tmp_path)]
    assert quality.main(argv, pipe=tiny_pipe) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    plain, shift = data["rows"]
    assert "exact toy denoiser" in data["config"]["model"]
    assert shift["first_last_mse"] < plain["first_last_mse"] / 2  # measured: 90 vs 379
    assert shift["first_last_ssim"] > plain["first_last_ssim"] + 0.05  # 0.96 vs 0.84
    assert shift["seam_ratio"] < plain["seam_ratio"] - 0.3  # 1.21 vs 1.83
    assert "transformer" not in tiny_pipe.transformer.__dict__ and "forward" not in tiny_pipe.transformer.__dict__


@pytest.mark.parametrize("argv, needle", [
    (["--samplers", "plain,nope"], "unknown samplers"),
    (["--prompts", "no-such-file.txt"], "not found"),
    (["--seeds", "a,b"], "--seeds"),
])
def test_bad_arguments_exit_2(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        quality.main([*SMALL, *argv])
    assert info.value.code == 2 and needle in capsys.readouterr().err
