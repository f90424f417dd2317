"""A stranger's inputs: every bad one is answered by one line naming the parameter, and the next good call works.

The API half drives a launched demo app with gradio_client; the CLI half calls ``loopui.cli.main``. Then: eight
concurrent clients get eight unmixed results, a full line answers "busy", a queued job can be stopped, a model
whose weights cannot be fetched fails with a complete message, and files are served only from the allowlist.
Everything runs the tiny demo model at 16x16 pixels and one step, so the suite adds well under two minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from served_app import demo_studio, serve

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
TINY = dict(prompt="a red ball", num_frames=5, num_inference_steps=1, height=16, width=16)
WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
BAD_INPUTS_TRIED: list[str] = []  # every distinct bad input of this module, for the count below


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip_files) -> dict[str, Path]:
    """Bad uploads made in code: empty, text, truncated, too many pixels; and a good small image. The clips
    (``clip_*``) are conftest's: a good one and bad ones, written by imageio-ffmpeg."""
    folder = tmp_path_factory.mktemp("uploads")
    good = folder / "good.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(good)
    data = good.read_bytes()
    out = {"good": good, "empty": folder / "empty.png", "text": folder / "notes.png",
           "truncated": folder / "cut.png", "huge": folder / "huge.png"}
    out["empty"].write_bytes(b"")
    out["text"].write_text("this is not an image")
    out["truncated"].write_bytes(data[: len(data) // 2])
    Image.new("1", (9000, 8000)).save(out["huge"])  # 72 megapixels in a few kB: over the 64 MP cap
    out.update({f"clip_{name}": path for name, path in clip_files.items()})
    # LoRAs: one for the demo model, one for a Wan model, a file that is no safetensors file
    from loopui.models.demo import build_tiny_cogvideox
    from loopui.testing.lora_files import write_lora
    from tiny_wan import build_tiny_wan

    out["lora_good"] = write_lora(build_tiny_cogvideox().transformer, folder / "good.safetensors")
    out["lora_wan"] = write_lora(build_tiny_wan().transformer, folder / "wan.safetensors", "kohya")
    out["lora_broken"] = folder / "broken.safetensors"
    out["lora_broken"].write_bytes(b"not a safetensors header")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(studio, url): the demo app on a free port, rembg pointed at a tiny u2netp."""
    studio = demo_studio(tmp_path_factory.mktemp("sessions"))
    with serve(studio, tmp_path_factory.mktemp("rembg-home")) as demo:
        yield studio, demo.local_url


def _client(url: str) -> Client:
    # Results stay where the server wrote them (the same machine): no downloads, half the time of a call.
    return Client(url, verbose=False, download_files=False)


def _path(file) -> Path:
    return Path(file["path"] if isinstance(file, dict) else file)


@pytest.fixture(scope="module")
def client(served) -> Client:
    return _client(served[1])


def _good_call(client: Client) -> None:
    video, _seam, _strip, _files, status = client.predict(api_name="/generate", **TINY)
    assert status.startswith("Done.") and _path(video).is_file()


def _one_line(text: str) -> str:
    assert "\n" not in text and "Traceback" not in text, text
    assert "/tmp/" not in text and "preprocess" not in text.lower(), text  # no server paths, no Gradio internals
    return text


# -- the API ----------------------------------------------------------------------------------------------------

API_CASES = [
    # (id, /generate arguments over TINY, the start of the one-line answer)
    ("empty prompt", dict(prompt="   "), "prompt is empty"),
    ("negative seed", dict(seed=-1), "seed must be >= 0, got -1"),
    ("seed too large", dict(seed=2**32), "seed must be <= 4294967295"),
    ("fractional seed", dict(seed=1.5), "seed must be a whole number, got 1.5"),
    ("seed as words", dict(seed="forty-two"), "seed must be a whole number"),
    ("seed null", dict(seed=None), "seed must be a whole number, got None"),
    ("negative shift", dict(shift_skip=-1), "shift_skip must be >= 0, got -1"),
    ("shift beyond the cycle", dict(num_frames=49, shift_skip=13), "shift_skip must be in [0, 12]"),
    ("too few frames", dict(num_frames=3), "num_frames must be >= 5"),
    ("too many frames", dict(num_frames=1000), "num_frames must be <= 321"),
    ("fractional frames", dict(num_frames=20.5), "num_frames must be a whole number"),
    ("zero steps", dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    ("fractional steps", dict(num_inference_steps=2.5), "num_inference_steps must be a whole number"),
    ("height not a multiple of 16", dict(height=50), "height must be a multiple of 16"),
    ("width zero", dict(width=0), "width must be >= 16"),
    ("width too large", dict(width=4096), "width must be <= 2048"),
    ("guidance below 1", dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
    ("guidance as words", dict(guidance_scale="high"), "guidance_scale must be a number"),
    ("rope below 1", dict(rope_scale=0.5), "rope_scale must be >= 1"),
    ("rope as words", dict(rope_scale="wide"), "rope_scale must be a number"),
    ("rope on a model without rotary", dict(model="THUDM/CogVideoX-2b", rope_scale=2), "rope_scale must be 1"),
    ("shift start after end", dict(shift_start=0.8, shift_end=0.2), "shift_start must not exceed shift_end"),
    ("shift end above 1", dict(shift_end=1.5), "shift_end must be <= 1"),
    ("unknown window mode", dict(window_mode="sliding"), "window_mode must be one of full, window"),
    ("unknown scheduler", dict(scheduler="lms"), "scheduler must be one of ddim, dpm, unipc, euler, lcm; got 'lms'"),
    ("a Wan scheduler on CogVideoX", dict(scheduler="euler"), "scheduler must be one of ddim, dpm for "),
    ("a CogVideoX scheduler on Wan", dict(model=WAN, scheduler="ddim"), "scheduler must be one of unipc, euler, lcm for "),
    ("flow shift on CogVideoX", dict(flow_shift=3), "flow_shift applies to flow-matching models (Wan) only"),
    ("flow shift as words", dict(flow_shift="high"), "flow_shift must be a number"),
    ("flow shift too small", dict(model=WAN, flow_shift=0), "flow_shift must be >= 0.5"),
    ("dynamic CFG on Wan", dict(model=WAN, use_dynamic_cfg=True), "use_dynamic_cfg applies to CogVideoX only"),
    ("unknown image channel", dict(image_channel="first"), "image_channel must be one of estimate, image, roll"),
    ("Wan 2.2 5B at a size not a multiple of 32", dict(model="Wan-AI/Wan2.2-TI2V-5B-Diffusers", height=48),
     "height must be a multiple of 32 for Wan-AI/Wan2.2-TI2V-5B-Diffusers, got 48"),
    ("CogVideoX-5b-I2V at another size", dict(model="THUDM/CogVideoX-5b-I2V", image="good"),
     "height/width: THUDM/CogVideoX-5b-I2V has learned positional embeddings and runs only at 720x480"),
    ("CogVideoX-5b-I2V past its learned table in full mode",
     dict(model="THUDM/CogVideoX-5b-I2V", image="good", num_frames=97, height=None, width=None),
     "window_mode: num_frames=97 (25 latents) in full mode would replace THUDM/CogVideoX-5b-I2V's learned"),
    ("unknown seam polish", dict(seam_polish="max"), "seam_polish must be one of off, fast"),
    ("unknown motion region", dict(motion_region="sky"), "motion_region must be one of object"),
    ("unknown mask model", dict(mask_model="sam"), "mask_model: unknown mask model 'sam'"),
    ("mask threshold above 1", dict(mask_threshold=1.5), "mask_threshold must be <= 1"),
    ("mask grow too large", dict(mask_grow=100), "mask_grow must be <= 64"),
    ("negative feather", dict(mask_feather=-1), "mask_feather must be >= 0"),
    ("anchor above 1", dict(anchor_strength=2), "anchor_strength must be <= 1"),
    ("negative init strength", dict(init_strength=-0.1), "init_strength must be >= 0"),
    ("freeze as words", dict(background_freeze="yes"), "background_freeze must be a number"),
    ("dynamic cfg as words", dict(use_dynamic_cfg="yes"), "use_dynamic_cfg must be true or false"),
    ("frame-invariant as a number", dict(frame_invariant_decoding=2), "frame_invariant_decoding must be true"),
    ("zero fps", dict(fps=0), "fps must be >= 1"),
    ("fps too high", dict(fps=61), "fps must be <= 60"),
    ("a folder as the model", dict(model="/etc"), "model '/etc' is not served here"),
    ("an unknown model id", dict(model="someone/unknown"), "model 'someone/unknown' is not served here"),
    ("image-to-video without an image", dict(model="THUDM/CogVideoX-5b-I2V"), "image: THUDM/CogVideoX-5b-I2V"),
    ("empty image file", dict(image="empty"), "image: 'empty.png' is not an image file"),
    ("text as an image", dict(image="text"), "image: 'notes.png' is not an image file"),
    ("truncated image", dict(image="truncated"), "image: 'cut.png' is truncated"),
    ("72-megapixel image", dict(image="huge"), "image: image file 'huge.png' is 9000x8000 = 72.0 megapixels"),
    ("a bare path instead of an upload", dict(image="/etc/passwd"), "image: expected an uploaded image file"),
    ("text as a mask", dict(image="good", mask="text"), "mask: 'notes.png' is not an image file"),
    ("empty mask file", dict(image="good", mask="empty"), "mask: 'empty.png' is not an image file"),
    ("text as a video", dict(video="clip_text"), "video: 'notes.mp4' is not a video file (or it is truncated)"),
    ("empty video file", dict(video="clip_empty"), "video: 'empty.mp4' is empty"),
    ("truncated video", dict(video="clip_truncated"), "video: 'cut.mp4' is not a video file (or it is truncated)"),
    ("a 3-frame video", dict(video="clip_short"), "video: the clip has 3 frames; a loop needs at least 4"),
    ("a still image as the video", dict(video="good"), "video: the clip has 1 frame; a loop needs at least 4"),
    ("a 300 fps video", dict(video="clip_fast"), "video: frame rate 300.0 is not a usable fps (0 to 240)"),
    ("a bare path instead of a video upload", dict(video="/etc/passwd"), "video: expected an uploaded video file"),
    ("loop region zero", dict(video="clip_good", loop_region=0), "loop_region must be >= 0.05, got 0"),
    ("loop region as words", dict(loop_region="half"), "loop_region must be a number"),
    ("unknown step cache", dict(step_cache="teacache"), "step_cache must be one of off, loop; got 'teacache'"),
    ("sigmas on CogVideoX", dict(sigmas="1, 0.5", num_inference_steps=None),
     "sigmas apply to flow-matching models (Wan) only"),
    ("sigmas as words", dict(model=WAN, sigmas="high, low"), "sigmas must be a number, got 'high'"),
    ("sigmas rising", dict(model=WAN, sigmas=[0.5, 0.9], num_inference_steps=None), "sigmas must decrease"),
    ("sigmas above 1", dict(model=WAN, sigmas=[2, 0.5], num_inference_steps=None), "sigmas must lie in (0, 1]"),
    ("fewer sigmas than steps", dict(model=WAN, sigmas="1, 0.5", num_inference_steps=4),
     "sigmas must have one value per step: 2 given for num_inference_steps 4"),
    ("sigmas with a flow shift", dict(model=WAN, sigmas="1", flow_shift=3),
     "flow_shift does not apply with sigmas"),
    ("a LoRA that does not exist", dict(loras=["/nowhere/ghost.safetensors"]),
     "loras: 'ghost.safetensors' does not exist"),
    ("a pickled LoRA", dict(loras=["style.ckpt:0.5"]), "loras: 'style.ckpt' is not a .safetensors file"),
    ("a broken LoRA file", dict(loras=["lora_broken"]), "loras: 'broken.safetensors' is not a valid safetensors"),
    ("a LoRA scale out of range", dict(loras=["style.safetensors:9"]),
     "loras: 'style.safetensors': scale must be in -4..4, got 9.0"),
    ("a LoRA as a number", dict(loras=5), "loras: expected a list of 'source:scale', got int"),
    ("a LoRA expert on a one-expert model", dict(loras=["lora_good:1:high"]),
     "loras: 'good.safetensors': expert 'high' needs a two-expert model"),
    ("a Wan LoRA on CogVideoX", dict(loras=["lora_wan"]), "loras: 'wan.safetensors' does not fit "
                                                           "loopui/tiny-random-cogvideox (cogvideox)"),
]


def _upload(files: dict, value):
    if isinstance(value, list):  # LoRAs: a file of the server named by its path, "name:scale:expert" kept
        return [str(files[v.split(":")[0]]) + v[len(v.split(":")[0]):]
                if isinstance(v, str) and v.split(":")[0] in files else v for v in value]
    return handle_file(str(files[value])) if isinstance(value, str) and value in files else value


@pytest.mark.parametrize("case, change, answer", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_line_naming_the_parameter(client, files, case, change, answer):
    BAD_INPUTS_TRIED.append(f"api: {case}")
    arguments = {**TINY, **{name: _upload(files, value) for name, value in change.items()}}
    with pytest.raises(AppError) as info:
        client.predict(api_name="/generate", **arguments)
    assert _one_line(str(info.value)).startswith(answer)
    _good_call(client)


MASK_CASES = [
    ("mask endpoint without an image", dict(image=None), "image: no image given"),
    ("mask endpoint with text as the image", dict(image="text"), "image: 'notes.png' is not an image file"),
    ("mask endpoint threshold above 1", dict(image="good", mask_threshold=2), "mask_threshold must be <= 1"),
    ("mask endpoint unknown region", dict(image="good", motion_region="sky"), "motion_region must be one of"),
    ("mask endpoint unknown model", dict(image="good", mask_model="sam"), "mask_model: unknown mask model"),
]


@pytest.mark.parametrize("case, change, answer", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_endpoint_bad_input_is_one_line(client, files, case, change, answer):
    BAD_INPUTS_TRIED.append(f"api: {case}")
    with pytest.raises(AppError) as info:
        client.predict(api_name="/mask", **{name: _upload(files, value) for name, value in change.items()})
    assert _one_line(str(info.value)).startswith(answer)
    assert client.predict(image=handle_file(str(ASSETS / "balloon.png")), api_name="/mask")


def test_public_caps_are_answered_by_name(served, client, files, monkeypatch):
    from loopui.studio import requests as studio_requests

    studio, _ = served
    # The clip cap (50 MB) lowered below the small test clip, so no 50 MB file is needed to reach it.
    monkeypatch.setitem(studio_requests.PUBLIC_LIMITS, "video_bytes", files["clip_good"].stat().st_size - 1)
    studio.public = True
    try:
        for case, change, answer in [
            ("public: too many steps", dict(num_inference_steps=51), "num_inference_steps must be <= 50 on this"),
            ("public: too many frames", dict(num_frames=125), "num_frames must be <= 121 on this public server"),
            ("public: too large", dict(height=1024, width=1024), "height x width must be at most 399360"),
            ("public: too long a prompt", dict(prompt="waves " * 400), "prompt must be at most 2000 characters"),
            ("public: a clip over the size cap", dict(video=handle_file(str(files["clip_good"]))),
             "video: 'bar.mp4' is "),
            ("public: a LoRA that is not the server's", dict(loras=[str(files["lora_good"])]),
             "loras: 'good.safetensors' is not one of this server's LoRAs (none)"),
            ("public: a hub LoRA", dict(loras=["owner/repo"]), "loras: 'owner/repo' is not one of this server's"),
        ]:
            BAD_INPUTS_TRIED.append(case)
            with pytest.raises(AppError) as info:
                client.predict(api_name="/generate", **{**TINY, **change})
            assert _one_line(str(info.value)).startswith(answer), case
        _good_call(client)
    finally:
        studio.public = False


def test_api_automatic_values_match_the_page_and_cli(client):
    """A client that changes num_frames and leaves shift and RoPE out gets the automatic values (they used to be
    the page's defaults for 49 frames: shift 6, RoPE 1)."""
    import json

    def settings(**change):
        *_, files, status = client.predict(api_name="/generate", **{**TINY, **change})
        sidecar = json.loads(next(_path(f) for f in files if _path(f).suffix == ".json").read_text())
        return sidecar["settings"], status

    long, _ = settings(num_frames=97)
    assert long["shift_skip"] == 12 and long["rope_scale"] == pytest.approx(25 / 13)
    # Used to fail: the page's shift default 6 is out of range for 6 latents. "auto" and null are automatic too.
    short, _ = settings(num_frames=21, rope_scale="auto", shift_skip=None)
    assert short["num_latent_frames"] == 6 and short["shift_skip"] == 1 and short["rope_scale"] == 1.0
    rounded, status = settings(num_frames=50)
    assert rounded["num_frames"] == 49 and "num_frames 50 is not of the form 4n+1: using 49" in status


def test_eight_concurrent_clients_get_their_own_loops(served):
    """Distinct seeds from eight clients at once: each gets exactly the loop it gets alone."""
    from loopui.media import read_video

    _, url = served
    clients = [_client(url) for _ in range(8)]
    request = dict(TINY, num_frames=9)
    solo = {seed: read_video(_path(clients[0].predict(api_name="/generate", seed=seed, **request)[0]))
            for seed in range(8)}
    assert not np.array_equal(solo[0], solo[1])
    jobs = [c.submit(api_name="/generate", seed=seed, **request) for seed, c in enumerate(clients)]
    results = [job.result(timeout=120) for job in jobs]
    for seed, (video, *_rest, status) in enumerate(results):
        assert status.startswith("Done."), status
        assert f"seed{seed}" in _path(video).name
        np.testing.assert_array_equal(read_video(_path(video)), solo[seed], err_msg=f"seed {seed}")


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _statuses(job) -> list[str]:
    return [out[4] for out in job.outputs() if isinstance(out, (list, tuple)) and isinstance(out[4], str)]


def test_queue_position_stop_while_queued_and_a_full_line(served):
    studio, url = served
    first, second, third = (_client(url) for _ in range(3))
    long_run = first.submit(api_name="/generate", **{**TINY, "num_inference_steps": 200})
    assert _wait(lambda: studio.line.waiting == 0 and studio.jobs.running() == 1, 30)
    queued = second.submit(api_name="/generate", **TINY)
    assert _wait(lambda: any(s.startswith("Queued: 1 loop ahead of yours (position 2)") for s in _statuses(queued)),
                 30), _statuses(queued)
    # A full line is refused at once with a clear message.
    capacity = studio.line.capacity
    studio.line.capacity = 1
    try:
        BAD_INPUTS_TRIED.append("api: a generation while the line is full")
        with pytest.raises(AppError, match=r"^busy: 1 loop is already waiting for the GPU \(the line is full\)"):
            third.predict(api_name="/generate", **TINY)
    finally:
        studio.line.capacity = capacity
    # Stop while queued: the job leaves the line and says so.
    assert second.predict(api_name="/stop").startswith("Stopped while queued: your loop left the queue")
    assert queued.result(timeout=10)[-1].startswith("Stopped while queued")
    assert studio.line.waiting == 0
    # The running job shows elapsed time and an estimate of what is left while it denoises.
    descs: list[str] = []

    def denoising_with_times() -> bool:
        status = long_run.status()
        descs.extend(p.desc or "" for p in (status.progress_data or []))
        return any("elapsed" in d and "left" in d for d in descs)

    assert _wait(denoising_with_times, 30), descs
    assert first.predict(api_name="/stop").startswith("Stopped: the worker ends")
    long_run.result(timeout=10)
    _good_call(third)


def test_a_model_that_cannot_be_fetched_fails_with_a_whole_message(served, client):
    """Offline (HF_HUB_OFFLINE=1 in conftest): the message is complete and the status stops saying "fetching"."""
    BAD_INPUTS_TRIED.append("api: a registry model whose weights cannot be fetched")
    job = client.submit(api_name="/generate", **{**TINY, "model": "THUDM/CogVideoX-2b"})
    with pytest.raises(AppError) as info:
        job.result(timeout=120)
    message = _one_line(str(info.value))
    assert message.startswith("cannot download or load THUDM/CogVideoX-2b: ")
    assert "..." not in message and message.endswith("and pass that folder as the model")
    assert _statuses(job)[-1] == f"✖ Failed: {message}"
    _good_call(client)


def test_building_the_page_writes_nothing_into_the_package(served):
    # Subclassing a Gradio component would make Gradio write a .pyi stub beside our module at import time.
    assert not list((ROOT / "loopui").rglob("*.pyi"))


def test_files_are_served_only_from_the_allowlist(served, client):
    import httpx

    _, url = served
    for path in (ROOT / "app.py", Path("/etc/hostname"), ROOT / "loopui" / "studio" / "studio.py"):
        BAD_INPUTS_TRIED.append(f"api: GET file={path.name}")
        response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}")
        assert response.status_code == 403, path
    assert httpx.get(f"{url.rstrip('/')}/gradio_api/file={ASSETS / 'balloon.png'}").status_code == 200
    _good_call(client)


# -- the CLI ----------------------------------------------------------------------------------------------------

CLI_CASES = [
    # (id, arguments after "generate --model DIR --prompt x -o OUT", the one-line answer's text after "error: ")
    ("cli: too few frames", ["--frames", "3"], "num_frames must be >= 5, got 3 [--frames]"),
    ("cli: fractional frames", ["--frames", "2.5"], "argument --frames: must be a whole number, got '2.5'"),
    ("cli: fractional seed", ["--seed", "1.5"], "argument --seed: must be a whole number, got '1.5'"),
    ("cli: negative seed", ["--seed", "-1"], "seed must be >= 0, got -1 [--seed]"),
    ("cli: zero steps", ["--steps", "0"], "num_inference_steps must be >= 1, got 0 [--steps]"),
    ("cli: guidance nan", ["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    ("cli: rope as words", ["--rope-scale", "wide"], "argument --rope-scale: expected a number or 'auto'"),
    ("cli: unknown window mode", ["--window", "sliding"], "argument --window: invalid choice: 'sliding'"),
    ("cli: shift beyond the cycle", ["--shift-skip", "13"], "shift_skip must be in [0, 12]"),
    ("cli: shift start after end", ["--shift-start", "0.8", "--shift-end", "0.2"], "shift_start must not exceed"),
    ("cli: height not a multiple of 16", ["--height", "50"], "height must be a multiple of 16, got 50 [--height]"),
    ("cli: flow shift on CogVideoX", ["--flow-shift", "3"], "flow_shift applies to flow-matching models (Wan) only; "
                                                             "CogVideoX uses DDIM/DPM: leave flow_shift empty "
                                                             "[--flow-shift]"),
    ("cli: flow shift as words", ["--flow-shift", "high"], "argument --flow-shift: expected a number or 'auto'"),
    ("cli: a Wan scheduler on CogVideoX", ["--scheduler", "unipc"], "scheduler must be one of ddim, dpm for "),
    ("cli: unknown image channel", ["--image-channel", "first"], "argument --image-channel: invalid choice"),
    ("cli: unknown mask model", ["--mask-model", "sam"], "mask_model: unknown mask model 'sam'"),
    ("cli: contradictory invert", ["--invert-mask", "--motion-region", "everything"], "--invert-mask contradicts"),
    ("cli: text as an image", ["--image", "{text}"], "--image: cannot read image file"),
    ("cli: missing mask file", ["--mask", "{missing}"], "--mask: image file"),
    ("cli: empty prompt", ["--prompt", "  "], "prompt is empty: describe what the loop should show [--prompt]"),
    ("cli: unsupported output", ["-o", "x.avi"], "--output: unsupported output"),
    ("cli: output folder is a file", ["-o", "{text}/x.mp4"], "--output: cannot create"),
    ("cli: output is a folder", ["-o", "{folder}"], "--output: '"),
    ("cli: unwritable output folder", ["-o", "/proc/loopui-test/x.mp4"], "--output: cannot write to the folder"),
    ("cli: unwritable latents folder", ["--save-latents", "/proc/x.pt"], "--save-latents: cannot write to"),
    ("cli: latents not .pt", ["--save-latents", "{tmp}/x.npy"], "--save-latents: "),
    ("cli: unknown step cache", ["--step-cache", "teacache"], "argument --step-cache: invalid choice: 'teacache'"),
    ("cli: sigmas as words", ["--sigmas", "high,low"], "argument --sigmas: expected noise levels separated by"),
    ("cli: sigmas on CogVideoX", ["--sigmas", "1,0.5"], "sigmas apply to flow-matching models (Wan) only; "),
]


@pytest.mark.parametrize("case, argv, answer", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, case,
                                                            argv, answer):
    from loopui.cli import main
    from loopui.models import ModelManager

    BAD_INPUTS_TRIED.append(case)
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    names = dict(text=tmp_path / "notes.png", missing=tmp_path / "missing.png", folder=tmp_path / "folder.mp4",
                 tmp=tmp_path)
    argv = [a.format(**names) for a in argv]
    loads = []
    monkeypatch.setattr(ModelManager, "get", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--height", "16", "--width", "16"]
    if "-o" not in argv:
        base += ["-o", str(tmp_path / "out.mp4")]
    assert main(base + argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"loopui: error: {answer}"), lines[0]
    assert lines[0].count("[--") <= 1  # a flag is named once, never "[--prompt] [--prompt]"
    assert loads == [] and not (tmp_path / "out.mp4").exists()


def test_cli_good_run_after_the_bad_ones_with_notes_and_flag_warnings(tiny_model_dir, tmp_path, capsys):
    """--frames 50 is moved to 49 with a note; --offload without CUDA names the flag; the run succeeds."""
    import json

    from loopui.cli import main

    out = tmp_path / "deep" / "new" / "loop.gif"  # missing folders are fine: they are created
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--height", "16", "--width", "16",
                 "--steps", "1", "--frames", "50", "--offload", "model", "--device", "cpu", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "loopui: note: num_frames 50 is not of the form 4n+1: using 49" in captured.err
    assert "loopui: warning: --offload model ignored: CPU offload needs a CUDA device" in captured.err
    assert "LOOPUI_OFFLOAD" not in captured.err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["num_frames"] == 49


def test_cli_help_reads_well():
    from loopui.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    assert "Range 0..4294967295" in text and "e+09" not in text
    flag = next(a for a in generate._actions if a.dest == "frame_invariant_decoding")
    assert flag.help.startswith("Stock decoding") and "Default: True" not in flag.help


def test_the_count_of_bad_inputs(request):
    """At least 40 distinct bad inputs across the API and the CLI (the ones above that ran in this session)."""
    if len(BAD_INPUTS_TRIED) < len(API_CASES) + len(CLI_CASES):
        pytest.skip("run the whole module to count")
    assert len(set(BAD_INPUTS_TRIED)) == len(BAD_INPUTS_TRIED) >= 40
    print(f"\n[bad inputs] {len(BAD_INPUTS_TRIED)} distinct bad inputs answered", file=__import__("sys").__stderr__)
