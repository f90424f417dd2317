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


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP (model, tokenizer, image processor) saved with ``save_pretrained``: a loadable
    local folder for the CLIP scores."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from loopui.models.demo import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    # eos 1 = the tiny tokenizer's </s>, so the text model pools at the end of the prompt as CLIP does.
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=8, bos_token_id=0,
                eos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    folder = tmp_path_factory.mktemp("tiny-clip") / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def flag_image():
    """A synthetic 64x96 reference: smooth colour ramps with a bright disc on the left."""
    import numpy as np

    yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
    img = np.stack([xx / 96, yy / 64, 0.5 + 0.5 * np.sin(xx / 7.0)], axis=-1)
    img[(yy - 32) ** 2 + (xx - 24) ** 2 < 15 ** 2] = [1.0, 0.9, 0.2]
    return (img * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def left_half_mask():
    """A 64x96 half-plane motion mask: the left half may move, the right half is background."""
    import numpy as np

    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, :48] = 255
    return mask


@pytest.fixture(scope="session")
def faithful_wan_dir(tmp_path_factory) -> Path:
    """Wan 2.1 T2V 1.3B's real configuration, shrunk in width and depth only (``loopui.testing.faithful``), saved as
    a loadable local diffusers folder."""
    from loopui.testing.faithful import save_faithful_pipeline

    return save_faithful_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                  tmp_path_factory.mktemp("faithful-wan") / "model")


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    """Clips written by imageio-ffmpeg directly, as another program would (not our exporter): ``good`` (a bright bar
    sliding over a gradient, 30 frames of 60x40 at 12 fps: it does not loop), and bad ones -- ``text`` (not a
    video), ``empty``, ``truncated`` (cut before the index MP4 keeps at its end), ``short`` (3 frames) and ``fast``
    (300 fps)."""
    import imageio.v3 as iio
    import numpy as np

    yy, xx = np.mgrid[0:40, 0:60].astype(np.float32)
    frames = []
    for t in range(30):
        frame = np.stack([xx / 60, yy / 40, np.full_like(xx, 0.3)], -1)
        frame[:, (t * 2) % 60:(t * 2) % 60 + 6] = [1.0, 1.0, 0.8]
        frames.append((frame * 255).astype(np.uint8))
    frames = np.stack(frames)
    folder = tmp_path_factory.mktemp("clips")
    out = {name: folder / f"{stem}.mp4" for name, stem in (("good", "bar"), ("text", "notes"), ("empty", "empty"),
                                                           ("truncated", "cut"), ("short", "short"),
                                                           ("fast", "fast"))}
    options = dict(plugin="FFMPEG", codec="libx264", macro_block_size=2)
    iio.imwrite(out["good"], frames, fps=12, **options)
    iio.imwrite(out["short"], frames[:3], fps=12, **options)
    iio.imwrite(out["fast"], frames[:10], fps=300, **options)
    out["text"].write_text("this is not a video")
    out["empty"].write_bytes(b"")
    data = out["good"].read_bytes()
    out["truncated"].write_bytes(data[: len(data) // 2])
    return out


@pytest.fixture()
def counted(monkeypatch):
    """Counts of ``plan_loop`` calls (under every name the engine calls it by) and of clips read from disk."""
    import loopui.engine.loop as loop_module
    import loopui.engine.plan as plan_module
    import loopui.media as media

    counts = {"plan_loop": 0, "load_video": 0}
    real_plan, real_load = plan_module.plan_loop, media.load_video

    def plan_loop(*args, **kwargs):
        counts["plan_loop"] += 1
        return real_plan(*args, **kwargs)

    def load_video(*args, **kwargs):
        counts["load_video"] += 1
        return real_load(*args, **kwargs)

    for module in (plan_module, loop_module):
        monkeypatch.setattr(module, "plan_loop", plan_loop)
    monkeypatch.setattr(media, "load_video", load_video)
    return counts
