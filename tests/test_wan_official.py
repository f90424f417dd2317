"""Wan as its makers run it: Wan 2.2 TI2V-5B's own image-to-video conditioning under the latent shift, and the
official samplers' defaults (steps, negative prompt, guidance, shift) as the automatic values.

TI2V-5B is built from its real configs (``loopui.testing.faithful``) and named by its hub id, as ``ModelManager``
records it. With an image its pipeline is diffusers' ``WanImageToVideoPipeline`` with ``expand_timesteps``: the
image latent replaces the first latent and its tokens are at timestep 0. Under the shift that latent rotates with the
cycle, so in every clip the model sees, the image and its timestep 0 sit at the image latent's rotated position.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop, plan_loop
from loopui.engine.families import family_for
from loopui.testing.faithful import FAITHFUL_MODELS, build_faithful_pipeline, load_config
from loopui.models.registry import REGISTRY, WAN21_I2V_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT, spec_for

from test_wan import Recorder
from tiny_wan import build_tiny_wan

TI2V = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
SIZE = 64  # 16x VAE and patch 2: sides are multiples of 32


def _image(size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return (np.stack([xx / size, yy / size, 0.5 + 0.5 * np.sin(xx / 7)], axis=-1) * 255).astype(np.uint8)


def _request(**kwargs) -> LoopRequest:
    base = dict(prompt="a red fox in the snow", height=SIZE, width=SIZE, num_frames=17, num_inference_steps=3,
                seed=1, guidance_scale=5.0, seam_polish="off")
    base.update(kwargs)
    return LoopRequest(**base)


@pytest.fixture(scope="module")
def ti2v():
    pipe = build_faithful_pipeline(TI2V)  # WanPipeline, expand_timesteps: the hub's model_index
    pipe.register_to_config(_name_or_path=TI2V)  # as ModelManager records a hub model
    return pipe


def _i2v_view(pipe, name: str):
    """The diffusers recipe for TI2V-5B's image-to-video mode: WanImageToVideoPipeline with expand_timesteps over
    the same components (what ``build_faithful_pipeline(..., pipeline_class=...)`` builds)."""
    from diffusers import WanImageToVideoPipeline

    view = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
    view.register_to_config(_name_or_path=name)
    view.set_progress_bar_config(disable=True)
    return view


def _image_latent(pipe) -> torch.Tensor:
    from loopui.media import load_reference_image

    picture = load_reference_image(_image(), SIZE, SIZE)
    return family_for(pipe).encode_image(pipe, picture, SIZE, SIZE, torch.device("cpu"), torch.float32)


def test_ti2v_with_an_image_runs_its_image_to_video_mode_with_the_image_latent_at_timestep_0_in_every_clip(ti2v):
    with Recorder(ti2v.transformer) as rec:
        result = generate_loop(ti2v, _request(image=_image()), output_type="latent")
    settings = result.settings
    assert settings["pipeline"] == "WanImageToVideoPipeline" and settings["model"] == TI2V
    assert settings["image_channel"] == "roll"  # what happens: the image rides with its latent
    image_latent = _image_latent(ti2v)  # (1, 48, 1, 2, 2)
    length, skip = settings["num_latent_frames"], settings["shift_skip"]
    assert (length, skip) == (5, 2) and len(rec.calls) == 2 * 3  # conditional and unconditional per step
    positions = []
    for index, call in enumerate(rec.calls):
        step = index // 2
        position = (-step * skip) % length  # where cycle latent 0 (the image) sits in the clip rotated by i·k
        positions.append(position)
        hidden, timestep = call["hidden_states"], call["timestep"]
        torch.testing.assert_close(hidden[:, :, position:position + 1], image_latent, rtol=1e-5, atol=1e-5)
        per_frame = timestep.reshape(1, length, -1)  # one timestep per token, time-major
        assert torch.all(per_frame[:, position] == 0), (index, per_frame[0, :, 0])
        others = torch.cat([per_frame[:, :position], per_frame[:, position + 1:]], dim=1)
        assert torch.all(others == others.flatten()[0]) and float(others.flatten()[0]) > 0
    assert set(positions) == {0, 3, 1}  # the image really moved around the clip
    # The pipeline puts the image back into the first latent at the end: the loop starts on the image.
    torch.testing.assert_close(result.latents[:, :, :1], image_latent, rtol=1e-5, atol=1e-5)
    assert "forward" not in ti2v.transformer.__dict__ and type(ti2v).__name__ == "WanPipeline"


def test_ti2v_image_mode_at_skip_0_is_exactly_the_stock_image_to_video_pipeline(ti2v):
    from loopui.media import load_reference_image

    request = _request(image=_image(), shift_skip=0, anchor_strength=0.0)
    loop = generate_loop(ti2v, request, output_type="latent")
    stock = _i2v_view(ti2v, TI2V)(
        prompt=request.prompt, negative_prompt=WAN_NEGATIVE_PROMPT, image=load_reference_image(_image(), SIZE, SIZE),
        height=SIZE, width=SIZE, num_frames=17, num_inference_steps=3, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(1), output_type="latent").frames
    assert torch.equal(stock.float(), loop.latents)


def test_the_diffusers_recipe_for_ti2v_image_to_video_runs_under_its_hub_id_and_under_another_name(ti2v):
    for name in (TI2V, "my-ti2v-copy"):  # hub id: TypeError (no image sent); other name: IndexError (estimate)
        view = _i2v_view(ti2v, name)
        result = generate_loop(view, _request(image=_image(), image_channel="estimate"), output_type="latent")
        assert result.settings["pipeline"] == "WanImageToVideoPipeline"
        assert result.settings["image_channel"] == "roll"
        torch.testing.assert_close(result.latents[:, :, :1], _image_latent(ti2v), rtol=1e-5, atol=1e-5)


def test_ti2v_refuses_an_image_channel_it_does_not_have_before_any_work(ti2v):
    with Recorder(ti2v.transformer) as rec:
        with pytest.raises(ValueError, match="^image_channel must be estimate or roll for Wan-AI/Wan2.2-TI2V-5B"):
            generate_loop(ti2v, _request(image=_image(), image_channel="image"), output_type="latent")
        with pytest.raises(ValueError, match="image_channel"):
            plan_loop(_request(image=_image(), image_channel="image"), spec_for(TI2V))
    assert rec.calls == []


def test_ti2v_without_an_image_stays_text_to_video(ti2v):
    with Recorder(ti2v.transformer) as rec:
        result = generate_loop(ti2v, _request(num_inference_steps=1), output_type="latent")
    assert result.settings["pipeline"] == "WanPipeline" and result.settings["image_channel"] is None
    for call in rec.calls:
        assert torch.all(call["timestep"] == call["timestep"].flatten()[0]) and float(call["timestep"][0, 0]) > 0
    plan = plan_loop(_request(), spec_for(TI2V))
    assert (plan.image_to_video, plan.pipeline_class, plan.image_channel) == (False, "WanPipeline", None)
    plan = plan_loop(_request(image=_image()), spec_for(TI2V))
    assert (plan.image_to_video, plan.pipeline_class, plan.image_channel) == (True, "WanImageToVideoPipeline", "roll")


# -- the official defaults ---------------------------------------------------------------------------------------------

WAN = [m for m in FAITHFUL_MODELS if REGISTRY[m].family == "wan"]


@pytest.mark.parametrize("model_id", WAN)
def test_wan_recommendations_are_the_official_samplers(model_id):
    spec = REGISTRY[model_id]
    recommended = load_config(model_id)["recommended"]  # each value with its source (Wan-Video/Wan2.1, Wan2.2)
    assert spec.num_inference_steps == recommended["num_inference_steps"]
    assert spec.guidance_scale == recommended["guidance_scale"]
    assert spec.guidance_scale_2 == recommended.get("guidance_scale_2")
    assert spec.flow_shift == recommended["flow_shift"] and spec.native_fps == recommended["fps"]
    expected = WAN21_I2V_NEGATIVE_PROMPT if model_id == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" else WAN_NEGATIVE_PROMPT
    assert spec.negative_prompt == expected


def test_steps_and_negative_prompt_are_automatic_through_the_plan():
    request = LoopRequest(prompt="waves")
    assert request.num_inference_steps is None
    a14b = plan_loop(request, spec_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers"))
    assert a14b.num_inference_steps == 40 and a14b.negative_prompt == WAN_NEGATIVE_PROMPT
    assert plan_loop(request, spec_for("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")).num_inference_steps == 50
    assert plan_loop(request, spec_for("THUDM/CogVideoX-5b")).num_inference_steps == 50
    assert plan_loop(request, spec_for("THUDM/CogVideoX-5b")).negative_prompt == ""  # CogVideoX has none
    i2v = plan_loop(LoopRequest(prompt="waves", image=_image()), spec_for("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"))
    assert i2v.num_inference_steps == 40 and i2v.negative_prompt.startswith("镜头晃动，")
    given = plan_loop(LoopRequest(prompt="waves", num_inference_steps=7, negative_prompt="blur"),
                      spec_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers"))
    assert (given.num_inference_steps, given.negative_prompt) == (7, "blur")


def test_a14b_samples_40_steps_and_sends_wans_negative_prompt_by_default():
    model_id = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    pipe = build_tiny_wan(experts=2)
    pipe.register_to_config(_name_or_path=model_id)
    request = LoopRequest(prompt="waves rolling onto a beach", height=32, width=32, num_frames=9, seam_polish="off")
    with Recorder(pipe.transformer) as high, Recorder(pipe.transformer_2) as low:
        result = generate_loop(pipe, request, output_type="latent")
    calls = high.calls + low.calls
    assert len(calls) == 2 * 40 and result.settings["num_inference_steps"] == 40
    assert result.settings["negative_prompt"] == WAN_NEGATIVE_PROMPT
    json.dumps(result.settings)  # the sidecar holds it as written
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("waves rolling onto a beach", WAN_NEGATIVE_PROMPT, True,
                                          max_sequence_length=512, device=torch.device("cpu"))
        _, empty = pipe.encode_prompt("x", None, True, max_sequence_length=512, device=torch.device("cpu"))
    # Wan calls the denoiser with the prompt, then with the negative prompt, at every step.
    torch.testing.assert_close(calls[0]["encoder_hidden_states"], cond)
    torch.testing.assert_close(calls[1]["encoder_hidden_states"], uncond)
    assert (uncond - empty).abs().max() > 1e-2  # not what an empty negative prompt encodes to
