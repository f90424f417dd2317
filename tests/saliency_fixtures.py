"""A tiny stand-in for rembg's u2netp, built in code with onnx.helper (no torch export, no download).

The graph reads the way rembg's U2netpSession feeds it (input ``(1, 3, 320, 320)`` float32, ImageNet-normalised
RGB; rembg reads output 0 channel 0) and computes ``sigmoid(gain * (red - blue))``, so a red square on a blue
background gives a mask that is ~1 on the square and ~0 elsewhere.

Usage from any test (the app tests reuse it)::

    from saliency_fixtures import install_tiny_u2netp, use_rembg_home
    use_rembg_home(monkeypatch, tmp_path)          # U2NET_HOME=tmp_path, no downloads, fresh session cache
    install_tiny_u2netp(tmp_path)                  # tmp_path/models/u2netp/u2netp.onnx
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

U2NETP_INPUT_SIZE = 320  # rembg/sessions/u2netp.py: normalize(..., (320, 320))


def write_tiny_saliency_onnx(path: Path, gain: float = 4.0, size: Optional[int] = U2NETP_INPUT_SIZE) -> Path:
    """Write a one-layer saliency ONNX model ``sigmoid(gain * (red - blue))`` to ``path``; returns ``path``.

    ``size`` fixes the input to ``(1, 3, size, size)`` (onnxruntime then rejects any other feed, which checks
    that rembg resizes to what the real model expects); ``None`` makes height and width dynamic.
    """
    import onnx
    from onnx import TensorProto, helper

    h = w = size if size is not None else None
    dims_in = [1, 3, h or "height", w or "width"]
    dims_out = [1, 1, h or "height", w or "width"]
    # A 1x1 convolution is the per-pixel weighted channel sum gain*R + 0*G - gain*B.
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [gain, 0.0, -gain])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["mask"])],
        "tiny_u2netp",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, dims_out)],
        initializer=[weight],
    )
    # Pin an old IR/opset so any onnxruntime from the last few years loads it.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def install_tiny_u2netp(home: Path, name: str = "u2netp") -> Path:
    """Place the tiny model where rembg looks for ``name`` under rembg home ``home``; returns the file path.

    rembg 2.0.86 expects ``<home>/models/<name>/<name>.onnx`` and uses a file found there without downloading.
    """
    return write_tiny_saliency_onnx(Path(home) / "models" / name / f"{name}.onnx")


def use_rembg_home(monkeypatch, home: Path) -> Path:
    """Point rembg at ``home`` for this test, make any download attempt fail, and clear loopui's session cache.

    Sets ``U2NET_HOME`` (wins over ``REMBG_HOME``/``XDG_DATA_HOME``) and ``MODEL_CHECKSUM_DISABLED=1``, and
    patches ``pooch.retrieve`` (rembg's only downloader) to raise ``ConnectionError`` so no test can reach the
    network even on a machine that has it.
    """
    import pooch
    import requests

    from loopui.saliency import clear_session_cache

    def _no_download(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"network disabled in tests: {url}")

    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.setenv("MODEL_CHECKSUM_DISABLED", "1")
    monkeypatch.setattr(pooch, "retrieve", _no_download)
    clear_session_cache()
    return Path(home)


def red_square_image(size: Tuple[int, int] = (96, 64), box: Tuple[int, int, int, int] = (24, 16, 72, 48)
                     ) -> np.ndarray:
    """``(H, W, 3)`` uint8 blue image of ``size`` = (width, height) with a pure red ``box`` = (x0, y0, x1, y1)."""
    width, height = size
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 2] = 255
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (255, 0, 0)
    return img
