"""One plan per loop: ``resolve_request`` plans a request for a model once, ``LoopPlan.with_clip`` reads and fits
the clip once, and ``generate_loop`` / ``render_loop`` use a plan they are given instead of planning again."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from loopui.engine import LoopRequest, generate_loop, render_loop, resolve_request
from loopui.engine.families import family_for
from loopui.models import REGISTRY, spec_for_pipeline

H, W = 32, 48


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import imageio.v3 as iio

    path = tmp_path_factory.mktemp("plan-clip") / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (20, H, W, 3), dtype=np.uint8)
    iio.imwrite(path, frames, fps=8, codec="libx264", pixelformat="yuv420p", macro_block_size=2)
    return path


def _request(**extra) -> LoopRequest:
    values = dict(prompt="a red ball", num_frames=13, height=H, width=W, num_inference_steps=2, seed=3)
    return LoopRequest(**{**values, **extra})


def test_a_planned_loop_with_an_image_and_a_clip_is_planned_once_and_its_clip_read_once(tiny_pipe, clip_file,
                                                                                      counted, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "ref.png")
    request = _request(image=str(tmp_path / "ref.png"), video=str(clip_file))
    plan = resolve_request(request, spec_for_pipeline(tiny_pipe)).with_clip()
    assert plan.clip.shape == (13, H, W, 3) and plan.with_clip() is plan  # read once, kept
    render = render_loop(tiny_pipe, None, outputs=[tmp_path / "loop.mp4"], plan=plan)
    assert counted == {"plan_loop": 1, "load_video": 1}
    assert render.result.plan is plan and render.result.frames.shape[0] == 4 * plan.num_latents == 16


def test_a_bare_library_call_plans_itself(tiny_pipe, clip_file, counted):
    result = generate_loop(tiny_pipe, _request(video=str(clip_file)), output_type="latent")
    assert counted == {"plan_loop": 1, "load_video": 1}
    assert result.plan.request.video == str(clip_file) and result.plan.clip is not None


def test_the_plan_path_and_the_bare_path_make_the_same_loop_and_sidecar(tiny_pipe, tmp_path):
    request = _request(shift_skip=3)
    bare = render_loop(tiny_pipe, request, outputs=[tmp_path / "bare.mp4"])
    planned = render_loop(tiny_pipe, None, outputs=[tmp_path / "planned.mp4"],
                          plan=resolve_request(request, spec_for_pipeline(tiny_pipe)))
    assert np.array_equal(bare.result.frames, planned.result.frames)

    def settings(render):
        return json.loads(render.sidecar.read_text())["settings"]

    assert settings(bare) == settings(planned)
    assert settings(planned)["shift_skip"] == 3 and settings(planned)["num_latent_frames"] == 4


def test_the_typed_plan_is_what_the_settings_say(tiny_pipe):
    result = generate_loop(tiny_pipe, _request(), output_type="latent")
    plan, settings = result.plan, result.settings
    assert (settings["num_latent_frames"], settings["shift_skip"], settings["height"], settings["width"]) == \
        (plan.num_latents, plan.shift_skip, plan.height, plan.width) == (4, 1, H, W)
    assert settings["family"] == family_for(tiny_pipe).name == "cogvideox"
    assert settings["latent_layout"] == "(B, T, C, H, W)" and settings["model_calls"] == result.model_calls > 0


def test_a_plan_is_not_mixed_with_another_request_or_another_family(tiny_pipe):
    plan = resolve_request(_request(), spec_for_pipeline(tiny_pipe))
    with pytest.raises(ValueError, match="either a request or the plan"):
        generate_loop(tiny_pipe, _request(seed=4), plan=plan, output_type="latent")
    wan = dataclasses.replace(plan, spec=REGISTRY["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
    with pytest.raises(ValueError, match="made for a wan model, not for this cogvideox pipeline"):
        generate_loop(tiny_pipe, None, plan=wan, output_type="latent")
    with pytest.raises(ValueError, match="needs a request or a plan"):
        generate_loop(tiny_pipe, None, output_type="latent")


def test_resolve_request_fills_the_automatic_values_into_the_planned_request():
    spec = REGISTRY["THUDM/CogVideoX-5b"]
    plan = resolve_request(LoopRequest(prompt="x", num_frames=50), spec)
    assert plan.notes == ("num_frames 50 is not of the form 4n+1: using 49",)
    assert (plan.request.num_frames, plan.request.shift_skip, plan.request.height, plan.request.width) == \
        (49, 6, spec.native_height, spec.native_width)
    assert plan.request.guidance_scale is None  # guidance stays automatic: on a two-expert model it is a pair
