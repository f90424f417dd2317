"""Seam polish, judged on the exact toy denoiser of ``instrument.py`` (a Gaussian-process video prior).

Figures are means over seeds 0-2 at 50 steps, as in docs/seam_polish.md. Plain sampling has an ordinary interior
(largest step ~1.025x the mean step) and a wrap seam of ~4.3x; the reference latent shift closes the wrap but leaves
a hidden seam of ~1.33x where the final step cut the cycle; seam polish brings it back to the plain floor.
"""

from __future__ import annotations

import math

import pytest
import torch

from instrument import (HEIGHT, LENGTH_SCALE, WIDTH, GaussianProcessDenoiser, installed,
                        posterior_mean_matrix, prior_covariance, seed_means)
from loopui.engine import LoopRequest, generate_loop
from loopui.engine.polish import SEAM_POLISH_PRESETS, polish_cost
from loopui.engine.request import SEAM_POLISH_LEVELS, knob_info
from loopui.engine.shift import CycleDenoiser, SeamPolish, ShiftSchedule, StepState, edge_taper

SEEDS = (0, 1, 2)
SMOOTH = 1.05  # the target: as smooth as a non-looping generation


@pytest.fixture(scope="module")
def bench(tiny_pipe):
    """Means of 3 seeds of (seam, interior, model calls, worst steps); past 13 latents in window mode."""
    return seed_means(tiny_pipe, 13, SEEDS)


# -- the instrument itself --------------------------------------------------------------------------------------------

def test_instrument_prediction_implies_the_posterior_mean_through_the_ddim_step(tiny_pipe):
    scheduler = tiny_pipe.scheduler
    scheduler.set_timesteps(50)
    instrument = GaussianProcessDenoiser(scheduler)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 13, 4, 3, 5, generator=gen)
    for t in (int(scheduler.timesteps[10]), int(scheduler.timesteps[-1])):
        (v,) = instrument(hidden_states=x_t, timestep=torch.tensor([t]), return_dict=False)
        x0_hat = instrument.x0_hat(x_t, t).float()
        out = scheduler.step(v, t, x_t)
        torch.testing.assert_close(out.pred_original_sample, x0_hat, rtol=1e-4, atol=1e-5)
    # The final step goes to alpha_bar = 1: one DDIM step from there returns the posterior mean itself.
    torch.testing.assert_close(out.prev_sample, x0_hat, rtol=1e-4, atol=1e-5)
    # Bayes: E[x0 | x_t] = sqrt(a) K (a K + (1 - a) I)^-1 x_t satisfies Cov(x0 - M x_t, x_t) = 0.
    a = float(scheduler.alphas_cumprod[t])
    k, m = prior_covariance(13), posterior_mean_matrix(13, a)
    cross = math.sqrt(a) * k - m @ (a * k + (1 - a) * torch.eye(13, dtype=torch.float64))
    assert cross.abs().max() < 1e-10


def test_instrument_samples_the_prior_it_encodes(tiny_pipe):
    # Plain sampling with the exact denoiser must reproduce the prior: unit variance and the squared-exponential
    # correlation between neighbouring latents (exp(-1 / (2 l^2)) = 0.946 for l = 3), checked away from the ends.
    with installed(tiny_pipe) as instrument:
        result = generate_loop(tiny_pipe, LoopRequest(prompt="gp", num_frames=49, height=HEIGHT, width=WIDTH,
                                                      guidance_scale=1.0, shift_skip=0, seed=0),
                               output_type="latent")
    x = result.latents[0].double().flatten(1)  # (T, values)
    assert instrument.calls == 50 and instrument.frames_seen == 50 * 13
    assert abs(float(x.var()) - 1.0) < 0.1
    lag1 = float((x[3:9] * x[4:10]).mean() / (x[3:9].std() * x[4:10].std()))
    assert abs(lag1 - math.exp(-1 / (2 * LENGTH_SCALE**2))) < 0.02


def test_instrument_restores_the_real_transformer(tiny_pipe):
    before = "forward" in tiny_pipe.transformer.__dict__
    with installed(tiny_pipe):
        assert isinstance(tiny_pipe.transformer.__dict__["forward"], GaussianProcessDenoiser)
    assert ("forward" in tiny_pipe.transformer.__dict__) == before


# -- plain vs loop vs polished ---------------------------------------------------------------------------------------

def test_plain_sampling_has_a_wrap_seam_and_a_smooth_interior(bench):
    seam, interior, calls, _ = bench(13, "off", 0)
    expected = 1 / math.sqrt(1 - math.exp(-1 / (2 * LENGTH_SCALE**2)))  # independent ends vs a step: 4.3
    assert abs(seam - expected) < 0.3
    assert interior < 1.04 and calls == 50


def test_reference_loop_closes_the_wrap_but_leaves_a_hidden_seam_at_the_last_cut(bench):
    seam, interior, calls, worst = bench(13, "off")
    assert seam < SMOOTH and calls == 50
    assert interior > 1.2
    # The final step (49) saw the cycle rotated by 49 * 6 mod 13 = 8: its clip began at latent 8.
    assert worst == [(7, 8)] * len(SEEDS)


@pytest.mark.parametrize("level", ["fast", "balanced", "strong"])
def test_polish_makes_a_13_latent_loop_as_smooth_as_plain_sampling(bench, level):
    seam, interior, calls, _ = bench(13, level)
    plain_calls = bench(13, "off", 0)[2]
    assert seam < SMOOTH and interior < SMOOTH
    assert interior < bench(13, "off", 0)[1] + 0.02  # within noise of the non-looping floor
    assert calls / plain_calls == pytest.approx(polish_cost(level, 50))
    assert calls / plain_calls <= (1.25 if level != "strong" else 1.5)


@pytest.mark.parametrize("num_latents", [26, 39])
def test_polish_in_window_mode_removes_window_and_cut_seams(bench, num_latents):
    plain_seam, plain_interior, plain_calls, _ = bench(num_latents, "off", 0)
    loop_seam, loop_interior, _, _ = bench(num_latents, "off")
    seam, interior, calls, _ = bench(num_latents, "fast")
    assert plain_interior > 1.3  # windows without shift leave their edges in place
    assert loop_interior > 1.1  # the shift moves them, the final step's edges remain
    assert seam < SMOOTH and interior < SMOOTH
    assert calls / plain_calls == pytest.approx(polish_cost("fast", 50)) and calls / plain_calls <= 1.25


def test_polish_leaves_plain_sampling_alone(tiny_pipe):
    # shift_skip = 0 is ordinary (non-looping) sampling: polishing it would blend rotations of a non-cycle.
    latents = {}
    with installed(tiny_pipe):
        for level in ("off", "strong"):
            latents[level] = generate_loop(tiny_pipe, LoopRequest(prompt="gp", num_inference_steps=5, shift_skip=0,
                                                                  guidance_scale=1.0, seam_polish=level),
                                           output_type="latent").latents
    assert torch.equal(latents["off"], latents["strong"])


# -- the schedule and the blend ---------------------------------------------------------------------------------------

def test_polished_steps_are_the_final_fraction_and_at_least_the_last_one():
    fast = SEAM_POLISH_PRESETS["fast"]
    assert [s for s in range(50) if ShiftSchedule(13, 6, 50, polish=fast).polishing(s)] == [49]
    assert [s for s in range(10) if ShiftSchedule(13, 6, 10, polish=fast).polishing(s)] == [9]
    strong = ShiftSchedule(13, 6, 50, polish=SEAM_POLISH_PRESETS["strong"])
    assert [s for s in range(50) if strong.polishing(s)] == [45, 46, 47, 48, 49]
    assert strong.offsets(44) == [strong.offset(44)] and strong.feather(44) == 0.0
    assert strong.offsets(49) == [8, 11, 1, 5] and strong.feather(49) == 2.0
    assert not ShiftSchedule(13, 0, 50, polish=SEAM_POLISH_PRESETS["strong"]).polishing(49)
    assert not any(ShiftSchedule(13, 6, 50).polishing(s) for s in range(50))
    assert SeamPolish(num_offsets=1, fraction=0.1, feather=2.0).active  # feathered windows alone are a polish


def test_edge_taper_is_symmetric_positive_and_peaks_in_the_middle():
    w = edge_taper(13, 2.0)
    assert torch.equal(w, w.flip(0)) and float(w.min()) > 0 and float(w[6]) == 1.0
    assert float(w[0]) == pytest.approx((0.5 / 6.5) ** 2)
    assert torch.equal(edge_taper(6, 0.0), torch.ones(6))


class _PositionModel:
    """A fake transformer whose prediction for each frame is that frame's position in the clip it was given."""

    def __call__(self, hidden_states, return_dict=False, **kwargs):
        b, t, c, h, w = hidden_states.shape
        pos = torch.arange(t, dtype=hidden_states.dtype).view(1, t, 1, 1, 1).expand(b, t, c, h, w)
        return (pos.clone(),)


@pytest.mark.parametrize("length, window", [(13, None), (26, 13)])
def test_feathered_blend_weights_each_rotation_by_where_the_frame_sat_in_its_clip(length, window):
    schedule = ShiftSchedule(length, 5, 4, polish=SeamPolish(num_offsets=3, fraction=0.25, feather=2.0))
    denoiser = CycleDenoiser(_PositionModel(), schedule, StepState(step=3), window=window)
    (out,) = denoiser(hidden_states=torch.zeros(1, length, 1, 1, 1), return_dict=False)
    # Independent expectation: frame f sat at position (f - start) mod L of every clip that covered it.
    from loopui.engine.shift import window_starts

    starts = [0] if window is None else window_starts(length, window)
    span = length if window is None else window
    num = torch.zeros(length, dtype=torch.float64)
    den = torch.zeros(length, dtype=torch.float64)
    for offset in schedule.offsets(3):
        for start in starts:
            for p in range(span):
                f = (offset + start + p) % length
                weight = (min(p + 0.5, span - 0.5 - p) / ((span - 1) / 2 + 0.5)) ** 2
                num[f] += weight * p
                den[f] += weight
    torch.testing.assert_close(out.flatten().double(), num / den, rtol=1e-5, atol=1e-5)
    assert denoiser.model_calls == 3 * len(starts)


def test_seam_polish_knob_lists_every_level_with_its_cost():
    info = knob_info("seam_polish")
    assert tuple(info["choices"]) == SEAM_POLISH_LEVELS == tuple(SEAM_POLISH_PRESETS)
    assert info["default"] in SEAM_POLISH_LEVELS
    for level in ("fast", "balanced", "strong"):
        assert f"{level} +{round((polish_cost(level, 50) - 1) * 100)}%" in info["help"]


def test_loop_result_reports_the_hidden_seam_where_the_instrument_puts_it(tiny_pipe):
    from loopui.media import loop_metrics

    with installed(tiny_pipe):
        result = generate_loop(tiny_pipe, LoopRequest(prompt="gp", num_frames=49, height=HEIGHT, width=WIDTH,
                                                      guidance_scale=1.0, seed=0, seam_polish="off"),
                               output_type="latent")
        polished = generate_loop(tiny_pipe, LoopRequest(prompt="gp", num_frames=49, height=HEIGHT, width=WIDTH,
                                                        guidance_scale=1.0, seed=0), output_type="latent")
    assert polished.settings["seam_polish"] == "fast"  # the default
    assert polished.interior_ratio < 1.05 < result.interior_ratio
    metrics = loop_metrics(result.latents[0])
    assert result.seam_ratio == pytest.approx(metrics.seam_ratio) == pytest.approx(result.latent_seam_ratio)
    assert result.interior_ratio == pytest.approx(metrics.interior_ratio) and metrics.interior_ratio > 1.2
    assert result.latent_interior_ratio == pytest.approx(metrics.interior_ratio)
    assert result.worst_step == (7, 8) and "between frames 7 and 8" in result.describe_worst_step()
