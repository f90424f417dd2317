"""``python -m loopui score``: our exports and other programs' videos, tables and JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopui.cli import main
from loopui.media import export_video, load_video, loop_scores

from test_cli import _error_line
from test_scores import panning


def _json(capsys, *argv: str) -> list[dict]:
    code = main(["score", *argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_scores_our_own_exports_and_tells_the_loop(tmp_path: Path, capsys) -> None:
    loop = export_video(panning(10, 3.0, period=10), tmp_path / "loop.mp4", fps=8)
    clip = export_video(panning(10, 3.0), tmp_path / "clip.gif", fps=8)
    rows = _json(capsys, str(loop), str(clip))
    assert [row["file"] for row in rows] == [str(loop), str(clip)]
    for row in rows:
        assert {"file", "seam_ratio", "interior_ratio", "first_last_mse", "motion_smoothness"} <= set(row)
        assert row["num_frames"] == 10 and row["fps"] == pytest.approx(8.0)
    assert rows[0]["seam_ratio"] < 1.2 < rows[1]["seam_ratio"]
    assert rows[0]["first_last_mse"] < rows[1]["first_last_mse"]
    # The numbers are loop_scores of the decoded file.
    frames, fps = load_video(loop)
    expected = loop_scores(frames, fps=fps)
    assert rows[0]["first_last_mse"] == pytest.approx(expected["first_last_mse"])
    assert rows[0]["motion_smoothness"] == pytest.approx(expected["motion_smoothness"])


def test_scores_videos_written_by_other_programs(tmp_path: Path, capsys) -> None:
    import imageio_ffmpeg

    frames = panning(10, 2.0)
    # An MP4 straight from imageio-ffmpeg's writer (its own defaults, 15 fps) ...
    mp4 = tmp_path / "other.mp4"
    writer = imageio_ffmpeg.write_frames(str(mp4), (frames.shape[2], frames.shape[1]), fps=15, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    # ... and a GIF from PIL at 50 ms a frame (20 fps).
    gif = tmp_path / "other.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=50, loop=0)
    rows = _json(capsys, str(mp4), str(gif), "--fast")
    assert [row["fps"] for row in rows] == [pytest.approx(15.0), pytest.approx(20.0)]
    assert [row["num_frames"] for row in rows] == [10, 10]
    for row, path in zip(rows, (mp4, gif)):
        decoded, _ = load_video(path)
        assert row["first_last_mse"] == pytest.approx(loop_scores(decoded, flow=False)["first_last_mse"])
        assert row["seam_ratio"] > 2 and row["motion_smoothness"] is None  # a pan does not loop; --fast


def test_table_compares_files_side_by_side(tmp_path: Path, capsys) -> None:
    a = export_video(panning(8, 2.0), tmp_path / "a.webp", fps=8)
    b = export_video(panning(8, 4.0), tmp_path / "b.mp4", fps=8)
    Image.fromarray(panning(8, 2.0)[0]).save(tmp_path / "ref.png")
    assert main(["score", str(a), str(b), "--fast", "--image", str(tmp_path / "ref.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "better", "a.webp", "b.mp4"]
    labels = ("seam ratio", "first/last MSE", "MSE_F0", "motion smoothness", "CLIP score")
    rows = {label: line[len(label):].split() for line in lines for label in labels if line.startswith(label + " ")}
    assert rows["seam ratio"][0] == "≈1" and len(rows["first/last MSE"]) == 3
    assert float(rows["MSE_F0"][1]) < float(rows["MSE_F0"][2])  # a.webp starts on the reference image
    assert "motion smoothness" not in rows and "CLIP score" not in rows  # --fast, no --clip


def test_clip_option_adds_the_clip_metrics(tmp_path: Path, capsys, tiny_clip_dir) -> None:
    video = export_video(panning(6, 2.0), tmp_path / "v.mp4", fps=8)
    rows = _json(capsys, str(video), "--fast", "--clip", str(tiny_clip_dir), "--prompt", "a pan", "--device", "cpu")
    assert rows[0]["clip_score"] is not None and 0.0 <= rows[0]["frame_consistency"] <= 1.0


@pytest.mark.parametrize("make, extra, needle", [
    (lambda d: d / "missing.mp4", [], "not found"),
    (lambda d: (d / "text.mp4").write_text("hello") and d / "text.mp4", [], "cannot read video file"),
    (lambda d: d, [], "is not a file"),
    (lambda d: Image.new("RGB", (32, 32)).save(d / "still.png") or d / "still.png", [], "at least 2"),
    (lambda d: export_video(panning(4, 1.0), d / "ok.gif", fps=8), ["--prompt", "x"], "pass --clip"),
    (lambda d: export_video(panning(4, 1.0), d / "ok.gif", fps=8), ["--image", "nope.png"], "[--image]"),
    (lambda d: export_video(panning(4, 1.0), d / "ok.gif", fps=8), ["--fps", "0"], "[--fps]"),
    (lambda d: export_video(panning(4, 1.0), d / "ok.gif", fps=8), ["--clip", "no-such-dir/clip"], "CLIP model"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys, make, extra, needle) -> None:
    path = make(tmp_path)
    assert main(["score", str(path), *extra]) == 2
    assert needle in _error_line(capsys)
