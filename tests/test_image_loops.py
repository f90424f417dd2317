"""Reference-image loops on tiny CogVideoX pipelines: anchor, init strength, background freeze, I2V rolling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from loopui.engine.conditioning import mask_to_latent_grid
from loopui.engine.families import family_for
from loopui.media import load_reference_image

H, W = 64, 96  # latent grid 8 x 12
BASE = dict(prompt="a flag waving in the wind", height=H, width=W, num_inference_steps=5, seed=11,
            seam_polish="off")


@pytest.fixture(scope="module")
def image(flag_image):
    return flag_image


def _reference_latent(pipe, image) -> torch.Tensor:
    return family_for(pipe).encode_image(pipe, load_reference_image(image, W, H), H, W, torch.device("cpu"),
                                         torch.float32)


def test_all_controls_off_equals_the_text_only_loop(tiny_pipe, image):
    plain = generate_loop(tiny_pipe, LoopRequest(**BASE), output_type="latent")
    off = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, anchor_strength=0.0, init_strength=1.0,
                                               background_freeze=0.0), output_type="latent")
    assert torch.equal(plain.latents, off.latents)


def test_full_anchor_makes_the_first_latent_the_encoded_reference(tiny_pipe, image):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, anchor_strength=1.0), output_type="latent")
    reference = _reference_latent(tiny_pipe, image)
    torch.testing.assert_close(result.latents[:, :1], reference, rtol=1e-5, atol=1e-5)
    # ... and only the first: the rest of the cycle is free to move.
    assert not torch.allclose(result.latents[:, 5:6], reference, atol=1e-2)
    half = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, anchor_strength=0.5), output_type="latent")
    plain = generate_loop(tiny_pipe, LoopRequest(**BASE), output_type="latent")
    d_half = (half.latents[:, 0] - reference[:, 0]).abs().mean()
    d_plain = (plain.latents[:, 0] - reference[:, 0]).abs().mean()
    assert 0 < d_half < d_plain


def test_full_background_freeze_holds_the_background_still(tiny_pipe, image, left_half_mask):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, mask=left_half_mask, anchor_strength=0.0,
                                                  background_freeze=1.0), output_type="latent")
    latents = result.latents[0]  # (T, C, 8, 12)
    background = latents[..., 8:]  # pixels 64..95: far from the feathered edge at 48
    moving = latents[..., :4]
    assert torch.equal(background, background[:1].expand_as(background)), "background identical in every frame"
    assert torch.equal(background[0], _reference_latent(tiny_pipe, image)[0, 0, ..., 8:])
    assert (moving - moving[:1]).abs().mean() > 1e-3, "the masked object still moves"


def test_inverted_motion_region_freezes_the_object_instead(tiny_pipe, image, left_half_mask):
    result = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, mask=left_half_mask, anchor_strength=0.0,
                                                  background_freeze=1.0, motion_region="background"),
                           output_type="latent")
    latents = result.latents[0]
    assert torch.equal(latents[..., :4], latents[:1, ..., :4].expand_as(latents[..., :4]))
    assert (latents[..., 8:] - latents[:1, ..., 8:]).abs().mean() > 1e-3


def test_motion_everywhere_makes_the_background_freeze_inert(tiny_pipe, image):
    plain = generate_loop(tiny_pipe, LoopRequest(**BASE), output_type="latent")
    everything = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, anchor_strength=0.0, background_freeze=1.0,
                                                      motion_region="everything"), output_type="latent")
    assert torch.equal(plain.latents, everything.latents)


def test_mask_downsampling_keeps_feathering():
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[:, :44] = 1.0
    mask[:, 44:52] = np.linspace(1, 0, 8)[None]
    grid = mask_to_latent_grid(mask, 8, 12)[0, 0, 0]
    assert grid.shape == (8, 12)
    assert torch.all(grid[:, :5] == 1) and torch.all(grid[:, 7:] == 0)
    assert 0 < float(grid[0, 5]) < 1 and 0 < float(grid[0, 6]) < 1


def test_init_strength_starts_from_the_noised_reference(tiny_pipe, image):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = tiny_pipe.transformer.forward

    def recorder(**kwargs):
        seen.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))
        return original(**kwargs)

    steps, strength = 10, 0.6  # floor((1 - 0.6) * 10) = 4 steps replaced by the noised reference
    tiny_pipe.transformer.forward = recorder
    try:
        result = generate_loop(tiny_pipe, LoopRequest(**{**BASE, "num_inference_steps": steps}, image=image,
                                                      anchor_strength=0.0, init_strength=strength),
                               output_type="latent")
    finally:
        del tiny_pipe.transformer.forward
    assert result.settings["model_calls"] == len(seen) == steps - 4

    scheduler = tiny_pipe.scheduler
    scheduler.set_timesteps(steps)
    t4 = scheduler.timesteps[4]
    assert int(seen[0][1][0]) == int(t4)
    # The pipeline's own starting noise, as prepare_latents draws it from the seed.
    noise = torch.randn((1, 13, 4, 8, 12), generator=torch.Generator().manual_seed(BASE["seed"]))
    reference = _reference_latent(tiny_pipe, image)
    expected = scheduler.add_noise(reference.expand_as(noise), noise, t4.reshape(1))
    offset = (4 * 6) % 13  # the model sees the cycle rotated as usual at step 4
    torch.testing.assert_close(seen[0][0][:1], torch.roll(expected, -offset, dims=1), rtol=1e-5, atol=1e-5)


def test_full_init_strength_is_pure_noise(tiny_pipe, image):
    plain = generate_loop(tiny_pipe, LoopRequest(**BASE), output_type="latent")
    same = generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, anchor_strength=0.0, init_strength=1.0),
                         output_type="latent")
    assert torch.equal(plain.latents, same.latents)


def _i2v_inputs(pipe, image, steps: int = 6, **request) -> list[torch.Tensor]:
    """The hidden states the I2V transformer sees at each step (noisy latents | image conditioning on C)."""
    seen: list[torch.Tensor] = []
    original = pipe.transformer.forward

    def recorder(**kwargs):
        seen.append(kwargs["hidden_states"].detach().clone())
        return original(**kwargs)

    pipe.transformer.forward = recorder
    try:
        generate_loop(pipe, LoopRequest(**{**BASE, "height": 32, "width": 48, "num_inference_steps": steps},
                                        image=image, anchor_strength=0.0, **request), output_type="latent")
    finally:
        del pipe.transformer.forward
    assert len(seen) == steps
    return seen


def test_i2v_roll_policy_carries_the_image_latent_with_its_cycle_position(tiny_i2v_pipe, image):
    for i, hidden in enumerate(_i2v_inputs(tiny_i2v_pipe, image, image_channel="roll")):
        offset = (i * 6) % 13
        assert hidden.shape[2] == 8  # 4 noisy + 4 image-conditioning channels
        carries_image = hidden[0, :, 4:].abs().flatten(1).sum(dim=1) > 0
        # The image latent belongs to cycle position 0; rotated left by the offset it sits at (L - offset) mod L.
        assert carries_image.nonzero().flatten().tolist() == [(13 - offset) % 13], f"step {i}"


def test_i2v_default_keeps_every_call_in_distribution(tiny_i2v_pipe, image):
    """Default ``estimate``: the conditioning is always at clip position 0 (as in training); it is the image when the
    anchored latent leads the clip, otherwise the loop's clean estimate of the latent that leads it."""
    from loopui.engine.families import family_for
    from loopui.engine.noise import clean_estimate

    scheduler = tiny_i2v_pipe.scheduler
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        outputs.append((model_output.detach().clone(), sample.detach().clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = spy
    try:
        seen = _i2v_inputs(tiny_i2v_pipe, image)
    finally:
        del scheduler.step
    image_latent = seen[0][0, 0, 4:]
    assert image_latent.abs().sum() > 0
    family = family_for(tiny_i2v_pipe)
    for i, hidden in enumerate(seen):
        offset = (i * 6) % 13
        condition = hidden[0, :, 4:]
        assert condition[1:].abs().sum() == 0, f"step {i}: only clip position 0 carries conditioning"
        if offset == 0:
            assert torch.equal(condition[0], image_latent), f"step {i}"
        else:
            output, sample = outputs[i - 1]
            level = family.level(scheduler, i - 1)
            estimate = clean_estimate(sample, output, level, "v_prediction")[0, offset]
            torch.testing.assert_close(condition[0], estimate.to(condition.dtype), rtol=1e-5, atol=1e-5)


def test_i2v_image_policy_puts_the_image_first_in_every_clip(tiny_i2v_pipe, image):
    seen = _i2v_inputs(tiny_i2v_pipe, image, steps=4, image_channel="image")
    for hidden in seen:
        assert torch.equal(hidden[:, :, 4:], seen[0][:, :, 4:])


def test_i2v_needs_an_image(tiny_i2v_pipe):
    with pytest.raises(ValueError, match="image"):
        generate_loop(tiny_i2v_pipe, LoopRequest(**{**BASE, "height": 32, "width": 48}), output_type="latent")


@pytest.mark.parametrize("bad", [dict(anchor_strength=1.5), dict(init_strength=-0.1),
                                 dict(background_freeze=2.0), dict(motion_region="sky")])
def test_bad_image_settings_raise(tiny_pipe, image, bad):
    with pytest.raises(ValueError):
        generate_loop(tiny_pipe, LoopRequest(**BASE, image=image, **bad))


def test_unreadable_image_is_a_clear_error(tiny_pipe, tmp_path):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match="image"):
        generate_loop(tiny_pipe, LoopRequest(**BASE, image=str(bogus)))


def test_user_mask_is_cropped_like_the_reference_image(tiny_pipe):
    """A mask of another aspect ratio gets the image's cover-and-centre-crop, not a squash."""
    from loopui.engine.loop import _motion_mask

    # 200x100 source (2:1) -> 96x64 output (3:2): cover-scale 0.64 (128x64), then 16 px cropped at each side.
    # Source column 150 lands at 150 * 0.64 - 16 = 80 (a squash would put it at 150 * 96 / 200 = 72).
    source = np.zeros((100, 200), dtype=np.uint8)
    source[:, 150:] = 255
    image = load_reference_image(np.zeros((100, 200, 3), np.uint8), W, H)
    mask = _motion_mask(image, LoopRequest(prompt="x", mask=source, mask_feather=0, background_freeze=1.0))
    assert mask.shape == (H, W)
    assert mask[:, 82:].min() == 1.0 and mask[:, :78].max() == 0.0


@pytest.mark.parametrize("controls", [dict(), dict(anchor_strength=0.5, init_strength=0.6)])
def test_a_seed_reproduces_a_stochastic_schedulers_image_loop(tiny_i2v_pipe, image, controls):
    """DPM draws noise at every step: from the pipeline's generator (the seed), never from torch's global RNG, also
    while loopui observes the scheduler's step (the I2V estimate, the image controls)."""
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(generate_loop(tiny_i2v_pipe, LoopRequest(**{**BASE, "height": 32, "width": 48}, image=image,
                                                             scheduler="dpm", **controls), output_type="latent"))
    assert runs[0].settings["scheduler_class"] == "CogVideoXDPMScheduler"
    assert torch.equal(runs[0].latents, runs[1].latents)


def test_partial_pulls_keep_the_steps_noise_level(tiny_pipe, image, left_half_mask, monkeypatch):
    """A pull of weight w toward a target noised with its own noise must not shrink the noise to
    sqrt((1-w)^2 + w^2) of the step's (0.71 at w = 0.5): on the exact instrument at high noise every latent -- the
    half-anchored first one, the half-frozen background, the free rest -- has about unit std, like free latents."""
    from instrument import installed

    from loopui.engine.conditioning import ImageConditioning

    seen = []
    after_step = ImageConditioning.after_step

    def spy(self, step, latents, level, *args, **kwargs):
        out = after_step(self, step, latents, level, *args, **kwargs)
        seen.append((level.s, out.detach().clone()))
        return out

    monkeypatch.setattr(ImageConditioning, "after_step", spy)
    with installed(tiny_pipe):
        generate_loop(tiny_pipe, LoopRequest(**{**BASE, "height": 128, "width": 192}, guidance_scale=1.0,
                                             image=image, anchor_strength=0.5, background_freeze=0.5,
                                             mask=left_half_mask, mask_feather=0, init_strength=1.0),
                      output_type="latent")
    s, latents = seen[0]
    assert s > 0.95  # the first step: x = a x0 + s n with a^2 + s^2 = 1, so std 1 whatever the content
    frames = latents[0]  # (T, C, h, w): the anchored latent first
    stds = [float(frames[0].std()), float(frames[1:, ..., 12:].std()), float(frames[1:, ..., :12].std())]
    assert min(stds) > 0.93 and max(stds) < 1.07, f"anchored, frozen background, free: {stds}"
