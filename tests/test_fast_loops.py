"""Few-step loops (issue 15, section 2), judged on the exact toy instrument inside a real tiny WanPipeline.

The cycle is Wan's trained 21 latents; figures are means over seeds 0-2 at the automatic defaults (seam polish
``fast``). An exact, non-looping sample of the prior has an interior ratio of ~1.025 here: the floor. Before the
polished steps were chosen by noise level, 4 UniPC steps left 1.17, 8 steps 1.15, and Euler was never polished
where its seam forms (4 steps: 2.8).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from instrument import installed, measure
from loopui.engine import LoopRequest, generate_loop
from loopui.engine.plan import plan_loop
from loopui.engine.polish import SEAM_POLISH_PRESETS, polish_cost
from loopui.engine.request import request_from_values
from loopui.engine.schedules import distilled_sigmas
from loopui.engine.shift import ShiftSchedule
from tiny_wan import build_tiny_wan

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan()


def _sampler(name: str, steps: int) -> dict:
    """Request knobs of the three few-step samplers: UniPC and Euler at their own spacing (shift 3), and the emulated
    distilled sampler: the exact flow map re-noised between steps at lightx2v's noise levels."""
    if name == "distilled":
        return dict(scheduler="lcm", sigmas=distilled_sigmas(steps))
    return dict(scheduler=name)


def _mean(wan, steps: int, sampler: str, **kwargs):
    runs = [measure(wan, num_latents=21, seed=s, seam_polish="fast", num_inference_steps=steps,
                    **_sampler(sampler, steps), **kwargs) for s in SEEDS]
    return (statistics.mean(m.seam_ratio for m in runs), statistics.mean(m.interior_ratio for m in runs),
            runs[0].model_calls / steps)


# -- which steps are polished -----------------------------------------------------------------------------------------

def _flow_sigmas(scheduler) -> list[float]:
    return [float(s) for s in scheduler.sigmas]


def test_polished_steps_are_chosen_by_noise_level():
    fast = SEAM_POLISH_PRESETS["fast"]
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.set_timesteps(4)  # sigma 1, 0.9, 0.75, 0.5, 0
    assert fast.polished_steps(4, _flow_sigmas(unipc)) == {2, 3}
    unipc.set_timesteps(50)  # no step of a long schedule drops far: only the last one is polished
    assert fast.polished_steps(50, _flow_sigmas(unipc)) == {49}
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(50)  # Euler's last call sits at sigma ~0.009, a near-identity step: the one before it
    assert _flow_sigmas(euler)[49] < 0.02 and fast.polished_steps(50, _flow_sigmas(euler)) == {48}
    euler.set_timesteps(4)  # sigma 1, 0.86, 0.60, 0.009
    assert fast.polished_steps(4, _flow_sigmas(euler)) == {1, 2}
    # Unknown levels: the last fraction of the steps, as before.
    assert fast.polished_steps(50) == {49}
    assert polish_cost("fast", 50) == polish_cost("fast", 50, _flow_sigmas(unipc)) == 1.02


def test_the_schedule_reads_the_noise_levels_once_when_first_asked():
    reads = []

    def levels():
        reads.append(1)
        return [1.0, 0.9, 0.75, 0.5, 0.0]

    schedule = ShiftSchedule(21, 10, 4, polish=SEAM_POLISH_PRESETS["fast"], noise_levels=levels)
    assert [s for s in range(4) if schedule.polishing(s)] == [2, 3] and len(reads) == 1
    assert not ShiftSchedule(21, 0, 4, polish=SEAM_POLISH_PRESETS["fast"], noise_levels=levels).polishing(3)


# -- the goal on the instrument ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["unipc", "euler", "distilled"])
@pytest.mark.parametrize("steps", [4, 6, 8])
def test_few_step_loops_reach_the_floor_by_default(wan, sampler, steps):
    seam, interior, calls_per_step = _mean(wan, steps, sampler)
    assert interior <= 1.03 and seam <= 1.05
    assert calls_per_step <= 1.8


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_fifty_steps_cost_what_they_cost_before(wan, sampler):
    m = measure(wan, num_latents=21, seed=0, seam_polish="fast", num_inference_steps=50, scheduler=sampler)
    assert m.model_calls / 50 <= 1.02
    assert m.interior_ratio <= 1.03  # Euler's polish now lands where its seam forms (1.041 before, unpolished)


# -- the distilled sampler's knobs ------------------------------------------------------------------------------------

def test_distilled_sigmas_are_lightx2vs_four_steps():
    assert distilled_sigmas(4) == pytest.approx((1.0, 0.9375, 0.8333333, 0.625))


def test_a_sigma_list_reaches_the_scheduler_and_a_seed_reproduces_the_renoising_sampler(wan):
    sigmas = distilled_sigmas(4)
    runs = []
    for seed in (3, 3, 4):
        with installed(wan) as instrument:
            seen = []
            inner = instrument.__call__

            def spy(*args, **kwargs):
                seen.append(float(torch.as_tensor(kwargs["timestep"]).flatten()[0]))
                return inner(*args, **kwargs)

            wan.transformer.forward = spy
            request = LoopRequest(prompt="gp", num_frames=21, height=32, width=32, num_inference_steps=4,
                                  guidance_scale=1.0, seed=seed, scheduler="lcm", sigmas=sigmas, seam_polish="off")
            torch.manual_seed(seed * 1000)  # the global random state must not matter
            runs.append(generate_loop(wan, request, output_type="latent"))
        assert seen == pytest.approx([1000 * s for s in sigmas], abs=1e-3)
    assert torch.equal(runs[0].latents, runs[1].latents) and not torch.equal(runs[0].latents, runs[2].latents)
    assert runs[0].scheduler_class == "FlowMatchLCMScheduler"
    assert runs[0].settings["sigmas"] == pytest.approx(list(sigmas)) and runs[0].settings["flow_shift"] == 1.0


def test_sigma_lists_are_refused_where_they_cannot_apply(wan, tiny_pipe):
    from loopui.engine.loop import pipeline_spec

    base = dict(prompt="x", num_inference_steps=4, sigmas="1, 0.9375, 0.8333, 0.625")
    assert request_from_values(base).sigmas == (1.0, 0.9375, 0.8333, 0.625)
    with pytest.raises(ValueError, match="^sigmas must have one value per step: 4 given for num_inference_steps 8"):
        request_from_values({**base, "num_inference_steps": 8})
    with pytest.raises(ValueError, match="^sigmas must decrease"):
        request_from_values({**base, "sigmas": [1, 0.5, 0.7, 0.2]})
    with pytest.raises(ValueError, match="^sigmas apply to flow-matching models"):
        plan_loop(request_from_values(base), pipeline_spec(tiny_pipe))
    with pytest.raises(ValueError, match="^flow_shift does not apply with sigmas"):
        plan_loop(request_from_values({**base, "flow_shift": 5}), pipeline_spec(wan))
    with pytest.raises(ValueError, match="^scheduler must be one of ddim, dpm"):
        plan_loop(request_from_values({"prompt": "x", "scheduler": "lcm"}), pipeline_spec(tiny_pipe))
