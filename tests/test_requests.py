"""One request resolver for the page, the API and the CLI; the whole-number rule; housekeeping; public mode; the
studio without gradio. No server here (see test_bad_inputs.py for the API end to end, test_jobs.py for the waiting
line)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loopui.engine.plan import resolve_request
from loopui.engine.request import (
    LoopRequest,
    WHOLE_NUMBER_FIELDS,
    nearest_frame_count,
    request_from_values,
    whole_number,
)
from loopui.models import REGISTRY, spec_for

FIVE_B = REGISTRY["THUDM/CogVideoX-5b"]
TWO_B = REGISTRY["THUDM/CogVideoX-2b"]


# -- the whole-number rule --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(7, 7), (7.0, 7), ("7", 7), (" 7 ", 7), ("7.0", 7), (-3, -3)])
def test_whole_numbers_are_accepted_in_any_spelling(value, expected):
    assert whole_number("seed", value) == expected


@pytest.mark.parametrize("value", [1.5, "1.5", "seven", True, float("nan"), float("inf"), None, [1]])
def test_anything_else_is_refused_by_name_never_rounded(value):
    with pytest.raises(ValueError, match=r"^seed must be a whole number"):
        whole_number("seed", value)


def test_the_rule_applies_to_every_integer_knob():
    assert set(WHOLE_NUMBER_FIELDS) == {"num_frames", "height", "width", "num_inference_steps", "seed", "shift_skip",
                                        "fps", "mask_grow", "mask_feather"}
    for name in WHOLE_NUMBER_FIELDS:
        with pytest.raises(ValueError, match=f"^{name} must be a whole number, got 2.5"):
            request_from_values({"prompt": "x", name: 2.5})
    # The CLI parses each of them with the same rule.
    from loopui.cli.common import KNOB_FLAGS, parse_whole

    assert {field for _, field, kind in KNOB_FLAGS if kind is parse_whole} == set(WHOLE_NUMBER_FIELDS)


@pytest.mark.parametrize("frames, expected", [(49, 49), (50, 49), (51, 49), (52, 53), (5, 5), (6, 5), (97, 97),
                                              (100, 101)])
def test_frame_counts_move_to_the_nearest_4n_plus_1(frames, expected):
    assert nearest_frame_count(frames, 4) == expected


def test_a_frame_count_not_of_the_form_kn_plus_1_is_moved_with_a_note():
    resolved = resolve_request(request_from_values({"prompt": "x", "num_frames": 50}), FIVE_B)
    assert resolved.request.num_frames == 49 and resolved.num_latents == 13
    assert resolved.notes == ("num_frames 50 is not of the form 4n+1: using 49",)
    assert resolve_request(LoopRequest(prompt="x", num_frames=49), FIVE_B).notes == ()


# -- automatic values: one function for page, API and CLI -------------------------------------------------------

@pytest.mark.parametrize("frames, shift, rope", [(49, 6, 1.0), (97, 12, 25 / 13), (21, 1, 1.0), (101, 11, 2.0)])
def test_automatic_shift_and_rope_follow_the_cycle_length(frames, shift, rope):
    resolved = resolve_request(LoopRequest(prompt="x", num_frames=frames), FIVE_B).request
    assert resolved.shift_skip == shift and resolved.rope_scale == pytest.approx(rope)
    assert (resolved.height, resolved.width) == (FIVE_B.native_height, FIVE_B.native_width)
    # Window mode keeps the trained table; a model without rotary embeddings has nothing to scale.
    assert resolve_request(LoopRequest(prompt="x", num_frames=frames, window_mode="window"),
                           FIVE_B).request.rope_scale == 1.0
    assert resolve_request(LoopRequest(prompt="x", num_frames=frames), TWO_B).request.rope_scale == 1.0


def test_the_model_facts_come_from_the_spec_not_from_cogvideox_constants():
    import dataclasses

    eight = dataclasses.replace(FIVE_B, temporal_compression=8, trained_latent_frames=5, native_height=64,
                                native_width=96)
    resolved = resolve_request(LoopRequest(prompt="x", num_frames=50), eight)
    assert resolved.request.num_frames == 49 and resolved.num_latents == 7  # 8n+1 counts
    assert resolved.request.rope_scale == pytest.approx(7 / 5)
    assert (resolved.request.height, resolved.request.width) == (64, 96)


def test_explicit_values_win_and_are_checked_against_the_cycle():
    resolved = resolve_request(LoopRequest(prompt="x", num_frames=97, shift_skip=5, rope_scale=1.5), FIVE_B)
    assert (resolved.request.shift_skip, resolved.request.rope_scale) == (5, 1.5)
    with pytest.raises(ValueError, match=r"^shift_skip must be in \[0, 12\] for a cycle of 13 latents"):
        resolve_request(LoopRequest(prompt="x", shift_skip=13), FIVE_B)
    with pytest.raises(ValueError, match="^rope_scale must be 1 for this model"):
        resolve_request(LoopRequest(prompt="x", rope_scale=2.0), TWO_B)
    with pytest.raises(ValueError, match="^mask_model: unknown mask model 'sam'"):
        resolve_request(LoopRequest(prompt="x", mask_model="sam"), FIVE_B)
    with pytest.raises(ValueError, match="^prompt is empty"):
        resolve_request(LoopRequest(prompt="  "), FIVE_B)


def test_auto_is_spelled_none_empty_or_auto():
    for spelling in (None, "", "auto", " AUTO "):
        request = request_from_values({"prompt": "x", "num_frames": 97, "rope_scale": spelling,
                                       "shift_skip": spelling, "height": spelling})
        assert (request.rope_scale, request.shift_skip, request.height) == (None, None, None)
    with pytest.raises(ValueError, match="^unknown setting 'steps'"):
        request_from_values({"prompt": "x", "steps": 4})


def test_page_api_and_cli_compute_the_same_loop(tmp_path):
    """97 frames on CogVideoX-5b with shift and RoPE left automatic: shift 12 and RoPE 25/13 on every path."""
    from loopui.cli import build_parser, build_request
    from loopui.studio import Studio
    from loopui.ui.updates import rope_update, shift_update

    studio = Studio(model_id="THUDM/CogVideoX-5b", has_gpu=True, output_root=tmp_path, manager=object())
    base = {"prompt": "waves", "num_frames": 97, "window_mode": "full"}
    api = studio.build_request({**base}, "THUDM/CogVideoX-5b").request
    # The page sends what its sliders show after a loop-length change.
    shown = {**base, "shift_skip": shift_update("THUDM/CogVideoX-5b", 97)["value"],
             "rope_scale": rope_update("THUDM/CogVideoX-5b", 97, "full")["value"]}
    page = studio.build_request(studio.page_values(shown, "THUDM/CogVideoX-5b"), "THUDM/CogVideoX-5b").request
    args = build_parser().parse_args(["generate", "--prompt", "waves", "--frames", "97", "-o", "x.mp4"])
    cli = build_request(args, spec_for(args.model)).request
    for request in (api, page, cli):
        assert request.shift_skip == 12 and request.rope_scale == pytest.approx(25 / 13)
    assert shown["rope_scale"] == 1.92  # the slider's rounded value was not taken literally


# -- housekeeping -----------------------------------------------------------------------------------------------

def _file(path, size: int, age_s: float, now: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_sweep_deletes_old_files_then_the_oldest_beyond_the_size_cap(tmp_path):
    from loopui.studio.files import sweep_folder

    now = time.time()
    old = _file(tmp_path / "a" / "old.mp4", 10, 7200, now)
    older_young = _file(tmp_path / "b" / "1.mp4", 400, 300, now)
    young = _file(tmp_path / "b" / "2.mp4", 400, 200, now)
    newest = _file(tmp_path / "c" / "3.mp4", 400, 100, now)
    os.utime(tmp_path / "a", (now - 7200, now - 7200))
    assert sweep_folder(tmp_path, max_age_s=3600, max_bytes=1000, now=now) == 2
    assert not old.exists() and not older_young.exists()  # too old; then the oldest until 800 <= 1000
    assert young.exists() and newest.exists()
    assert not (tmp_path / "a").exists()  # an old, empty session folder goes too
    assert sweep_folder(tmp_path, max_age_s=3600, max_bytes=1000, now=now) == 0


def test_studio_sweeps_outputs_when_a_job_starts(tmp_path):
    from loopui.studio import Studio

    studio = Studio(demo=True, has_gpu=False, output_root=tmp_path, max_output_age_s=60, manager=object())
    stale = _file(tmp_path / "gone-session" / "loop-001.mp4", 10, 3600, time.time())
    studio.manager = _FailingManager()
    job = studio.start("s", studio.model_id, studio.build_request(dict(prompt="x")))
    assert job.join(10)
    assert not stale.exists()
    with pytest.raises(ValueError, match="must be positive"):
        Studio(demo=True, has_gpu=False, output_root=tmp_path, max_output_bytes=0, manager=object())


class _FailingManager:
    def get(self, *args, **kwargs):
        raise RuntimeError("no model in this test")


def test_the_studio_service_runs_without_gradio(tmp_path):
    """``loopui.studio`` is the app's service without the page: importing it and making a studio with its knobs,
    requests and session files loads no gradio (only ``loopui.ui`` may)."""
    code = ("import sys\n"
            "from loopui.studio import Studio\n"
            f"studio = Studio(demo=True, has_gpu=False, output_root={str(tmp_path)!r}, manager=object())\n"
            "studio.knobs.model_view(studio.model_id)\n"
            "studio.build_request({'prompt': 'x'})\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'gradio'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- public mode ------------------------------------------------------------------------------------------------

def test_public_mode_caps_requests_and_refuses_folders(tmp_path, tiny_model_dir):
    from loopui.studio import Studio
    from loopui.studio.requests import PUBLIC_LIMITS

    with pytest.raises(ValueError, match="public mode serves registry models only"):
        Studio(model_id=str(tiny_model_dir), public=True, has_gpu=False, output_root=tmp_path, manager=object())
    studio = Studio(demo=True, public=True, has_gpu=False, output_root=tmp_path, manager=object())
    ok = {"prompt": "x", "num_frames": 49, "num_inference_steps": 50, "height": 480, "width": 720}
    assert studio.build_request(ok).request.num_inference_steps == 50
    for change, message in [({"num_inference_steps": 51}, "num_inference_steps must be <= 50 on this public"),
                            ({"num_frames": 125}, "num_frames must be <= 121 on this public"),
                            ({"height": 720, "width": 720}, r"height x width must be at most 399360 pixels"),
                            ({"prompt": "x" * 2001}, "prompt must be at most 2000 characters")]:
        with pytest.raises(ValueError, match=message):
            studio.build_request({**ok, **change})
    assert PUBLIC_LIMITS["pixels"] == 480 * 832  # Wan 2.1 1.3B's native size fits
    private = Studio(demo=True, has_gpu=False, output_root=tmp_path, manager=object())
    assert private.build_request({**ok, "num_inference_steps": 200}).request.num_inference_steps == 200


def test_how_the_model_runs_is_checked_before_the_line_and_locked_on_a_public_server(tmp_path):
    """attention, compile and quantize from page or API values: a kernel or quantization this server cannot run
    is one line naming it before anything is queued; a public server keeps compilation and quantization its own
    (another value would compile or load the model again for everyone); the page's compile dropdown reads
    auto / on / off."""
    from loopui.studio import Studio

    ok = {"prompt": "x", "num_frames": 9, "height": 32, "width": 48}
    private = Studio(demo=True, has_gpu=False, output_root=tmp_path, manager=object())
    plan = private.build_request({**ok, "attention": "native", "compile": True, "quantize": "int8"})
    assert (plan.request.attention, plan.request.compile, plan.request.quantize) == ("native", True, "int8")
    for change, message in [({"attention": "sage"}, "attention 'sage'"), ({"quantize": "fp8"}, "quantize 'fp8'"),
                            ({"attention": "flash4"}, "attention must be one of auto, native")]:
        with pytest.raises(ValueError, match=message):
            private.build_request({**ok, **change})
    assert private.page_values({**ok, "compile": "off"}, private.model_id)["compile"] is False
    assert private.page_values({**ok, "compile": "auto"}, private.model_id)["compile"] is None
    public = Studio(demo=True, public=True, has_gpu=False, output_root=tmp_path / "p", manager=object())
    assert public.build_request({**ok, "attention": "native", "quantize": "auto"}).request.quantize is None
    for change, message in [({"compile": True}, "compile: this public server"),
                            ({"compile": False}, "compile: this public server"),
                            ({"quantize": "int8"}, "quantize: this public server")]:
        with pytest.raises(ValueError, match=message):
            public.build_request({**ok, **change})
    # A public server that compiles keeps its own kernel: another one would compile again for everyone.
    import loopui.studio.requests as requests_module

    wan = Studio(model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", public=True, has_gpu=False,
                 output_root=tmp_path / "w", manager=object())
    wan.knobs.runtime = {"attention": "sage", "compile": True, "quantize": "none"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requests_module, "check_runtime", lambda request, device: "none")  # as on its GPU
        assert wan.build_request({**ok, "attention": "sage"}).request.attention == "sage"
        with pytest.raises(ValueError, match=r"attention: this public server compiles its model for its own kernel "
                                             r"\(sage\)"):
            wan.build_request({**ok, "attention": "flash"})


def test_the_page_offers_the_kernels_a_model_can_use_and_says_what_auto_is_here(tmp_path, monkeypatch):
    """CogVideoX's attention does not dispatch: the page offers auto and native only, with the engine's reason;
    a Wan model offers every kernel and says what auto means on this server. A bad server setting stops the
    server at start, in one line naming it."""
    from loopui.studio import Studio

    studio = Studio(demo=True, has_gpu=False, output_root=tmp_path, manager=object())
    cog = studio.knobs.model_view("THUDM/CogVideoX-5b")
    assert cog.attentions == ["auto", "native"] and "PyTorch's own kernel only" in cog.attention_note
    wan = studio.knobs.model_view("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert wan.attentions == ["auto", "native", "flash", "flash3", "sage", "xformers"]
    assert wan.attention_note.endswith("Here auto = native.")
    assert studio.knobs.runtime == {"attention": "native", "compile": False, "quantize": "none"}
    monkeypatch.setenv("LOOPUI_COMPILE", "1")
    assert Studio(demo=True, has_gpu=False, output_root=tmp_path, manager=object()).knobs.runtime["compile"] is True
    for variable, value in [("LOOPUI_ATTENTION", "flash9"), ("LOOPUI_COMPILE", "maybe"), ("LOOPUI_QUANTIZE", "int4")]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=variable):
            Studio(demo=True, has_gpu=False, output_root=tmp_path, manager=object())
        monkeypatch.delenv(variable)


def test_public_mode_is_on_by_default_on_a_space(monkeypatch):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.parse_args([]).public is False and app.parse_args(["--public"]).public is True
    monkeypatch.setenv("SPACE_ID", "someone/loopui")
    assert app.parse_args([]).public is True and app.parse_args(["--no-public"]).public is False
    monkeypatch.setenv("LOOPUI_KEEP_HOURS", "6")
    args = app.parse_args(["--keep-gb", "0.5"])
    assert (args.keep_hours, args.keep_gb) == (6.0, 0.5)


def test_a_busy_port_is_one_line_naming_the_flag(capsys):
    import socket

    import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert app.main(["--demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loopui: error: port {port} is busy: use --port (for example --port {port + 1})"]


# -- a mask the user gives always wins --------------------------------------------------------------------------

def test_an_all_black_mask_with_background_freeze_makes_a_still_without_saliency_weights(tiny_pipe, monkeypatch,
                                                                                           tmp_path):
    """"Nothing moves" is a valid request: the all-black mask is used as given (it used to be replaced by the
    computed mask, and without saliency weights the error asked for a mask although one was given)."""
    import numpy as np
    import torch

    from loopui.engine import generate_loop
    from saliency_fixtures import red_square_image, use_rembg_home

    use_rembg_home(monkeypatch, tmp_path / "no-weights")  # no u2netp; a download attempt would fail
    image = red_square_image((96, 64))
    still = generate_loop(tiny_pipe, LoopRequest(prompt="x", height=32, width=48, num_inference_steps=2, seed=3,
                                                 image=image, mask=np.zeros((32, 48), np.uint8),
                                                 anchor_strength=0.0, background_freeze=1.0),
                          output_type="latent")
    latents = still.latents[0]  # (T, C, h, w)
    for t in range(1, latents.shape[0]):
        torch.testing.assert_close(latents[t], latents[0], rtol=0, atol=1e-5)
    moving = generate_loop(tiny_pipe, LoopRequest(prompt="x", height=32, width=48, num_inference_steps=2, seed=3,
                                                  image=image, mask=np.full((32, 48), 255, np.uint8),
                                                  anchor_strength=0.0, background_freeze=1.0),
                           output_type="latent")
    assert not torch.allclose(moving.latents[0, 1], moving.latents[0, 0], atol=1e-3)
