"""The loop sampler on tiny CogVideoX pipelines: roll semantics, reference trajectory, windows, RoPE, decoding."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from loopui.engine import LoopInterrupted, LoopRequest, default_shift_skip, generate_loop, latent_length
from loopui.engine.decode import decoded_frame_count
from loopui.engine.families.cogvideox import scaled_rope_preparer, temporal_rope_dim
from loopui.engine.plan import resolve_shift_skip
from loopui.engine.rope import ntk_theta
from loopui.engine.shift import SeamPolish, ShiftSchedule, window_indices, window_starts

SMALL = dict(prompt="a paper boat on waves", height=32, width=48, num_inference_steps=4,
             seam_polish="off")  # the papers' exact trajectory (polish has its own tests)


class Recorder:
    """A fake transformer forward: records what it sees and answers ``x + marker(position)``.

    The marker makes every cycle position distinguishable, so a wrong roll-back shows in the scheduler's input.
    """

    def __init__(self, length: int) -> None:
        self.inputs: list[torch.Tensor] = []
        self.rotary_rows: list[int] = []
        self.marker = torch.arange(length, dtype=torch.float32).view(1, length, 1, 1, 1) * 0.01

    def __call__(self, hidden_states, encoder_hidden_states=None, timestep=None, image_rotary_emb=None,
                 attention_kwargs=None, return_dict=True, **kwargs):
        self.inputs.append(hidden_states.detach().clone())
        self.rotary_rows.append(None if image_rotary_emb is None else image_rotary_emb[0].shape[0])
        channels = 4
        t = hidden_states.shape[1]
        out = hidden_states[:, :, :channels] * 0.5 + self.marker[:, :t].to(hidden_states.dtype)
        return (out,)


class SchedulerSpy:
    """Records the (model_output, sample) pairs the scheduler receives at each step."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._step = scheduler.step

    def __enter__(self):
        def step(model_output, timestep, sample, *args, **kwargs):
            self.calls.append((model_output.detach().clone(), sample.detach().clone()))
            return self._step(model_output, timestep, sample, *args, **kwargs)

        self.scheduler.step = step
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step


@pytest.fixture
def recorder(tiny_pipe):
    rec = Recorder(13)
    tiny_pipe.transformer.forward = rec
    yield rec
    del tiny_pipe.transformer.forward


# -- defaults and schedule ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, expected", [(13, 6), (26, 11), (39, 19), (4, 1), (1, 0), (2, 1), (9, 4), (10, 3)])
def test_default_shift_skip_is_coprime_and_near_half(length, expected):
    k = default_shift_skip(length)
    assert k == expected
    if length > 1:
        assert math.gcd(k, length) == 1


def test_gcd_warning_names_the_factor():
    skip, warnings = resolve_shift_skip(LoopRequest(prompt="x", num_frames=49, shift_skip=4), 12)
    assert skip == 4 and warnings and "factor 4" in warnings[0]
    assert resolve_shift_skip(LoopRequest(prompt="x", shift_skip=6), 13)[1] == []
    with pytest.raises(ValueError, match="shift_skip"):
        resolve_shift_skip(LoopRequest(prompt="x", shift_skip=13), 13)


def test_offsets_follow_i_times_k_mod_l_inside_the_window():
    schedule = ShiftSchedule(length=13, skip=6, num_steps=10, start=0.2, end=0.8)
    assert [schedule.offset(i) for i in range(10)] == [0, 0, 12, 5, 11, 4, 10, 3, 0, 0]
    full = ShiftSchedule(length=13, skip=6, num_steps=50)
    assert [full.offset(i) for i in range(4)] == [0, 6, 12, 5]
    # Over 13 consecutive steps a coprime skip visits every offset exactly once.
    assert sorted(full.offset(i) for i in range(13)) == list(range(13))


def test_seam_polish_offsets_are_evenly_spaced_in_the_final_steps():
    polish = SeamPolish(num_offsets=3, fraction=0.2)
    schedule = ShiftSchedule(length=12, skip=5, num_steps=10, polish=polish)
    assert schedule.offsets(7) == [schedule.offset(7)]
    o = schedule.offset(8)
    assert schedule.offsets(8) == [o, (o + 4) % 12, (o + 8) % 12]
    spread = ShiftSchedule(length=12, skip=5, num_steps=10, polish=SeamPolish(3, 0.2, spread=True))
    assert len(spread.offsets(8)) == 1 and len(spread.offsets(9)) == 1


# -- roll semantics with a recording fake transformer -----------------------------------------------------------------

def test_model_sees_rotated_cycle_and_scheduler_gets_prediction_rotated_back(tiny_pipe, recorder):
    steps = 5
    with SchedulerSpy(tiny_pipe.scheduler) as spy:
        generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": steps}, guidance_scale=6.0),
                      output_type="latent")
    assert len(recorder.inputs) == steps == len(spy.calls)
    for i, (seen, (pred, sample)) in enumerate(zip(recorder.inputs, spy.calls)):
        offset = (i * 6) % 13
        # CFG: both halves are the same latents, rotated left by the offset (latent `offset` first).
        assert seen.shape[0] == 2
        expected_in = torch.roll(torch.cat([sample] * 2), shifts=-offset, dims=1)
        torch.testing.assert_close(seen, expected_in.to(seen.dtype), rtol=0, atol=0)
        assert torch.equal(seen[:, 0], sample[:, offset].expand_as(seen[:, 0]).to(seen.dtype))
        # The fake answers x/2 + marker(position); rotated back, latent j carries marker((j - offset) mod L).
        marker = torch.roll(recorder.marker, shifts=offset, dims=1)
        torch.testing.assert_close(pred, sample * 0.5 + marker, rtol=1e-6, atol=1e-6)


def test_shift_window_limits_rotation_to_its_steps(tiny_pipe, recorder):
    with SchedulerSpy(tiny_pipe.scheduler) as spy:
        generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 6}, shift_start=0.5, shift_end=1.0),
                      output_type="latent")
    for i, (seen, (_, sample)) in enumerate(zip(recorder.inputs, spy.calls)):
        offset = (i * 6) % 13 if i >= 3 else 0
        assert torch.equal(seen[:1], torch.roll(sample, shifts=-offset, dims=1).to(seen.dtype)), i


def test_skip_zero_is_exactly_the_stock_pipeline(tiny_pipe):
    stock = tiny_pipe(prompt=SMALL["prompt"], height=32, width=48, num_frames=49, num_inference_steps=4,
                      guidance_scale=6.0, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    loop = generate_loop(tiny_pipe, LoopRequest(**SMALL, seed=7, shift_skip=0), output_type="latent")
    assert torch.equal(stock.float(), loop.latents)


def _reference_mobius(pipe, prompt: str, steps: int, seed: int, skip: int, guidance: float = 6.0) -> torch.Tensor:
    """The authors' algorithm written out independently: roll in, predict, roll out, step; offset from 0."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = pipe.encode_prompt(prompt, None, do_classifier_free_guidance=True, device=device)
    embeds = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(steps, device=device)
    latents = torch.randn((1, 13, 4, 4, 6), generator=generator) * pipe.scheduler.init_noise_sigma
    rotary = pipe._prepare_rotary_positional_embeddings(32, 48, 13, device)
    offset = 0
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            rolled = torch.cat([latents[:, offset:], latents[:, :offset]], dim=1)
            model_in = torch.cat([rolled] * 2)
            out = pipe.transformer(hidden_states=model_in, encoder_hidden_states=embeds, timestep=t.expand(2),
                                   image_rotary_emb=rotary, return_dict=False)[0].float()
            u, c = out.chunk(2)
            pred = u + guidance * (c - u)
            pred = torch.cat([pred[:, 13 - offset:], pred[:, :13 - offset]], dim=1)
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
            offset = (offset + skip) % 13
    return latents


def test_default_trajectory_equals_reference_algorithm(tiny_pipe):
    result = generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 6}, seed=3),
                           output_type="latent")
    assert result.settings["shift_skip"] == 6
    reference = _reference_mobius(tiny_pipe, SMALL["prompt"], steps=6, seed=3, skip=6)
    torch.testing.assert_close(result.latents, reference.float(), rtol=1e-5, atol=1e-5)


def test_pipeline_is_left_stock_after_a_loop_and_after_an_error(tiny_pipe):
    scheduler = tiny_pipe.scheduler
    generate_loop(tiny_pipe, LoopRequest(**SMALL, scheduler="dpm", rope_scale=2.0), output_type="latent")
    assert "forward" not in tiny_pipe.transformer.__dict__
    assert "_prepare_rotary_positional_embeddings" not in tiny_pipe.__dict__
    assert tiny_pipe.scheduler is scheduler
    with pytest.raises(ValueError):
        generate_loop(tiny_pipe, LoopRequest(**SMALL, shift_skip=20))
    assert "forward" not in tiny_pipe.transformer.__dict__


def test_named_scheduler_is_used_with_trailing_spacing(tiny_pipe):
    result = generate_loop(tiny_pipe, LoopRequest(**SMALL, scheduler="dpm"), output_type="latent")
    assert result.settings["scheduler_class"] == "CogVideoXDPMScheduler"
    assert torch.isfinite(result.latents).all()


# -- RoPE-Interp ------------------------------------------------------------------------------------------------------

def test_ntk_formula():
    assert ntk_theta(10000, 1.0, 16) == 10000
    assert ntk_theta(10000, 2.0, 16) == pytest.approx(10000 * 2 ** (16 / 14))
    assert ntk_theta(10000, 3.0, 4) == pytest.approx(10000 * 9)
    with pytest.raises(ValueError):
        ntk_theta(10000, 0.5, 16)


def test_rope_scale_one_is_bit_identical_and_scaling_touches_time_only(tiny_pipe):
    stock = tiny_pipe._prepare_rotary_positional_embeddings(32, 48, 26, torch.device("cpu"))
    same = scaled_rope_preparer(tiny_pipe, 1.0)(32, 48, 26, torch.device("cpu"))
    assert torch.equal(stock[0], same[0]) and torch.equal(stock[1], same[1])

    head_dim = tiny_pipe.transformer.config.attention_head_dim
    d_t = temporal_rope_dim(head_dim)
    cos, sin = scaled_rope_preparer(tiny_pipe, 2.0)(32, 48, 26, torch.device("cpu"))
    assert torch.equal(cos[:, d_t:], stock[0][:, d_t:]) and torch.equal(sin[:, d_t:], stock[1][:, d_t:])
    theta = 10000 * 2.0 ** (d_t / (d_t - 2))
    freqs = 1.0 / theta ** (torch.arange(0, d_t, 2, dtype=torch.float64) / d_t)
    positions = torch.arange(26, dtype=torch.float64)
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=1)  # (T, d_t), interleaved like diffusers
    rows_per_frame = cos.shape[0] // 26
    torch.testing.assert_close(cos.view(26, rows_per_frame, -1)[:, 0, :d_t], angles.cos().float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.view(26, rows_per_frame, -1)[:, 5, :d_t], angles.sin().float(), rtol=0, atol=1e-5)
    # The stock table uses the unscaled base for time: scaling changed it.
    assert not torch.allclose(cos[:, :d_t], stock[0][:, :d_t])


def test_auto_rope_scale_is_length_over_trained_in_full_mode(tiny_pipe):
    result = generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 2}, num_frames=101),
                           output_type="latent")
    assert result.latents.shape[1] == 26 and result.settings["rope_scale"] == pytest.approx(2.0)
    windowed = generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 2}, num_frames=101,
                                                    window_mode="window"), output_type="latent")
    assert windowed.settings["rope_scale"] == 1.0


def test_rope_scale_rejected_without_rotary_embeddings():
    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox(use_rotary=False)
    with pytest.raises(ValueError, match="rotary"):
        generate_loop(pipe, LoopRequest(**SMALL, rope_scale=2.0), output_type="latent")
    assert generate_loop(pipe, LoopRequest(**SMALL, rope_scale=1.0), output_type="latent").latents.shape[1] == 13


# -- windows ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [13, 14, 20, 26, 27, 39, 52, 60])
def test_windows_cover_every_latent_and_wrap(length):
    windows = window_indices(length, 13)
    covered = torch.zeros(length, dtype=torch.long)
    for idx in windows:
        assert len(idx) == min(13, length)
        covered[idx] += 1
        # consecutive positions modulo L: the window wraps around the end of the cycle
        assert all((int(b) - int(a)) % length == 1 for a, b in zip(idx[:-1], idx[1:]))
    assert (covered >= 1).all()
    if length > 13:
        assert (covered >= 2).sum() > 0, "neighbouring windows overlap"
        starts = window_starts(length, 13)
        gaps = [(b - a) % length for a, b in zip(starts, starts[1:] + starts[:1])]
        assert max(gaps) <= 13 - 13 // 2


def test_window_mode_feeds_the_model_trained_length_windows(tiny_pipe):
    rec = Recorder(26)
    tiny_pipe.transformer.forward = rec
    try:
        result = generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 2}, num_frames=101,
                                                      window_mode="window"), output_type="latent")
    finally:
        del tiny_pipe.transformer.forward
    per_step = len(window_starts(26, 13))
    assert len(rec.inputs) == 2 * per_step == result.settings["model_calls"]
    assert {x.shape[1] for x in rec.inputs} == {13}
    rows_full = tiny_pipe._prepare_rotary_positional_embeddings(32, 48, 26, torch.device("cpu"))[0].shape[0]
    assert set(rec.rotary_rows) == {rows_full // 2}


# -- decoding ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_frames, invariant, expected", [(49, True, 52), (49, False, 49), (25, True, 28),
                                                            (25, False, 25)])
def test_frame_counts(tiny_pipe, num_frames, invariant, expected):
    assert decoded_frame_count(latent_length(num_frames), 4, invariant) == expected
    result = generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 2}, num_frames=num_frames,
                                                  frame_invariant_decoding=invariant))
    assert result.frames.shape == (expected, 32, 48, 3) and result.frames.dtype.name == "uint8"
    assert result.settings["num_output_frames"] == expected


def test_frame_invariant_decoding_decodes_each_latent_as_a_non_first_latent(tiny_pipe):
    from loopui.engine.decode import decode_cycle

    latents = torch.randn(1, 5, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    rolled = torch.roll(latents, shifts=2, dims=1)
    with torch.no_grad():
        a = decode_cycle(tiny_pipe, latents)
        b = decode_cycle(tiny_pipe, rolled)
    assert a.shape[2] == b.shape[2] == 20
    # Rotating the cycle by two latents rotates the decoded loop by 8 frames (up to the VAE's limited context).
    err_rot = (torch.roll(a, shifts=8, dims=2) - b).abs().mean()
    err_plain = (a - b).abs().mean()
    assert err_rot < 0.5 * err_plain


# -- inputs, progress, cancel -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(prompt="  "), "prompt"), (dict(num_frames=3), "num_frames"), (dict(height=30), "multiple of 16"),
    (dict(guidance_scale=float("nan")), "finite"), (dict(window_mode="tiles"), "window_mode"),
    (dict(shift_start=0.8, shift_end=0.2), "shift_start"), (dict(seam_polish="max"), "seam_polish"),
])
def test_bad_requests_raise_clear_errors(tiny_pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        generate_loop(tiny_pipe, LoopRequest(**{**SMALL, **bad}))


def test_progress_and_cancel_within_one_step(tiny_pipe):
    events = []
    stop = threading.Event()

    def progress(stage, step, total):
        events.append((stage, step, total))
        if stage == "denoise" and step == 2:
            stop.set()

    with pytest.raises(LoopInterrupted, match="2 of 10"):
        generate_loop(tiny_pipe, LoopRequest(**{**SMALL, "num_inference_steps": 10}), callback=progress,
                      cancel_event=stop)
    assert [e for e in events if e[0] == "denoise"] == [("denoise", 1, 10), ("denoise", 2, 10)]
    assert "forward" not in tiny_pipe.transformer.__dict__
    # The pipeline is usable again right away.
    assert generate_loop(tiny_pipe, LoopRequest(**SMALL), output_type="latent").latents.shape[1] == 13


def test_loop_result_reports_metrics_and_timings(tiny_pipe):
    result = generate_loop(tiny_pipe, LoopRequest(**SMALL))
    assert result.seam_ratio is not None and result.seam_ratio > 0
    assert result.interior_ratio is not None and result.interior_ratio >= 1.0
    a, b = result.worst_step
    assert b == a + 1 and 0 <= a < 51
    assert "largest jump between frames" in result.describe_worst_step()
    assert set(result.timings) >= {"denoise", "decode", "total"}
    assert result.settings["num_latent_frames"] == 13 and result.settings["trained_latent_frames"] == 13
