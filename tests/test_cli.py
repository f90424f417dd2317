"""The command line end to end on a saved tiny model folder, plus its one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopui.cli import build_parser, main
from loopui.engine.request import knob_info

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "32", "--width", "48", "--steps", "2", "--frames", "49"]


def _generate(model_dir: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", "a red ball bouncing", *SMALL, *extra]


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("loopui: error: ") and "Traceback" not in captured.err
    return lines[0]


# -- end to end -----------------------------------------------------------------------------------------------------

def test_generate_writes_loop_sidecar_and_latents(tiny_model_dir, tmp_path, capsys):
    from loopui.media import read_video

    out = tmp_path / "out" / "loop.mp4"
    latents_path = tmp_path / "latents.pt"
    start = time.perf_counter()
    code = main(_generate(tiny_model_dir, "--output", str(out), "--save-latents", str(latents_path)))
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    assert code == 0, captured.err

    frames = read_video(out)
    assert frames.shape == (52, 32, 48, 3)  # 49 frames -> 13 latents -> 4 * 13 frame-invariant frames
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model"] == str(tiny_model_dir) and sidecar["seed"] == knob_info("seed")["default"]
    assert sidecar["settings"]["shift_skip"] == 6  # resolved: coprime with 13, nearest 13 / 2
    assert sidecar["settings"]["num_latent_frames"] == 13 and sidecar["num_frames_written"] == 52
    seam, interior = sidecar["seam_ratio"], sidecar["interior_ratio"]
    assert isinstance(seam, float) and seam > 0 and isinstance(interior, float)
    scores = sidecar["scores"]  # the papers' pixel metrics of the loop before encoding
    assert scores["seam_ratio"] == pytest.approx(seam) and scores["first_last_mse"] > 0 and scores["mse_f0"] is None

    import torch

    latents = torch.load(latents_path)
    assert latents.dtype == torch.float32 and tuple(latents.shape) == (1, 13, 4, 4, 6)

    stdout = captured.out.splitlines()
    assert any(line.startswith(f"wrote {out} (52 frames, 48x32") for line in stdout)
    seam_lines = [line for line in stdout if line.startswith(f"seam ratio {seam:.2f} ")]
    assert len(seam_lines) == 1 and f"interior ratio {interior:.2f} " in seam_lines[0]
    from loopui.media import format_scores

    assert f"scores: {format_scores(scores)} (`loopui score` for all)" in stdout
    assert stdout[-1].startswith("time ")
    # Measured numbers for the report (visible with pytest -s / -rA).
    print(f"[cli e2e] seam_ratio={seam:.3f} interior_ratio={interior:.3f} wall={elapsed:.1f}s", file=sys.__stderr__)


def test_model_recommendations_fill_unset_flags_only(tiny_model_dir, tmp_path):
    from loopui.cli import build_request
    from loopui.engine.plan import plan_loop
    from loopui.models import REGISTRY, spec_for

    parser = build_parser()
    five = REGISTRY["THUDM/CogVideoX-5b"]
    args = parser.parse_args(["generate", "--prompt", "waves", "-o", "x.mp4", "--rope-scale", "auto"])
    request = build_request(args, spec_for(args.model)).request
    # Left out, they stay "automatic" in the request; the engine's plan gives the model's recommendations.
    assert (request.scheduler, request.use_dynamic_cfg, request.guidance_scale, request.fps) == (None,) * 4
    plan = plan_loop(request, five)
    assert (plan.scheduler, plan.use_dynamic_cfg, plan.guidance_scale, plan.fps) == ("dpm", True, 6.0, 8)
    assert (request.height, request.width, request.rope_scale, request.shift_skip) == (480, 720, 1.0, 6)
    # Wan 2.2 A14B: left out, the guidance is the model's pair (high-noise 4, low-noise 3); given, it sets both.
    a14b = REGISTRY["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]
    args = parser.parse_args(["generate", "--model", a14b.model_id, "--prompt", "waves", "-o", "x.mp4"])
    plan = build_request(args, a14b)
    assert (plan.guidance_scale, plan.guidance_scale_2, plan.fps, plan.flow_shift) == (4.0, 3.0, 16, 12.0)
    args = parser.parse_args(["generate", "--model", a14b.model_id, "--prompt", "waves", "-o", "x.mp4",
                              "--guidance", "3.5", "--flow-shift", "8", "--fps", "12", "--scheduler", "euler"])
    plan = build_request(args, a14b)
    assert (plan.guidance_scale, plan.guidance_scale_2, plan.fps, plan.flow_shift, plan.scheduler) == \
        (3.5, 3.5, 12, 8.0, "euler")
    args = parser.parse_args(["generate", "--model", "demo", "--prompt", "waves", "-o", "x.mp4", "--scheduler",
                              "ddim", "--no-dynamic-cfg", "--guidance", "3.5", "--height", "32", "--invert-mask",
                              "--rope-scale", "1.5"])
    request = build_request(args, spec_for(args.model)).request
    assert (request.scheduler, request.use_dynamic_cfg, request.guidance_scale) == ("ddim", False, 3.5)
    assert (request.height, request.width) == (32, 96)  # width from the demo model's preview size
    assert request.motion_region == "background" and request.rope_scale == 1.5


def test_generate_help_takes_defaults_and_choices_from_loop_request():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    actions = {a.dest: a for a in generate._actions}
    assert actions["num_frames"].default == knob_info("num_frames")["default"]
    assert actions["seam_polish"].choices == knob_info("seam_polish")["choices"]
    assert actions["window_mode"].choices == knob_info("window_mode")["choices"]
    # The knob's own help, "empty = automatic" read as what a flag left out gets.
    help_text = knob_info("shift_skip")["help"].replace("%", "%%").replace("empty = ", "default: ")
    assert help_text in actions["shift_skip"].help and "empty" not in actions["guidance_scale"].help
    assert actions["scheduler"].choices == ("ddim", "dpm", "unipc", "euler", "lcm")
    assert actions["step_cache"].choices == knob_info("step_cache")["choices"] and actions["step_cache"].default == "off"
    assert actions["sigmas"].default is None and actions["sigmas"].metavar == "S1,S2,..."
    assert actions["image_channel"].choices == knob_info("image_channel")["choices"]
    assert actions["flow_shift"].default is None and actions["fps"].default is None


def test_save_latents_help_names_the_layout_of_each_family():
    """The latents are saved in the model's own layout, which differs by family: the help must not name one."""
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = " ".join(next(a for a in generate._actions if a.dest == "save_latents").help.split())
    assert "CogVideoX (B, T, C, H, W)" in text and "Wan (B, C, T, H, W)" in text


def test_no_frame_invariant_decoding_gives_the_requested_frame_count(tiny_model_dir, tmp_path, capsys):
    from loopui.media import read_video

    out = tmp_path / "plain.gif"
    code = main(_generate(tiny_model_dir, "--no-frame-invariant-decoding", "--quiet", "-o", str(out)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert read_video(out).shape[0] == 49
    assert captured.err == ""  # --quiet: no progress, no load messages


def test_module_entry_point_runs_in_a_subprocess_and_warns_once(tiny_model_dir, tmp_path):
    # 33 frames -> 9 latents; a skip of 3 shares the factor 3 with the cycle: one warning line, not two
    # (the engine both logs it and returns it).
    out = tmp_path / "sub.webp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "loopui", "generate", "--model", str(tiny_model_dir), "--prompt", "tide",
         "--height", "16", "--width", "16", "--steps", "1", "--frames", "33", "--shift-skip", "3",
         "--no-frame-invariant-decoding", "-o", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert f"wrote {out} (33 frames, 16x16" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("loopui: warning: ")]
    assert len(warnings) == 1 and "shift_skip 3" in warnings[0]


# -- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["-o", "x.avi"], "x.avi"),
    (["--frames", "3", "-o", "x.mp4"], "[--frames]"),
    (["--shift-start", "0.8", "--shift-end", "0.2", "-o", "x.mp4"], "shift_start"),
    (["--rope-scale", "wide", "-o", "x.mp4"], "'wide'"),
    (["--window", "sliding", "-o", "x.mp4"], "sliding"),
    (["--image", "{bad_image}", "-o", "x.mp4"], "bad.png"),
    (["--mask", "{missing}", "-o", "x.mp4"], "missing.png"),
    (["--prompt", "  ", "-o", "x.mp4"], "prompt is empty"),
])
def test_bad_generate_arguments_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, argv, needle):
    bad_image = tmp_path / "bad.png"
    bad_image.write_text("not an image")
    argv = [a.format(bad_image=bad_image, missing=tmp_path / "missing.png") for a in argv]
    base = ["generate", "--model", str(tiny_model_dir), *SMALL]
    if "--prompt" not in argv:
        base += ["--prompt", "x"]
    assert main(base + argv) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("argv, needle", [
    (["generate", "-o", "x.mp4"], "--prompt"),
    (["generate", "--model", "/nonexistent/model-dir", "--prompt", "x", "-o", "x.mp4"], "/nonexistent/model-dir"),
    (["generate", "--model", "someone/unknown", "--prompt", "x", "-o", "x.mp4"], "someone/unknown"),
    (["generate", "--model", "THUDM/CogVideoX-5b-I2V", "--prompt", "x", "-o", "x.mp4"], "--image"),
    (["models", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in _error_line(capsys)


def test_model_load_error_and_engine_value_error_exit_2(tiny_model_dir, tmp_path, capsys):
    import shutil

    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(_generate(broken, "-q", "-o", str(tmp_path / "a.mp4"))) == 2
    assert str(broken) in _error_line(capsys)
    # The engine's own check (skip out of range for 13 latents) surfaces the same way, after the model loaded.
    assert main(_generate(tiny_model_dir, "--shift-skip", "20", "-q", "-o", str(tmp_path / "b.mp4"))) == 2
    assert "shift_skip" in _error_line(capsys)


def test_keyboard_interrupt_exits_130(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import loopui.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loopui.engine, "render_loop", interrupted)
    assert main(_generate(tiny_model_dir, "-q", "-o", str(tmp_path / "c.mp4"))) == 130
    assert "interrupted" in _error_line(capsys)


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "THUDM/CogVideoX-5b (default)" in out and "THUDM/CogVideoX-2b" in out and "i2v" in out
    assert "loopui/tiny-random-cogvideox" in out and "720x480, 49 frames @ 8 fps" in out
    rows = {line.split()[0]: line for line in out.splitlines() if "/" in line.split(" ", 1)[0]}
    # Family, licence, fps and VRAM on one GPU / with offload, for every family.
    wan = rows["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"].split()
    assert wan[1] == "wan" and "832x480, 81 frames @ 16 fps" in rows[wan[0]]
    assert "~20 / 14 GiB" in rows[wan[0]] and wan[-1] == "Apache-2.0"
    assert "1280x704, 121 frames @ 24 fps" in rows["Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
    assert "wan (2 experts)" in rows["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]
    assert rows["THUDM/CogVideoX-5b"].split()[2] == "cogvideox" and "~26 / 16 GiB" in rows["THUDM/CogVideoX-5b"]
    assert rows["THUDM/CogVideoX-5b"].rstrip().endswith("CogVideoX license")
    assert "CogVideoX license: CogVideoX license (research; commercial use needs registration)" in out


def test_generate_on_a_faithful_wan_folder_writes_a_16_fps_loop(faithful_wan_dir, tmp_path, capsys):
    """Wan 2.1 T2V 1.3B's real configuration (shrunk): 9 frames -> L = 3 latents -> a 4·L = 12-frame MP4 at the
    model's 16 fps; --flow-shift reaches the scheduler and the sidecar."""
    from loopui.media import load_video

    out = tmp_path / "wan.mp4"
    code = main(["generate", "--model", str(faithful_wan_dir), "--prompt", "a red ball bouncing", "--frames", "9",
                 "--height", "32", "--width", "48", "--steps", "2", "--flow-shift", "4", "-q", "-o", str(out),
                 "--save-latents", str(tmp_path / "wan.pt")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frames, fps = load_video(out)
    assert frames.shape == (12, 32, 48, 3) and fps == 16
    sidecar = json.loads(out.with_suffix(".json").read_text())
    settings = sidecar["settings"]
    assert (settings["family"], settings["latent_layout"], settings["num_latent_frames"]) == \
        ("wan", "(B, C, T, H, W)", 3)
    assert (settings["fps"], settings["flow_shift"], settings["guidance_scale"], settings["use_dynamic_cfg"]) == \
        (16, 4.0, 5.0, False)
    assert settings["shift_skip"] == 1 and settings["image_channel"] is None  # inert without an image-to-video model
    assert any(line.startswith(f"wrote {out} (12 frames, 48x32, 16 fps") for line in captured.out.splitlines())
    import torch

    assert tuple(torch.load(tmp_path / "wan.pt").shape) == (1, 16, 3, 4, 6)  # Wan's (B, C, T, H, W), as --help says


def test_sigmas_and_step_cache_flags_reach_the_loop(faithful_wan_dir, tmp_path, capsys):
    """--sigmas without --steps: one step per sigma, the flow shift 1 (the sigmas are final); --step-cache and the
    distilled sampler's scheduler reach the sidecar."""
    out = tmp_path / "fast.gif"
    code = main(["generate", "--model", str(faithful_wan_dir), "--prompt", "waves", "--frames", "9", "--height",
                 "32", "--width", "48", "--sigmas", "1, 0.75, 0.5", "--scheduler", "lcm", "--guidance", "1",
                 "--step-cache", "loop", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["sigmas"], settings["num_inference_steps"], settings["flow_shift"]) == ([1.0, 0.75, 0.5], 3, 1.0)
    assert (settings["scheduler"], settings["step_cache"], settings["scheduler_class"]) == \
        ("lcm", "loop", "FlowMatchLCMScheduler")


@pytest.mark.parametrize("argv, needle", [
    (["--dynamic-cfg"], "use_dynamic_cfg applies to CogVideoX only; Wan uses a constant guidance scale: turn "
                        "dynamic CFG off [--dynamic-cfg]"),
    (["--scheduler", "ddim"], "scheduler must be one of unipc, euler, lcm for "),
    (["--sigmas", "1,0.5", "--steps", "3"], "sigmas must have one value per step: 2 given for num_inference_steps 3 "
                                            "[--sigmas]"),
    (["--sigmas", "1,0.5", "--flow-shift", "3"], "flow_shift does not apply with sigmas"),
    (["--sigmas", "0.5,1"], "sigmas must decrease from step to step, got [0.5, 1.0] [--sigmas]"),
    (["--height", "40"], "height must be a multiple of 16, got 40 [--height]"),
    (["--flow-shift", "0"], "flow_shift must be >= 0.5, got 0.0 [--flow-shift]"),
    # How the model runs, checked against this (CPU) machine before the model loads.
    (["--attention", "flash3"], "attention 'flash3' (FlashAttention 3) needs a CUDA GPU"),
    (["--attention", "cudnn"], "argument --attention: invalid choice"),
    (["--quantize", "fp8"], "quantize 'fp8' needs"),
    (["--device", "foo"], "unknown device 'foo': use cpu, cuda or cuda:N"),
    (["--device", "cuda"], "device 'cuda' requested but CUDA is not available"),
])
def test_a_knob_wan_cannot_use_is_refused_before_loading(faithful_wan_dir, tmp_path, capsys, monkeypatch, argv,
                                                         needle):
    from loopui.models import ModelManager

    monkeypatch.setattr(ModelManager, "get", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(ModelManager, "run", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["generate", "--model", str(faithful_wan_dir), "--prompt", "waves", "-o", str(tmp_path / "x.mp4"),
                 *argv])
    assert code == 2
    assert _error_line(capsys).startswith(f"loopui: error: {needle}")


def test_quantize_and_compile_flags_reach_the_model_and_the_sidecar(faithful_wan_dir, tmp_path, capsys):
    """--quantize int8 loads the model with int8 transformer weights, --compile runs its blocks compiled (said
    while it compiles); the sidecar and the summary say how the model ran."""
    out = tmp_path / "fast.gif"
    code = main(["generate", "--model", str(faithful_wan_dir), "--prompt", "waves", "--frames", "9", "--height",
                 "32", "--width", "48", "--steps", "2", "--quantize", "int8", "--compile", "--attention", "native",
                 "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["quantize"], settings["compile"], settings["attention"]) == ("int8", True, "native")
    assert "compiling the transformer blocks (first run at this size only)" in captured.err
    assert "(int8 transformer)" in captured.out and "attention native, compiled" in captured.out


# -- a clip to loop -------------------------------------------------------------------------------------------------

def test_generate_loops_a_clip_written_by_another_program(clip_files, tmp_path, capsys, counted):
    """--video: 17 frames -> L = 5 latents -> a 4·L = 20-frame MP4; the sidecar names the clip, the loop region and
    the clip's automatic init strength (0.7: --init-strength left out). Planned once, the clip read once."""
    from PIL import Image

    from loopui.media import read_video

    out = tmp_path / "clip-loop.mp4"
    Image.new("RGB", (48, 32), (200, 40, 40)).save(tmp_path / "ref.png")
    code = main(["generate", "--model", "demo", "--prompt", "a bar sliding", "--video", str(clip_files["good"]),
                 "--image", str(tmp_path / "ref.png"),
                 "--loop-region", "0.5", "--frames", "17", "--height", "32", "--width", "48", "--steps", "2",
                 "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert counted == {"plan_loop": 1, "clip_reads": 1}
    assert read_video(out).shape == (20, 32, 48, 3)
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["video"], settings["loop_region"], settings["init_strength"]) == \
        (str(clip_files["good"]), 0.5, 0.7)
    # The clip is 2.5 s; the loop (17 frames at the demo model's 8 fps) takes its first 2.12 s, and says so.
    assert "loopui: warning: video: the loop uses the clip's first 2.12 s of 2.50 s" in captured.err


def test_init_strength_left_out_stays_automatic_with_a_clip(clip_files):
    from loopui.cli import build_request
    from loopui.engine.plan import CLIP_INIT_STRENGTH
    from loopui.models import spec_for

    parser = build_parser()
    base = ["generate", "--model", "demo", "--prompt", "waves", "-o", "x.mp4"]
    spec = spec_for("demo")
    automatic = build_request(parser.parse_args(base + ["--video", str(clip_files["good"])]), spec)
    assert automatic.request.init_strength is None and automatic.init_strength == CLIP_INIT_STRENGTH
    assert build_request(parser.parse_args(base), spec).init_strength == 1.0
    given = build_request(parser.parse_args(base + ["--video", str(clip_files["good"]), "--init-strength", "0.4"]),
                          spec)
    assert given.init_strength == 0.4


@pytest.mark.parametrize("clip, needle", [
    ("text", "--video: cannot read video file '{path}'"),
    ("empty", "--video: cannot read video file '{path}'"),
    ("truncated", "--video: cannot read video file '{path}'"),
    ("missing", "--video: video file '{path}' not found"),
    ("folder", "--video: video file '{path}' is not a file"),
    ("short", "--video: the clip has 3 frames; a loop needs at least 4"),
    ("fast", "--video: frame rate 300.0 is not a usable fps (0 to 240)"),
    ("huge", "--video: video file '{path}' is over "),
])
def test_a_bad_clip_exits_2_with_one_line_before_loading(clip_files, tmp_path, capsys, monkeypatch, clip, needle):
    from loopui.media import clips
    from loopui.models import ModelManager

    monkeypatch.setattr(ModelManager, "get", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(ModelManager, "run", lambda *a, **k: pytest.fail("model loaded"))
    path = {"missing": tmp_path / "missing.mp4", "folder": tmp_path, "huge": clip_files["good"]}.get(clip) or \
        clip_files[clip]
    if clip == "huge":  # the per-frame cap (8K: a clip is budgeted by the frames it uses), lowered under 60x40
        monkeypatch.setattr(clips.read_clip, "__defaults__", (1000,))
    out = tmp_path / "x.mp4"
    code = main(["generate", "--model", "demo", "--prompt", "waves", "--video", str(path), "--frames", "17",
                 "--height", "32", "--width", "48", "-o", str(out)])
    assert code == 2
    assert _error_line(capsys).startswith(f"loopui: error: {needle.format(path=path)}")
    assert not out.exists()
