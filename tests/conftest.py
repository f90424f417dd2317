"""Shared fixtures: tiny random-weight CogVideoX pipelines built in code (no download, ever)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Belt and braces: nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny text-to-video CogVideoX pipeline (rotary, 13 trained latents, v-prediction DDIM)."""
    from loopui.models.demo import build_tiny_cogvideox

    return build_tiny_cogvideox()


@pytest.fixture(scope="session")
def tiny_i2v_pipe():
    """A tiny image-to-video CogVideoX pipeline (image latents concatenated on the channel axis)."""
    from loopui.models.demo import build_tiny_cogvideox

    return build_tiny_cogvideox(image_to_video=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny CogVideoX saved with ``save_pretrained``: a loadable local diffusers folder."""
    from loopui.models.demo import save_tiny_cogvideox

    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny-cogvideox") / "model")
