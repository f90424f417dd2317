"""The app headless: launch it on the demo model and drive /generate, /mask and /stop with gradio_client.

One server for the module (the tiny model loads once); rembg runs a tiny ONNX stand-in for u2netp from a temp home.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from served_app import demo_studio, serve

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FAST = dict(num_inference_steps=2, height=64, width=96, num_frames=49)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(studio, client): the demo app on a free port, rembg pointed at a tiny u2netp, outputs in a temp dir."""
    studio = demo_studio(tmp_path_factory.mktemp("sessions"))
    with serve(studio, tmp_path_factory.mktemp("rembg-home")) as demo:
        yield studio, Client(demo.local_url, verbose=False)


def read_back(path: str) -> np.ndarray:
    from loopui.media import read_video

    return read_video(path)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_api_lists_generate_and_mask_with_request_field_names(app):
    _, client = app
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/generate", "/mask"}  # internal events (sliders, gallery, stop) stay out
    names = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    for name in ("prompt", "negative_prompt", "image", "mask", "video", "shift_skip", "rope_scale", "num_frames",
                 "num_inference_steps", "guidance_scale", "seed", "anchor_strength", "loop_region", "motion_region"):
        assert name in names
    optional = {p["parameter_name"] for p in endpoints["/generate"]["parameters"] if p["parameter_has_default"]}
    assert {"image", "mask", "video", "prompt", "init_strength", "loop_region"} <= optional
    assert endpoints["/generate"]["returns"][0]["component"] == "Video"


def test_generate_returns_a_looping_mp4_and_reuses_the_model(app):
    studio, client = app
    video, seam, strip, files, status = client.predict(prompt="ocean waves", seed=7, api_name="/generate", **FAST)
    frames = read_back(video)
    # Frame-invariant decoding of L = 13 latents plays 4·L = 52 frames at the requested size.
    assert frames.shape == (52, 64, 96, 3)
    assert "Seam ratio" in seam and "Done." in status
    # The verdict reads the cycle ratio (the largest jump anywhere, the same wherever the loop starts); the sidecar
    # has the same number.
    cycle = float(seam.split("**Cycle ratio ")[1].split("**")[0])
    assert "× the steps around it" in seam
    assert "\n\nScores: first/last MSE " in seam  # the papers' metrics, one line under the seam ratio
    suffixes = sorted(Path(f).suffix for f in files)
    assert suffixes == [".gif", ".json", ".mp4", ".webp"]
    sidecar = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert sidecar["seed"] == 7 and sidecar["settings"]["shift_skip"] == 6
    assert sidecar["cycle_ratio"] == pytest.approx(cycle, abs=0.006)
    assert studio.manager.load_count == 1

    # Second call, with a reference image: same cached model, a different loop.
    video2, seam2, *_ = client.predict(prompt="ocean waves", seed=8, image=handle_file(str(ASSETS / "balloon.png")),
                                       anchor_strength=0.5, api_name="/generate", **FAST)
    assert studio.manager.load_count == 1 and "MSE_F0" in seam2 and "MSE_F0" not in seam
    frames2 = read_back(video2)
    assert frames2.shape == frames.shape
    assert not np.array_equal(frames, frames2)


def test_one_api_client_submitting_a_batch_gets_every_loop_back(app):
    """Eight ``client.submit`` from one ``Client`` share one session: each job runs (none cancels another), and
    every one comes back as its own loop (they used to answer "Stopped while queued" but for the first and last)."""
    _, client = app
    small = dict(num_inference_steps=1, height=32, width=48, num_frames=9)
    jobs = [client.submit(prompt="ocean waves", seed=100 + i, api_name="/generate", **small) for i in range(8)]
    results = [job.result(timeout=300) for job in jobs]
    videos = [result[0] for result in results]
    assert len(set(videos)) == 8 and all("Done." in result[4] for result in results)
    for i, result in enumerate(results):
        sidecar = json.loads(Path(next(f for f in result[3] if f.endswith(".json"))).read_text())
        assert sidecar["seed"] == 100 + i and read_back(result[0]).shape[0] == 12


def test_generate_loops_an_uploaded_clip(app, clip_files, counted):
    """``video=handle_file(path)``: the clip (written by imageio, not our exporter) comes back as a looping MP4 of
    4·L frames; ``loop_region`` reaches the engine and ``init_strength`` left out is the clip's 0.7. With an image
    too, the generation is planned once and the clip read once."""
    _, client = app
    video, seam, strip, files, status = client.predict(
        prompt="a bar sliding", video=handle_file(str(clip_files["good"])), loop_region=0.5, num_frames=17,
        image=handle_file(str(ASSETS / "balloon.png")), height=32, width=48, num_inference_steps=2,
        api_name="/generate")
    assert counted == {"plan_loop": 1, "clip_reads": 1}
    assert read_back(video).shape == (20, 32, 48, 3)  # 17 frames -> L = 5 latents -> 20 frames
    assert "Done." in status and "⚠ video: the loop uses the clip's first 2.12 s of 2.50 s" in status
    sidecar = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    settings = sidecar["settings"]
    assert Path(settings["video"]).name == "bar.mp4"
    assert (settings["loop_region"], settings["init_strength"]) == (0.5, 0.7)


def test_an_image_to_video_model_takes_a_clip_instead_of_an_image(app, clip_files):
    """The engine conditions an I2V model on the clip's first frame when no image is given: the page and the API
    must not refuse such a request for "needs an image" (checked up to the plan: nothing is loaded)."""
    from loopui.engine.plan import CLIP_INIT_STRENGTH, plan_loop
    from loopui.studio.knobs import model_text

    studio, _ = app
    model = "THUDM/CogVideoX-5b-I2V"
    resolved = studio.build_request({"prompt": "a bar", "video": str(clip_files["good"])}, model_id=model)
    assert plan_loop(resolved.request, studio.spec(model)).init_strength == CLIP_INIT_STRENGTH
    with pytest.raises(ValueError, match=f"^image: {model} animates a reference image"):
        studio.build_request({"prompt": "a bar"}, model_id=model)
    assert "or a clip" in model_text(model)


def test_a_knob_note_loses_its_automatic_clause_but_keeps_the_rest():
    """The page drops "empty = ..." (a slider always holds a value); a decimal in it ("0.7") used to end the cut
    early and leave ".7 with a clip." in Init strength's note."""
    from loopui.studio.knobs import help_text

    assert help_text("init_strength").endswith("lower values start from the noised image or clip (closer to it, "
                                               "less change).")
    assert "empty" not in help_text("flow_shift") and help_text("flow_shift").endswith("at high noise.")


def test_mask_endpoint_finds_the_object_and_inverts_for_background(app):
    from PIL import Image

    _, client = app
    image = handle_file(str(ASSETS / "balloon.png"))
    obj = np.asarray(Image.open(client.predict(image=image, api_name="/mask")).convert("L")) / 255.0
    assert obj.shape == (320, 480)
    assert obj[100, 240] > 0.9  # the red balloon
    assert obj[10, 10] < 0.1  # blue sky
    back = np.asarray(Image.open(client.predict(image=image, motion_region="background", mask_feather=0,
                                                api_name="/mask")).convert("L")) / 255.0
    assert back[100, 240] < 0.1 and back[10, 10] > 0.9


def test_painted_strokes_win_over_the_computed_mask(app):
    studio, _ = app
    image = str(ASSETS / "balloon.png")
    layer = np.zeros((320, 480, 4), np.uint8)
    layer[0:40, 0:60] = (40, 220, 120, 200)  # the "may move" brush over the sky
    layer[90:110, 230:250] = (40, 40, 40, 200)  # the "hold still" brush on the balloon
    mask = studio.masks.painted_mask(image, [layer], "u2netp", "object") / 255.0
    assert mask[20, 30] == 1.0 and mask[100, 240] == 0.0
    assert mask[60, 240] > 0.9 and mask[300, 400] < 0.1  # unpainted pixels keep the model's mask
    # With the background moving, a "may move" stroke means "not the object" (the engine inverts the mask).
    inverted = studio.masks.painted_mask(image, [layer], "u2netp", "background") / 255.0
    assert inverted[20, 30] == 0.0 and inverted[100, 240] == 1.0
    assert studio.masks.painted_mask(image, [np.zeros_like(layer)], "u2netp", "object") is None


def test_stop_interrupts_a_long_generation_and_the_app_stays_ready(app):
    from gradio_client.utils import Status

    studio, client = app
    before = set(Path(studio.output_root).rglob("*.mp4"))

    def long_job():
        return client.submit(prompt="a long one", api_name="/generate", **{**FAST, "num_inference_steps": 200})

    def denoising(job) -> bool:
        status = job.status()
        return status.code == Status.PROGRESS and bool(status.progress_data) and any(
            "Denoising" in (p.desc or "") for p in status.progress_data)

    # 1. Cancelling the client job (what the browser's Stop does to the event) stops the worker too.
    job = long_job()
    assert wait_until(lambda: denoising(job), timeout=30)
    started = time.monotonic()
    job.cancel()
    assert wait_until(lambda: studio.jobs.running() == 0, timeout=5), "worker kept running after cancel"
    assert time.monotonic() - started < 5

    # 2. The Stop endpoint reaches the same session's worker; the run ends with a "Stopped" status.
    job = long_job()
    assert wait_until(lambda: denoising(job), timeout=30)
    assert "Stopped" in client.predict(api_name="/stop")
    outputs = job.result(timeout=10)
    assert "Stopped" in outputs[-1]
    assert studio.jobs.running() == 0
    assert set(Path(studio.output_root).rglob("*.mp4")) == before  # neither long run wrote a loop

    # 3. Ready again at once.
    video, *_ = client.predict(prompt="after the stop", api_name="/generate", **FAST)
    assert read_back(video).shape[0] == 52


def test_dependent_knobs_follow_the_model_and_loop_length():
    from loopui.studio.knobs import shift_note
    from loopui.ui.updates import rope_update, shift_update

    # RoPE scaling is off (and locked) for a model without rotary embeddings, automatic for long cycles otherwise.
    locked = rope_update("THUDM/CogVideoX-2b", 97, "full")
    assert locked["interactive"] is False and locked["value"] == 1.0 and "no rotary" in locked["info"]
    long_loop = rope_update("THUDM/CogVideoX-5b", 97, "full")
    assert long_loop["interactive"] is True and long_loop["value"] == pytest.approx(25 / 13, abs=0.01)
    # The shift slider spans 0..L-1 and resets to the coprime skip nearest L/2.
    shift = shift_update("THUDM/CogVideoX-5b", 97)
    assert shift["maximum"] == 24 and shift["value"] == 12
    assert "shares the factor 5" in shift_note(97, 10) and "⚠" not in shift_note(97, 12)


def test_missing_saliency_weights_leave_painting_usable(app, tmp_path, monkeypatch):
    import shutil

    from saliency_fixtures import use_rembg_home

    studio, client = app
    use_rembg_home(monkeypatch, tmp_path / "empty-home")  # no u2netp there, downloads fail
    image = tmp_path / "koi-copy.png"  # a new path, so no cached saliency from other tests
    shutil.copy(ASSETS / "koi.png", image)
    try:
        preview = studio.masks.preview(str(image), "u2netp", 0.5, 0, 8, "object")
        assert preview.mask is None and preview.image is not None  # the editor still gets the image to paint on
        assert preview.note.startswith("No automatic mask") and "u2netp" in preview.note
        layer = np.zeros((320, 480, 4), np.uint8)
        layer[100:200, 150:300] = (40, 220, 120, 200)
        painted = studio.masks.painted_mask(str(image), [layer], "u2netp", "object")
        assert painted[150, 200] == 255 and painted[10, 10] == 0
        with pytest.raises(AppError, match="No automatic mask"):
            client.predict(image=handle_file(str(image)), api_name="/mask")
    finally:
        from loopui.saliency import clear_session_cache

        clear_session_cache()


def test_an_anchored_loops_seam_strip_straddles_its_real_wrap(tmp_path):
    """An anchored loop is played from its image (``anchor_frame_shift`` frames in): the strip's top row shows the
    generated cycle's wrap, not the played video's first and last frames."""
    from types import SimpleNamespace

    from PIL import Image

    from loopui.engine import LoopRequest, plan_loop
    from loopui.models import spec_for
    from loopui.studio.results import loop_outcome

    frames = np.zeros((8, 4, 4, 3), dtype=np.uint8)
    frames[:, :, :, 1] = (30 * np.arange(8))[:, None, None]  # frame t is green 30·t
    result = SimpleNamespace(frames=frames, anchor_frame_shift=3, worst_step=None, timings={}, scores={},
                             warnings=[], seam_ratio=1.0, interior_ratio=1.0, cycle_ratio=1.0,
                             plan=plan_loop(LoopRequest(prompt="x", num_frames=9), spec_for("demo")),
                             describe_worst_step=lambda: "", attention="native", compiled=False)
    render = SimpleNamespace(result=result, files=[tmp_path / "loop.mp4"], sidecar=tmp_path / "loop.json")
    outcome = loop_outcome(1, render, tmp_path / "loop", SimpleNamespace(describe=lambda: "demo on cpu"))
    strip = np.asarray(Image.open(outcome.strip))
    # Played frame 4 is the cycle's last (frames 0..4 are cycle frames 3..7), played frame 5 its first.
    left, right = strip[0, 2 * 4, 1], strip[0, 3 * 4 + 2, 1]
    assert (left, right) == (120, 150)
    assert "Cycle ratio 1.00" in outcome.seam_text and outcome.shift_skip == 1


def _sidecar(files) -> dict:
    return json.loads(Path(next(f for f in files if str(f).endswith(".json"))).read_text())


def test_api_step_cache_loop_skips_model_calls(app):
    """``step_cache="loop"`` reaches the engine: at 30 steps it answers some steps without the model."""
    _, client = app
    small = dict(prompt="ocean waves", num_inference_steps=30, height=32, width=48, num_frames=9, seed=3)
    *_, files_off, _ = client.predict(api_name="/generate", **small)
    *_, files_loop, status = client.predict(step_cache="loop", api_name="/generate", **small)
    off, loop = _sidecar(files_off), _sidecar(files_loop)
    assert "Done." in status and loop["settings"]["step_cache"] == "loop" and off["settings"]["step_cache"] == "off"
    assert loop["settings"]["model_calls"] < off["settings"]["model_calls"]


def test_api_chooses_how_the_model_runs_and_the_sidecar_says_what_ran(app):
    """``attention``, ``compile`` and ``quantize`` over the API: int8 loads the model with int8 transformer weights
    (the status line says so), the sidecar records the kernel that ran; a kernel this server cannot run is one
    line naming ``attention``, and the app keeps serving."""
    _, client = app
    small = dict(prompt="ocean waves", num_inference_steps=2, height=32, width=48, num_frames=9, seed=3)
    *_, files, status = client.predict(attention="native", compile=False, quantize="int8", api_name="/generate",
                                       **small)
    settings = _sidecar(files)["settings"]
    assert (settings["attention"], settings["compile"], settings["quantize"]) == ("native", False, "int8")
    assert "(int8 transformer)" in status and "attention native" in status
    with pytest.raises(AppError, match="attention 'sage'"):
        client.predict(attention="sage", api_name="/generate", **small)
    *_, status = client.predict(api_name="/generate", **small)
    assert "Done." in status and "int8" not in status  # the server's own setting again: no quantization


def test_a_gallery_click_restores_the_kernel_compile_quantize_and_recipe(tmp_path):
    from types import SimpleNamespace

    from loopui.studio.results import HistoryEntry
    from loopui.ui.events import RESTORED_OTHERS, Handlers
    from loopui.ui.updates import FOLLOW_MODEL

    handlers = Handlers(demo_studio(tmp_path, manager=object()))
    wan = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    values = {"prompt": "x", "num_frames": 81, "seed": 1, "attention": "sage", "compile": True, "quantize": "int8",
              "recipe": "causvid-3step"}
    entry = HistoryEntry(index=1, model=wan, values=values, video="v.mp4", files=[], strip="s.png", thumb="t.png",
                         caption="#1")
    out = handlers.restore([entry], SimpleNamespace(index=0))
    follow = dict(zip(FOLLOW_MODEL, out[1:1 + len(FOLLOW_MODEL)]))
    others = dict(zip(RESTORED_OTHERS, out[1 + len(FOLLOW_MODEL):]))
    assert follow["attention"]["value"] == "sage" and follow["recipe"]["value"] == "causvid-3step"
    assert (others["compile"], others["quantize"]) == ("on", "int8")  # the dropdowns' own spellings
    # On CogVideoX the kernel stays auto (the model offers no other); "automatic" compile shows as auto.
    entry.model, entry.values = "THUDM/CogVideoX-5b", {**values, "compile": None, "quantize": None}
    out = handlers.restore([entry], SimpleNamespace(index=0))
    follow = dict(zip(FOLLOW_MODEL, out[1:1 + len(FOLLOW_MODEL)]))
    others = dict(zip(RESTORED_OTHERS, out[1 + len(FOLLOW_MODEL):]))
    assert follow["attention"]["value"] == "auto" and (others["compile"], others["quantize"]) == ("auto", "auto")


def test_api_uses_the_lora_dirs_files_and_public_mode_only_those(app, tmp_path, monkeypatch):
    """A LoRA written in code into the server's --lora-dir is named by its file name (the sidecar records its
    sha256); in public mode any other LoRA is refused by name, and a broken file is one line naming ``loras``."""
    import hashlib

    from loopui.models.demo import build_tiny_cogvideox
    from loopui.studio.requests import list_lora_dir
    from loopui.testing.lora_files import write_lora

    studio, client = app
    folder = tmp_path / "loras"
    paper = write_lora(build_tiny_cogvideox().transformer, folder / "paper.safetensors", seed=1)
    other = write_lora(build_tiny_cogvideox().transformer, tmp_path / "other.safetensors", seed=2)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors header")
    monkeypatch.setattr(studio.knobs, "loras", list_lora_dir(folder))
    small = dict(prompt="a paper boat", num_inference_steps=2, height=32, width=48, num_frames=9)

    *_, files, status = client.predict(loras=["paper.safetensors:0.5"], api_name="/generate", **small)
    assert "Done." in status, status
    (record,) = _sidecar(files)["settings"]["loras"]
    assert record == {"source": "paper.safetensors", "file": "paper.safetensors", "scale": 0.5, "expert": "both",
                      "sha256": hashlib.sha256(paper.read_bytes()).hexdigest()}
    # Outside public mode another file on the server is used too (text, one per line)
    *_, files, _ = client.predict(loras=f"paper.safetensors\n{other}:-1", api_name="/generate", **small)
    assert [(r["file"], r["scale"]) for r in _sidecar(files)["settings"]["loras"]] == [
        ("paper.safetensors", 1.0), ("other.safetensors", -1.0)]
    with pytest.raises(AppError) as info:
        client.predict(loras=[str(broken)], api_name="/generate", **small)
    assert str(info.value).startswith("loras: 'broken.safetensors' is not a valid safetensors file")
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)

    monkeypatch.setattr(studio, "public", True)  # undone (public off) when the test ends
    with pytest.raises(AppError, match=r"^loras: 'other.safetensors' is not one of this server's LoRAs "
                                       r"\(paper.safetensors\)$"):
        client.predict(loras=[str(other)], api_name="/generate", **small)
    *_, files, status = client.predict(loras=["paper.safetensors:0.5"], api_name="/generate", **small)
    assert "Done." in status and _sidecar(files)["settings"]["loras"][0]["source"] == "paper.safetensors"
