"""The engine's test matrix on every registry model's config-faithful variant (real flags, shrunk width/depth).

For each model: skip 0 is exactly the stock pipeline; the default trajectory equals an independently written
latent-shift reference for the family's layout (text-to-video models); odd and even cycles decode to 4·L frames;
window mode past the trained length feeds the model clips of exactly the trained length; seam polish adds its extra
pass; the reference-image controls hold (anchor, background freeze). CogVideoX-5b-I2V's learned positional table
gets its own checks: refusals before any work, and window mode keeps the learned table in use.
"""

from __future__ import annotations

import contextlib
import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop, plan_loop
from loopui.engine.families import family_for
from loopui.testing.faithful import FAITHFUL_MODELS, build_faithful_pipeline
from loopui.models.registry import REGISTRY, spec_for_pipeline

_PIPES: dict = {}
PROMPT = "a koi pond, ripples, top view"
T2V = [m for m in FAITHFUL_MODELS if not REGISTRY[m].image_to_video]
I2V = [m for m in FAITHFUL_MODELS if REGISTRY[m].image_to_video]


def _pipe(model_id: str):
    if model_id not in _PIPES:
        _PIPES[model_id] = build_faithful_pipeline(model_id)
    return _PIPES[model_id]


def _size(model_id: str) -> tuple[int, int]:
    spec = REGISTRY[model_id]
    if spec.fixed_size:
        return spec.native_height, spec.native_width
    return (64, 64) if spec.size_multiple > 16 else (32, 48)


def _image(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return (np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 9)], -1) * 255).astype(np.uint8)


def _request(model_id: str, **kwargs) -> LoopRequest:
    height, width = _size(model_id)
    spec = REGISTRY[model_id]
    base = dict(prompt=PROMPT, height=height, width=width, num_inference_steps=2, seed=4,
                num_frames=spec.trained_num_frames if spec.learned_positions else 17, guidance_scale=5.0,
                seam_polish="off")
    if spec.image_to_video:
        base.update(image=_image(height, width), anchor_strength=0.0)
    base.update(kwargs)
    return LoopRequest(**base)


@contextlib.contextmanager
def _named(pipe, model_id: str):
    """The pipeline as ModelManager leaves it: named by its hub id, so the registry's recommendations (DPM for
    CogVideoX-5b, the A14B guidance pair, flow shifts) apply."""
    pipe.register_to_config(_name_or_path=model_id)
    try:
        yield pipe
    finally:
        pipe.register_to_config(_name_or_path="")


def _stock(pipe, request: LoopRequest):
    kwargs = dict(prompt=request.prompt, height=request.height, width=request.width, num_frames=request.num_frames,
                  num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                  generator=torch.Generator().manual_seed(request.seed), output_type="latent")
    if request.image is not None:
        from loopui.media import load_reference_image

        kwargs["image"] = load_reference_image(request.image, request.width, request.height)
    return pipe(**kwargs).frames


def _reference_loop(pipe, request: LoopRequest, skip: int) -> torch.Tensor:
    """Latent shift written out from the papers for either layout, independent of the engine's code: roll the
    cycle left by the offset on the family's time axis, run the denoiser(s) with CFG as each stock pipeline does
    (CogVideoX: one batched call; Wan: conditional then unconditional call, the expert chosen by the boundary), roll
    the guided prediction back, step the pipeline's scheduler; the offset advances by the skip once per step."""
    family = family_for(pipe)
    cpu = torch.device("cpu")
    wan = family.name == "wan"
    length = (request.num_frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(request.seed)
    if wan:
        cond, uncond = pipe.encode_prompt(request.prompt, None, True, max_sequence_length=512, device=cpu)
        shape = (1, pipe.vae.config.z_dim, length, request.height // pipe.vae_scale_factor_spatial,
                 request.width // pipe.vae_scale_factor_spatial)
    else:
        cond, uncond = pipe.encode_prompt(request.prompt, None, do_classifier_free_guidance=True, device=cpu)
        shape = (1, length, pipe.transformer.config.in_channels, request.height // pipe.vae_scale_factor_spatial,
                 request.width // pipe.vae_scale_factor_spatial)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(request.num_inference_steps, device=cpu)
    latents = torch.randn(shape, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    axis = 2 if wan else 1
    rotary = None
    if not wan and pipe.transformer.config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(request.height, request.width, length, cpu)
    boundary = None if not wan or pipe.config.boundary_ratio is None else pipe.config.boundary_ratio * 1000
    offset, g = 0, request.guidance_scale
    with torch.no_grad():
        for t in scheduler.timesteps:
            rolled = torch.roll(latents, shifts=-offset, dims=axis)
            if wan:
                model = pipe.transformer if boundary is None or t >= boundary else pipe.transformer_2
                timestep = t.expand(1)
                if pipe.config.expand_timesteps:  # one timestep per token (Wan 2.2 TI2V)
                    timestep = torch.ones(shape[2], shape[3] // 2, shape[4] // 2).flatten()[None] * t
                c = model(hidden_states=rolled, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
                u = model(hidden_states=rolled, timestep=timestep, encoder_hidden_states=uncond,
                          return_dict=False)[0]
            else:
                out = pipe.transformer(hidden_states=torch.cat([rolled] * 2), timestep=t.expand(2),
                                       encoder_hidden_states=torch.cat([uncond, cond]), image_rotary_emb=rotary,
                                       return_dict=False)[0]
                u, c = out.float().chunk(2)
            prediction = torch.roll(u + g * (c - u), shifts=offset, dims=axis)
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
            offset = (offset + skip) % length
    return latents


def _record_calls(pipe):
    """Wrap every denoiser's forward; return (records, undo)."""
    calls: list[torch.Tensor] = []
    modules = family_for(pipe).denoisers(pipe)
    for module in modules:
        original = module.forward

        def forward(_original=original, **kwargs):
            calls.append(kwargs["hidden_states"].detach().clone())
            return _original(**kwargs)

        module.forward = forward

    def undo() -> None:
        for module in modules:
            del module.forward

    return calls, undo


# -- every model -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id", FAITHFUL_MODELS)
def test_skip_zero_is_exactly_the_stock_pipeline(model_id):
    pipe = _pipe(model_id)
    request = _request(model_id, shift_skip=0, num_inference_steps=1 if REGISTRY[model_id].fixed_size else 2)
    loop = generate_loop(pipe, request, output_type="latent")
    assert torch.equal(_stock(pipe, request).float(), loop.latents)
    assert loop.settings["family"] == REGISTRY[model_id].family


@pytest.mark.parametrize("model_id", T2V)
@pytest.mark.parametrize("num_frames", [17, 21])  # 5 and 6 latents: odd and even cycles
def test_default_trajectory_equals_the_independent_reference(model_id, num_frames):
    pipe = _pipe(model_id)
    request = _request(model_id, num_frames=num_frames, num_inference_steps=3)
    result = generate_loop(pipe, request, output_type="latent")
    skip = result.settings["shift_skip"]
    assert skip > 0
    torch.testing.assert_close(result.latents, _reference_loop(pipe, request, skip).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_id", [m for m in T2V if REGISTRY[m].family == "wan"][:2]
                         + [m for m in T2V if REGISTRY[m].family == "cogvideox"][:1])
@pytest.mark.parametrize("num_frames", [17, 21])
def test_odd_and_even_cycles_decode_to_four_frames_per_latent(model_id, num_frames):
    result = generate_loop(_pipe(model_id), _request(model_id, num_frames=num_frames, num_inference_steps=1))
    length = (num_frames - 1) // 4 + 1
    assert result.frames.shape[0] == 4 * length == result.settings["num_output_frames"]
    assert result.seam_ratio is not None and np.isfinite(result.seam_ratio)


@pytest.mark.parametrize("model_id", FAITHFUL_MODELS)
def test_window_mode_feeds_clips_of_the_trained_length(model_id):
    pipe = _pipe(model_id)
    spec = spec_for_pipeline(pipe)
    trained = spec.trained_latent_frames
    frames = (trained + 1) * 4 + 1  # two latents past the trained length
    family = family_for(pipe)
    calls, undo = _record_calls(pipe)
    try:
        result = generate_loop(pipe, _request(model_id, num_frames=frames, num_inference_steps=1,
                                              window_mode="window"), output_type="latent")
    finally:
        undo()
    assert result.latents.shape[family.time_dim] == trained + 2
    assert {c.shape[family.time_dim] for c in calls} == {trained}
    assert result.settings["rope_scale"] == 1.0 and torch.isfinite(result.latents).all()


@pytest.mark.parametrize("model_id", [m for m in FAITHFUL_MODELS if not REGISTRY[m].learned_positions])
def test_full_mode_past_the_trained_length_scales_the_temporal_rope(model_id):
    pipe = _pipe(model_id)
    spec = spec_for_pipeline(pipe)
    frames = (spec.trained_latent_frames + 1) * 4 + 1
    request = _request(model_id, num_frames=frames, num_inference_steps=1)
    plan = plan_loop(request, spec)
    expected = (spec.trained_latent_frames + 2) / spec.trained_latent_frames if spec.rotary else 1.0
    assert plan.rope_scale == pytest.approx(expected)
    result = generate_loop(pipe, request, output_type="latent")
    assert result.settings["rope_scale"] == pytest.approx(expected) and torch.isfinite(result.latents).all()


@pytest.mark.parametrize("model_id", [m for m in FAITHFUL_MODELS if not REGISTRY[m].learned_positions])
def test_seam_polish_adds_one_pass_per_cfg_branch_at_each_polished_step(model_id):
    pipe = _pipe(model_id)
    plain = generate_loop(pipe, _request(model_id, num_inference_steps=3), output_type="latent")
    polished = generate_loop(pipe, _request(model_id, num_inference_steps=3, seam_polish="fast"),
                             output_type="latent")
    calls_per_step = plain.settings["model_calls"] / 3  # 2 for Wan (two CFG calls), 1 for CogVideoX (batched)
    # Polish picks its steps by noise level (at 3 steps: one or two of them): one extra pass per branch at each.
    extra_steps = (polished.settings["model_calls"] - plain.settings["model_calls"]) / calls_per_step
    assert extra_steps in (1, 2, 3)
    assert not torch.equal(plain.latents, polished.latents)


@pytest.mark.parametrize("model_id", [m for m in FAITHFUL_MODELS if not REGISTRY[m].learned_positions])
def test_anchor_and_background_freeze(model_id):
    pipe = _pipe(model_id)
    family = family_for(pipe)
    height, width = _size(model_id)
    image = _image(height, width)
    anchored = generate_loop(pipe, _request(model_id, image=image, anchor_strength=1.0), output_type="latent")
    from loopui.media import load_reference_image

    reference = family.encode_image(pipe, load_reference_image(image, width, height), height, width,
                                    torch.device("cpu"), torch.float32)
    first = anchored.latents.narrow(family.time_dim, 0, 1)
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-4)
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255  # the left half may move
    frozen = generate_loop(pipe, _request(model_id, image=image, anchor_strength=0.0, background_freeze=1.0,
                                          mask=mask, mask_feather=0), output_type="latent")
    frames = frozen.latents.movedim(family.time_dim, 0)  # (T, B, C, h, w) whatever the layout
    right = frames[..., frames.shape[-1] * 3 // 4:]
    assert torch.equal(right, right[:1].expand_as(right)), "the frozen half is identical in every frame"
    left = frames[..., :1]
    assert (left - left[:1]).abs().mean() > 1e-4, "the masked half still moves"


def test_registry_recommendations_reach_the_pipeline_call():
    pipe = _pipe("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    pipe.register_to_config(_name_or_path="Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    try:
        result = generate_loop(pipe, LoopRequest(prompt=PROMPT, height=32, width=48, num_frames=17,
                                                 num_inference_steps=1), output_type="latent")
    finally:
        pipe.register_to_config(_name_or_path="")
    settings = result.settings
    assert (settings["guidance_scale"], settings["guidance_scale_2"], settings["flow_shift"]) == (4.0, 3.0, 12.0)
    assert settings["fps"] == 16 and settings["model"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


# -- CogVideoX-5b-I2V: learned positional embeddings and RoPE ---------------------------------------------------------

I2V_5B = "THUDM/CogVideoX-5b-I2V"


@pytest.mark.parametrize("bad, needle", [
    (dict(height=256, width=384), "runs only at 720x480"),
    (dict(num_frames=97), "window_mode 'window'"),
    (dict(num_frames=25), "at least 49 frames"),
])
def test_learned_positions_refuse_before_any_work(bad, needle):
    spec = REGISTRY[I2V_5B]
    request = LoopRequest(prompt=PROMPT, image=_image(32, 32), **bad)
    with pytest.raises(ValueError, match=needle):
        plan_loop(request, spec)


def test_window_mode_keeps_the_learned_table_in_use():
    """Perturbing the stored learned table changes a window-mode loop of 15 latents: every window has the trained
    13 latents, so diffusers uses the learned table rather than a sincos stand-in."""
    pipe = _pipe(I2V_5B)
    request = _request(I2V_5B, num_frames=57, num_inference_steps=1, window_mode="window")
    before = generate_loop(pipe, request, output_type="latent").latents
    table = pipe.transformer.patch_embed.pos_embedding
    saved = table.detach().clone()
    try:
        with torch.no_grad():
            table.add_(torch.randn_like(table))
        after = generate_loop(pipe, request, output_type="latent").latents
    finally:
        with torch.no_grad():
            table.copy_(saved)
    assert not torch.allclose(before, after)


# -- built under their hub ids: the registry's recommendations run, and a seed reproduces the loop ------------------

def _seed_cases(model_id: str) -> list[str]:
    spec = REGISTRY[model_id]
    if spec.fixed_size:  # 720x480 only: one case keeps the test cheap (the image channel's estimate alone)
        return ["image"]
    return ["text", "controls", "clip"] if not spec.image_to_video else ["image", "controls", "clip"]


def _seed_request(model_id: str, case: str) -> LoopRequest:
    height, width = _size(model_id)
    kwargs: dict = dict(guidance_scale=None)  # the model's own recommendation (A14B: a pair)
    if case == "controls":
        mask = np.zeros((height, width), np.uint8)
        mask[:, : width // 2] = 255
        kwargs.update(image=_image(height, width), anchor_strength=0.5, init_strength=0.8)
        if not REGISTRY[model_id].fixed_size:
            kwargs.update(background_freeze=0.6, mask=mask, mask_feather=0)
    elif case == "image":
        kwargs.update(image=_image(height, width))
    elif case == "clip":
        clip = np.stack([np.roll(_image(height, width), 3 * t, axis=1) for t in range(17)])
        kwargs.update(video=clip, fps=8, loop_region=0.5, image=None)
    return _request(model_id, **kwargs)


@pytest.mark.parametrize("model_id, case", [(m, c) for m in FAITHFUL_MODELS for c in _seed_cases(m)])
def test_a_seed_reproduces_the_loop_whatever_the_global_rng(model_id, case):
    """The seed alone decides the loop: stochastic schedulers (CogVideoX-5b's DPM) must get the pipeline's generator
    even while loopui observes ``scheduler.step``, so torch's global RNG state changes nothing."""
    pipe = _pipe(model_id)
    runs = []
    with _named(pipe, model_id):
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            runs.append(generate_loop(pipe, _seed_request(model_id, case), output_type="latent"))
    spec = REGISTRY[model_id]
    expected = {"dpm": "CogVideoXDPMScheduler", "ddim": "CogVideoXDDIMScheduler"}.get(spec.scheduler)
    if expected is not None:
        assert runs[0].settings["scheduler_class"] == expected, "the registry's scheduler ran"
    if spec.flow_shift is not None:
        assert runs[0].settings["flow_shift"] == (spec.flow_shift_480p or spec.flow_shift)
    difference = float((runs[0].latents - runs[1].latents).abs().max())
    assert difference == 0.0, f"global RNG seeded 0 vs 1: latents differ by up to {difference:.3g}"
