"""``python -m loopui mask``: the motion mask of a reference image as a PNG, its defaults, its one-line errors.

The tiny ONNX stand-in for u2netp (saliency_fixtures.py) makes a red square on blue salient; nothing downloads."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
from PIL import Image

from loopui.cli import build_parser, main
from loopui.cli.mask import add_mask_arguments, run_mask_command
from loopui.engine.request import LoopRequest, knob_info
from saliency_fixtures import red_square_image
from test_saliency import empty_home, inside_outside, tiny_home  # noqa: F401  (fixtures)


def parse(argv: list) -> argparse.Namespace:
    return add_mask_arguments(argparse.ArgumentParser(prog="loopui mask")).parse_args(argv)


def test_mask_command_writes_grayscale_png(tiny_home, tmp_path, capsys):
    source = tmp_path / "square.png"
    Image.fromarray(red_square_image()).save(source)
    output = tmp_path / "out" / "mask.png"
    assert run_mask_command(parse([str(source), "--output", str(output), "--feather", "0"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(output) in lines[0] and "25.0%" in lines[0]
    with Image.open(output) as written:
        assert written.mode == "L" and written.size == (96, 64)
        pixels = np.asarray(written)
    inside, outside = inside_outside(pixels)
    assert inside.min() == 255 and outside.max() == 0
    assert run_mask_command(parse([str(source), "-o", str(output), "--invert", "--grow", "2"])) == 0
    with Image.open(output) as written:
        assert np.asarray(written)[32, 48] == 0 and np.asarray(written)[0, 0] == 255


@pytest.mark.parametrize("case", ["missing_image", "bad_output", "no_weights", "bad_threshold"])
def test_mask_command_errors_are_one_line(empty_home, tmp_path, capsys, case):
    source = tmp_path / "square.png"
    Image.fromarray(red_square_image()).save(source)
    argv = {"missing_image": [str(tmp_path / "nope.png"), "-o", str(tmp_path / "m.png")],
            "bad_output": [str(source), "-o", str(tmp_path / "m.jpg")],
            "no_weights": [str(source), "-o", str(tmp_path / "m.png")],
            "bad_threshold": [str(source), "-o", str(tmp_path / "m.png"), "--threshold", "3"]}[case]
    assert run_mask_command(parse(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("loopui: error: ")
    if case == "bad_threshold":
        assert "threshold" in lines[0]
    if case == "no_weights":
        assert "u2netp" in lines[0] and str(empty_home / "models" / "u2netp" / "u2netp.onnx") in lines[0]
    assert not (tmp_path / "m.png").exists()


def _mask_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["mask"]


def test_mask_defaults_are_loop_request_knobs():
    """One set of mask defaults: `mask` reads LoopRequest's knobs, as `generate`'s --mask-* flags do."""
    knobs = {"mask_model": "mask_model", "threshold": "mask_threshold", "grow": "mask_grow",
             "feather": "mask_feather"}
    args = _mask_parser().parse_args(["photo.png", "-o", "m.png"])
    generate = build_parser().parse_args(["generate", "--prompt", "x", "-o", "x.mp4"])
    for dest, field in knobs.items():
        assert getattr(args, dest) == knob_info(field)["default"] == getattr(generate, field)


def test_mask_defaults_follow_a_changed_knob(monkeypatch):
    """Change a mask knob's one definition and the `mask` command's default and help follow it."""
    fields = {f.name: f for f in dataclasses.fields(LoopRequest)}
    monkeypatch.setattr(fields["mask_feather"], "default", 5)
    monkeypatch.setattr(fields["mask_threshold"], "default", 0.25)
    monkeypatch.setattr(fields["mask_grow"], "default", -3)
    parser = add_mask_arguments(argparse.ArgumentParser(prog="loopui mask"))
    args = parser.parse_args(["photo.png", "-o", "m.png"])
    assert (args.feather, args.threshold, args.grow) == (5, 0.25, -3)
    text = " ".join(parser.format_help().split())
    assert "(default 5)" in text and "(default 0.25)" in text and "(default -3)" in text


def test_mask_subcommand_is_wired(tmp_path, capsys):
    assert main(["mask", str(tmp_path / "nope.png"), "--output", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loopui: error: ") and "Traceback" not in err, err
    assert "nope.png" in lines[0]


def test_failed_real_download_prints_one_line(empty_home, tmp_path, capsys, monkeypatch):
    """Let rembg run pooch.retrieve for real (it logs "Downloading data from ..." to stderr through its own
    handler) with only the transfer blocked: nothing reaches pooch's handlers and the CLI prints one line."""
    import logging

    import pooch
    import pooch.core
    import requests

    attempts, records = [], []

    def no_transfer(url, *args, **kwargs):
        attempts.append(url)
        raise requests.exceptions.ConnectionError(f"network disabled in tests: {url}")

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    monkeypatch.setattr(pooch, "retrieve", pooch.core.retrieve)
    monkeypatch.setattr(pooch.core, "stream_download", no_transfer)
    recorder = Recorder()
    pooch.get_logger().addHandler(recorder)
    try:
        source = tmp_path / "square.png"
        Image.fromarray(red_square_image()).save(source)
        assert run_mask_command(parse([str(source), "-o", str(tmp_path / "m.png")])) == 2
    finally:
        pooch.get_logger().removeHandler(recorder)
    assert len(attempts) == 1 and attempts[0].endswith("u2netp.onnx")
    assert records == []
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "u2netp" in captured.err
