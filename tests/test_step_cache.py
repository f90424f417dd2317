"""The loop-aware step cache (issue 15, section 3), judged by what a cache can get wrong: the distance to the uncached
run and the loop's correlation with itself shifted by the shift skip (ghosting: a prediction reused in another
rotation's frame order). Seam ratios do not see ghosting, so they are only checked not to get worse.

The instrument is the exact toy denoiser in a real tiny WanPipeline, Wan's trained 21 latents; an exact sample of
the prior is uncorrelated at the shift skip (exp(-10^2 / 18) = 0.004).
"""

from __future__ import annotations

import pytest
import torch

from instrument import installed, lag_correlation, measure, relative_error
from loopui.engine import LoopRequest, generate_loop
from loopui.engine.polish import SEAM_POLISH_PRESETS
from loopui.engine.request import STEP_CACHES, knob_info
from loopui.engine.shift import ShiftSchedule
from loopui.engine.stepcache import cache_skips
from tiny_wan import build_tiny_wan


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan()


def _unipc_sigmas(steps: int) -> list[float]:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas]


def test_the_knob_is_a_request_field_with_its_choices():
    info = knob_info("step_cache")
    assert info["default"] == "off" and tuple(info["choices"]) == STEP_CACHES == ("off", "loop")
    assert LoopRequest(step_cache="loop").validate().to_dict()["step_cache"] == "loop"
    with pytest.raises(ValueError, match="^step_cache must be one of off, loop; got 'teacache'"):
        LoopRequest(step_cache="teacache").validate()


def test_skipped_steps_follow_the_noise_levels():
    skipped = cache_skips(_unipc_sigmas(50), 50)
    assert len(skipped) >= 15 and not any(s + 1 in skipped for s in skipped)  # never two in a row
    assert 0 not in skipped and 49 not in skipped
    assert cache_skips(_unipc_sigmas(8), 8) == frozenset()  # every few-step step moves too far to reuse
    # Polished steps always call the model; the rotation advances per computed step.
    schedule = ShiftSchedule(21, 10, 50, polish=SEAM_POLISH_PRESETS["fast"], noise_levels=lambda: _unipc_sigmas(50),
                             step_cache=True)
    assert not schedule.skipped_steps() & schedule.polished_steps()
    computed = [s for s in range(50) if s not in schedule.skipped_steps()]
    assert [schedule.offset(s) for s in computed] == [(10 * j) % 21 for j in range(len(computed))]


@pytest.fixture(scope="module")
def fifty(wan):
    """Seed 0 at 50 UniPC steps: uncached, loop-cached."""
    return (measure(wan, num_latents=21, seed=0, seam_polish="fast"),
            measure(wan, num_latents=21, seed=0, seam_polish="fast", step_cache="loop"))


def test_loop_cache_skips_a_third_of_the_calls_without_ghosting(fifty):
    plain, cached = fifty
    assert cached.model_calls <= 0.7 * plain.model_calls  # 51 -> 32 measured
    assert cached.relative_error(plain) <= 0.05  # 0.033 measured
    assert abs(cached.lag_correlation()) <= 0.05  # 0.009 measured, as uncached
    assert cached.interior_ratio <= 1.03 and cached.seam_ratio <= 1.05


class _NaiveCache:
    """What a transformer hook below the rotation does: at the skipped steps, return the last output as it was --
    a prediction made in the previous call's frame order."""

    def __init__(self, forward, skipped):
        self.forward, self.skipped, self.step, self.last = forward, skipped, 0, None

    def __call__(self, **kwargs):
        step = self.step
        self.step += 1
        if step in self.skipped and self.last is not None:
            return (self.last,)
        self.last = self.forward(**kwargs)[0]
        return (self.last,)


def test_a_cache_below_the_rotation_is_caught_by_these_measures(wan, fifty):
    plain, cached = fifty
    skipped = cache_skips(_unipc_sigmas(50), 50)
    with installed(wan) as instrument:
        wan.transformer.forward = _NaiveCache(instrument, skipped)
        request = LoopRequest(prompt="gp", num_frames=81, height=256, width=384, guidance_scale=1.0, seed=0,
                              seam_polish="off", frame_invariant_decoding=False)
        naive = generate_loop(wan, request, output_type="latent").latents[0].movedim(1, 0)
    # 0.25 and 0.2 measured: the same skipped steps, reused in the wrong frame order, ghost the loop.
    assert abs(lag_correlation(naive, 10)) > 0.15 and relative_error(naive, plain.latents) > 0.1
    assert abs(cached.lag_correlation()) < 0.05


def test_nothing_is_skipped_at_few_steps(wan):
    plain = measure(wan, num_latents=21, seed=1, seam_polish="fast", num_inference_steps=8)
    cached = measure(wan, num_latents=21, seed=1, seam_polish="fast", num_inference_steps=8, step_cache="loop")
    assert cached.model_calls == plain.model_calls and torch.equal(cached.latents, plain.latents)


def test_guidance_branches_and_polish_calls_do_not_shift_the_cache_counting(wan):
    calls = {}
    for level in ("off", "fast"):
        with installed(wan):
            request = LoopRequest(prompt="gp", num_frames=21, height=32, width=32, guidance_scale=5.0, seed=0,
                                  seam_polish=level, step_cache="loop")
            calls[level] = generate_loop(wan, request, output_type="latent").model_calls
    skipped = cache_skips(_unipc_sigmas(50), 50, keep=frozenset({49}))
    # Two guidance branches per computed step; fast polish adds one rotation per branch at step 49 only.
    assert calls["off"] == 2 * (50 - len(cache_skips(_unipc_sigmas(50), 50)))
    assert calls["fast"] == 2 * (50 - len(skipped)) + 2


# -- diffusers' own caches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("technique", ["FirstBlockCache", "TaylorSeerCache", "PyramidAttentionBroadcast"])
def test_a_diffusers_cache_is_refused_under_the_shift_and_left_alone_without_it(technique):
    import diffusers

    pipe = build_tiny_wan()
    from diffusers import WanTransformer3DModel

    # FirstBlockCache needs a first and a last block.
    pipe.transformer = WanTransformer3DModel.from_config({**pipe.transformer.config, "num_layers": 2}).eval()
    if technique == "PyramidAttentionBroadcast":
        from diffusers.hooks import apply_pyramid_attention_broadcast

        # Applied as a hook directly (no enable_cache): found by its hook, not only by the model's cache config.
        apply_pyramid_attention_broadcast(pipe.transformer, diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500))
    else:
        pipe.transformer.enable_cache(getattr(diffusers, f"{technique}Config")())
    request = LoopRequest(prompt="waves", num_frames=21, height=32, width=32, num_inference_steps=2)
    with pytest.raises(ValueError, match=f"^pipe: diffusers' {technique} is enabled on the transformer; .*"
                                         f"use step_cache='loop' instead") as err:
        generate_loop(pipe, request, output_type="latent")
    assert "\n" not in str(err.value)
    if technique == "FirstBlockCache":  # plain sampling: the cache's own business
        generate_loop(pipe, LoopRequest(**{**request.to_dict(), "shift_skip": 0}), output_type="latent")
