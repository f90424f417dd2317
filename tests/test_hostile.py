"""Inputs a hostile client sends (issue 17, items 10 and 12): a clip that decodes to gigabytes, a 12 s phone clip, a
1000 fps clip, a clip that cannot shape its loop, a transformer call that runs for minutes, a crowd of clients, a
server path instead of an upload, library wording in messages. Each asks little of the CPU: tiny models, few steps.
"""

from __future__ import annotations

import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from stopping import blocks_run_after_stop

SMALL = dict(prompt="a red ball", height=32, width=48, num_frames=9, guidance_scale=6.0)


def _black_1080p(path: Path, frames: int, fps: int = 30) -> Path:
    """A black 1920x1080 H.264 MP4 of ``frames`` frames, made by imageio-ffmpeg's own ffmpeg from its colour source
    (a few kB whatever the length; piping 2 GB of black frames in would take the test seconds)."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"color=c=black:s=1920x1080:r={fps}", "-frames:v", str(frames), "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)
    return path


def _count_decoded(monkeypatch) -> list:
    """Patch imageio's frame iterator to count the frames decoded (and close the real one when closed)."""
    import imageio.v3 as iio

    decoded: list = []
    real = iio.imiter

    def counting(*args, **kwargs):
        inner = real(*args, **kwargs)
        try:
            for frame in inner:
                decoded.append(1)
                yield frame
        finally:
            inner.close()

    monkeypatch.setattr(iio, "imiter", counting)
    return decoded


def _fitted_clip(request: LoopRequest):
    """The request's clip read and fitted as the loop uses it on the demo model (frames, notes)."""
    from loopui.engine import resolve_request
    from loopui.models import spec_for

    plan = resolve_request(request, spec_for("demo")).with_clip()
    return plan.clip, list(plan.clip_notes)


# -- clips: memory, length, frame rate ------------------------------------------------------------------------------

def test_a_black_1080p_clip_of_340_frames_is_read_within_what_the_loop_needs(tmp_path):
    """19 kB on disk, 2.1 GB decoded: reading it for a 49-frame 720x480 loop used to peak at ~4 GB (every frame,
    then a stacked copy); now the loop's frames plus a few source frames."""

    path = _black_1080p(tmp_path / "black.mp4", 340)
    request = LoopRequest(prompt="x", video=str(path), num_frames=49, height=480, width=720)
    tracemalloc.start()
    try:
        frames, notes = _fitted_clip(request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.shape == (49, 480, 720, 3) and frames.max() <= 16  # black (the codec's black is 16 at most)
    loop_bytes, source_frame = 49 * 480 * 720 * 3, 1920 * 1080 * 3
    assert peak < loop_bytes + 8 * source_frame, f"peak {peak / 2**20:.0f} MiB"
    assert notes == ["the loop uses the clip's first 6.12 s of 11.33 s"]


def test_a_12_s_1080p30_phone_clip_is_accepted_and_only_its_used_seconds_decoded(tmp_path, monkeypatch):
    """2.2 GB decoded, over the old 2 GiB cap although a loop uses its first seconds only."""

    path = _black_1080p(tmp_path / "phone.mp4", 360)
    decoded = _count_decoded(monkeypatch)
    frames, notes = _fitted_clip(LoopRequest(prompt="x", video=str(path), num_frames=17, height=32, width=48))
    assert frames.shape == (17, 32, 48, 3)
    assert notes == ["the loop uses the clip's first 2.12 s of 12.00 s"]
    # 17 frames at the demo model's 8 fps are 2.125 s: 64 frames at 30 fps, and one more to see the clip goes on.
    assert len(decoded) <= 66, len(decoded)


def test_the_frames_taken_are_those_of_the_whole_clip_resampled(clip_files):
    """Streaming changes what is decoded, not which frames the loop gets (long, short and slow clips alike)."""
    from loopui.media import load_video, read_clip, resample_clip

    whole, fps = load_video(clip_files["good"])  # 30 frames at 12 fps
    for num_frames, loop_fps in ((17, 8.0), (49, 8.0), (9, 24.0), (5, 60.0)):
        expected, expected_notes = resample_clip(whole, fps, num_frames, loop_fps, 48, 32)
        got, notes = read_clip(clip_files["good"], num_frames, loop_fps, 48, 32)
        np.testing.assert_array_equal(got, expected, err_msg=f"{num_frames} frames at {loop_fps} fps")
        assert notes == expected_notes


def test_a_1000_fps_clip_is_refused_in_one_line_naming_video(clip_files, tmp_path, capsys):
    """ffmpeg writes 1000 fps as "1k fps", which imageio reads as 0: the clip was taken as the loop's 8 fps."""
    from loopui.cli import main

    path = clip_files["fast1k"]
    with pytest.raises(ValueError) as info:
        _fitted_clip(LoopRequest(prompt="x", video=str(path), num_frames=17, height=32, width=48))
    assert str(info.value) == "video: frame rate 1000.0 is not a usable fps (0 to 240)"
    assert main(["generate", "--model", "demo", "--prompt", "x", "--video", str(path), "--frames", "17",
                 "--height", "32", "--width", "48", "-o", str(tmp_path / "x.mp4")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "loopui: error: --video: frame rate 1000.0 is not a usable fps (0 to 240)"]


def test_decodes_at_once_are_counted_and_bounded(clip_files, monkeypatch):
    from loopui.media import clips, read_clip

    import imageio.v3 as iio

    real = iio.imiter

    def slow(*args, **kwargs):
        for frame in real(*args, **kwargs):
            time.sleep(0.01)
            yield frame

    monkeypatch.setattr(iio, "imiter", slow)
    clips.decode_counts(reset=True)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(read_clip(clip_files["good"], 17, 8.0, 48, 32)[0]))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and all(np.array_equal(r, results[0]) for r in results)
    assert clips.decode_counts() == (0, clips.MAX_CONCURRENT_DECODES)


# -- a clip that cannot shape its loop --------------------------------------------------------------------------------

def test_a_clip_at_three_steps_is_said_to_be_unused_and_at_four_it_is_used(tiny_pipe, clip_files):
    """init_strength 0.7 skips floor(0.3 * steps) steps: none at 1-3 steps, and loop_region 1 holds nothing, so the
    loop is the one without the clip; that is said instead of "the loop uses the clip's first 1.12 s"."""
    def run(steps: int, **clip):
        return generate_loop(tiny_pipe, LoopRequest(**SMALL, num_inference_steps=steps, **clip), output_type="latent")

    clip = dict(video=str(clip_files["good"]))
    unused = run(3, **clip)
    assert torch.equal(unused.latents, run(3).latents)
    assert [w for w in unused.warnings if w.startswith("video:")] == [
        "video: init_strength 0.7 at 3 steps skips no denoising step and loop_region 1 holds nothing to it, so the "
        "clip does not shape this loop; use at least 4 steps, a lower init_strength or a loop_region below 1"]
    used = run(4, **clip)
    assert not torch.equal(used.latents, run(4).latents)
    assert not any("does not shape" in w for w in used.warnings)
    assert "video: the loop uses the clip's first 1.12 s of 2.50 s" in used.warnings


# -- Stop inside a model call, and a warning before a very costly one -------------------------------------------------

@pytest.fixture(scope="module")
def three_block_pipe():
    from loopui.models.demo import build_tiny_cogvideox

    return build_tiny_cogvideox(num_layers=3)


def test_stop_acts_between_transformer_blocks_and_the_checks_go_away(three_block_pipe):
    """Stop pressed while block 0 of the first transformer call runs: no further block runs. The old check ran only
    after each step, so a call of 16 minutes ran to its end."""
    pipe = three_block_pipe
    blocks = list(pipe.transformer.transformer_blocks)
    after_stop = blocks_run_after_stop(pipe, blocks, LoopRequest(**SMALL, num_inference_steps=2),
                                       "stopped during step 1 of 2")
    assert after_stop == []
    assert all(block._forward_pre_hooks == {} for block in blocks)  # the checks are gone again
    # Without a Stop the checks change nothing: the same loop as with no cancel event at all.
    quiet = generate_loop(pipe, LoopRequest(**SMALL, num_inference_steps=2), output_type="latent",
                          cancel_event=threading.Event())
    assert torch.equal(quiet.latents, generate_loop(pipe, LoopRequest(**SMALL, num_inference_steps=2),
                                                    output_type="latent").latents)


def test_a_request_far_beyond_the_models_own_cost_is_warned_before_it_runs(tmp_path):
    from loopui.engine.plan import plan_loop
    from loopui.models import spec_for
    from loopui.studio import Studio

    spec = spec_for("THUDM/CogVideoX-5b")
    huge = LoopRequest(prompt="x", num_frames=321, height=2048, width=2048, num_inference_steps=1)
    (warning,) = [w for w in plan_loop(huge, spec).warnings if w.startswith("cost:")]
    assert warning.startswith("cost: one step of this loop (81 latents at 2048x2048) costs about 5,718x one step at "
                              "THUDM/CogVideoX-5b's own 49 frames at 720x480")
    assert not [w for w in plan_loop(LoopRequest(prompt="x"), spec).warnings if w.startswith("cost:")]
    # The page and the API hear it with the request's notes, before anything is queued.
    studio = Studio(demo=True, has_gpu=False, output_root=tmp_path)
    resolved = studio.build_request(dict(prompt="x", num_frames=321, height=2048, width=2048,
                                         num_inference_steps=1))
    assert any(n.startswith("cost: one step of this loop (81 latents at 2048x2048)") for n in resolved.notes)


# -- messages without library wording ---------------------------------------------------------------------------------

@pytest.fixture
def bad_clips(tmp_path, clip_files) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("this is not a video")
    return {"text": clip_files["text"], "text.txt": tmp_path / "notes.txt", "empty": clip_files["empty"],
            "truncated": clip_files["truncated"]}


@pytest.mark.parametrize("case, reason", [("text", "not a video file (or it is truncated)"),
                                          ("text.txt", "not a video file (or it is truncated)"),
                                          ("empty", "the file is empty"),
                                          ("truncated", "not a video file (or it is truncated)")])
@pytest.mark.parametrize("command", ["generate", "score"])
def test_cli_video_and_score_on_a_broken_file_say_so_in_plain_words(bad_clips, tmp_path, capsys, command, case,
                                                                     reason):
    from loopui.cli import main

    path = bad_clips[case]
    argv = (["generate", "--model", "demo", "--prompt", "x", "--video", str(path), "--frames", "17", "--height",
             "32", "--width", "48", "-o", str(tmp_path / "x.mp4")] if command == "generate" else ["score", str(path)])
    assert main(argv) == 2
    prefix = "--video: " if command == "generate" else ""
    assert capsys.readouterr().err.strip().splitlines() == [
        f"loopui: error: {prefix}cannot read video file '{path}': {reason}"]


def test_the_mask_preview_without_weights_names_no_server_path_or_url(tmp_path, monkeypatch):
    import shutil

    from saliency_fixtures import use_rembg_home

    from loopui.saliency import SaliencyUnavailable
    from loopui.studio import Studio
    from loopui.studio.results import error_text

    home = use_rembg_home(monkeypatch, tmp_path / "empty-home")  # no u2netp there, downloads fail
    image = tmp_path / "koi.png"
    shutil.copy(Path(__file__).resolve().parents[1] / "assets" / "koi.png", image)
    studio = Studio(demo=True, has_gpu=False, output_root=tmp_path / "sessions")
    note = studio.masks.preview(str(image), "u2netp", 0.5, 0, 8, "object").note
    assert note.startswith("No automatic mask: u2netp is not available on this server")
    for leak in (str(home), "http", "Error", "U2NET_HOME", "/"):
        assert leak not in note, (leak, note)
    # A generation that needed the mask says the same, naming the parameter.
    cause = SaliencyUnavailable(f"mask model 'u2netp' is unavailable: weights not found at {home}/u2netp.onnx "
                                "and the download failed (ConnectionError); download https://example/u2netp.onnx")
    try:
        raise ValueError(f"background freeze needs a motion mask: {cause}") from cause
    except ValueError as exc:
        text = error_text(exc)
    assert text.startswith("mask_model: the mask model is not available on this server")
    assert str(home) not in text and "http" not in text and "ConnectionError" not in text


# -- the API: a crowd of clients, a server path instead of an upload ------------------------------------------------

@pytest.fixture(scope="module")
def small_line_app(tmp_path_factory):
    """The demo app with a short waiting line: one place running, two waiting."""
    pytest.importorskip("gradio_client")
    from served_app import demo_studio, serve

    from loopui.studio.jobs import WaitingLine

    studio = demo_studio(tmp_path_factory.mktemp("sessions"), line=WaitingLine(slots=1, capacity=2))
    with serve(studio) as demo:
        yield studio, demo.local_url


def test_clients_past_the_waiting_line_hear_busy_at_once(small_line_app, monkeypatch):
    """One running, two waiting, two more: both are told "busy" at once. Gradio's own limit used to equal the line's
    size, so the extra clients sat in Gradio's queue and never heard it."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    studio, url = small_line_app
    release = threading.Event()
    real_run = studio.manager.run

    def held_run(*args, **kwargs):  # the running loop holds its place until the test lets go
        release.wait(60)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(studio.manager, "run", held_run)
    tiny = dict(prompt="a red ball", num_frames=5, num_inference_steps=1, height=16, width=16)
    clients = [Client(url, verbose=False, download_files=False) for _ in range(5)]
    jobs = [clients[0].submit(api_name="/generate", **tiny)]
    try:
        deadline = time.monotonic() + 30
        while studio.jobs.running() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        jobs += [c.submit(api_name="/generate", **tiny) for c in clients[1:3]]
        while studio.line.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert studio.line.waiting == 2
        extra = [c.submit(api_name="/generate", **tiny) for c in clients[3:]]
        for job in extra:
            with pytest.raises(AppError, match=r"^busy: 2 loops are already waiting for the GPU \(the line is full\)"):
                job.result(timeout=20)
    finally:
        release.set()
    for job in jobs:
        assert job.result(timeout=120)[-1].startswith("Done.")


@pytest.mark.parametrize("param", ["video", "image"])
def test_a_server_path_instead_of_an_upload_is_one_line_naming_the_parameter(small_line_app, param):
    import httpx

    _, url = small_line_app
    from gradio_client import Client

    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/generate"]["parameters"]
    values = [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}} if p["parameter_name"] == param
              else "a ball" if p["parameter_name"] == "prompt"
              else p["parameter_default"] if p["parameter_has_default"] else None for p in params]
    event = httpx.post(f"{url}gradio_api/call/generate", json={"data": values}).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=60).text
    assert "event: error" in answer and "/etc/passwd" not in answer and "Cannot move" not in answer, answer
    assert f'"error": "{param}: expected an uploaded {param} file (gradio_client.handle_file(path)), got a path on ' \
           f'the server"' in answer, answer
