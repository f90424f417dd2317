"""bench/bench_fast.py in smoke mode: tiny sizes, one repeat; its rows and its JSON (never wall-time values)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_fast  # noqa: E402  (bench/bench_fast.py)


def test_fast_bench_counts_model_calls_per_loop(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fast.json"
    assert bench_fast.main(["--smoke", "--json", str(out)]) == 0
    rows = {row["row"]: row for row in json.loads(out.read_text())["speed"]}
    assert set(rows) == set(bench_fast.SPEED_ROWS)
    assert rows["UniPC 50, CFG"]["model_calls"] == 2 * 51  # two guidance branches, one polished step
    assert rows["UniPC 50, CFG, loop cache"]["model_calls"] <= 0.7 * 102
    assert rows["UniPC 4, CFG"]["model_calls"] == 2 * (4 + 2)  # two of four steps polished
    assert rows["distilled 4 (lcm, lightx2v sigmas), no CFG"]["model_calls"] == 4 + 2
    assert all(row["seconds"] > 0 for row in rows.values())
    assert "| UniPC 50, CFG, loop cache | " in capsys.readouterr().out
