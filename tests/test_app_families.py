"""The page and the API across model families: every knob follows the model, and only what the model can do is offered.

The knob tests read ``Studio.model_view`` (what the page shows) and check it against ``build_request`` (what a
Generate would do) for every registry model, so the page cannot offer a size, length or scheduler that the engine
refuses. The API half serves the demo app with Wan 2.1 T2V 1.3B loaded from a config-faithful tiny folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopui.engine.plan import plan_loop
from loopui.models import REGISTRY, list_models

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "assets" / "balloon.png")
WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
I2V = "THUDM/CogVideoX-5b-I2V"
MODELS = [spec.model_id for spec in list_models()]


def _studio(tmp_path, has_gpu: bool = True, public: bool = False):
    from loopui.studio import Studio

    return Studio(has_gpu=has_gpu, public=public, output_root=tmp_path, manager=object())


def _page_request(studio, model_id: str, **values):
    """What a Generate with these page values would send to the engine (after the page's own conversions)."""
    spec = studio.spec(model_id)
    data = {"prompt": "waves", "image": IMAGE if spec.image_to_video else None, **values}
    return studio.build_request(studio.page_values(data, model_id), model_id)


# -- what the page offers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("has_gpu", [True, False], ids=["gpu", "no-gpu"])
def test_everything_the_page_offers_is_accepted_for_every_model(tmp_path, has_gpu):
    """Every resolution preset, the preview settings, the loop lengths at both ends of the slider and every scheduler
    the page offers for a model are accepted by the engine; the page starts at values it accepts too."""
    from loopui.studio.knobs import CUSTOM_RESOLUTION, RESOLUTION_PRESETS, window_state

    studio = _studio(tmp_path, has_gpu=has_gpu)
    for model_id in MODELS:
        view = studio.knobs.model_view(model_id)
        start = dict(num_frames=view.num_frames, guidance_scale=view.guidance.value, fps=view.fps,
                     scheduler=view.scheduler, use_dynamic_cfg=view.dynamic_cfg.value, flow_shift=None,
                     image_channel=view.image_channel.value)
        _page_request(studio, model_id, **start)
        for _, preset in view.resolutions:
            if preset != CUSTOM_RESOLUTION:
                height, width = RESOLUTION_PRESETS[preset]
                _page_request(studio, model_id, height=height, width=width)
        preview = view.preview
        _page_request(studio, model_id, height=preview["height"], width=preview["width"],
                      num_frames=preview["num_frames"], num_inference_steps=preview["num_inference_steps"])
        low, high, step = view.frames
        assert step == studio.spec(model_id).temporal_compression
        for frames in (low, high):
            window = window_state(model_id, frames, "full").value
            _page_request(studio, model_id, num_frames=frames, window_mode=window)
        for _, name in view.schedulers:
            _page_request(studio, model_id, scheduler=name)


def test_the_steps_start_at_the_models_own_count_not_the_sliders_minimum(tmp_path):
    """``num_inference_steps`` left empty is the model's own count (40 on Wan 2.2 A14B); the page and the API's
    default start there -- a knob default of None used to leave the Steps slider at its minimum, 1 step."""
    pytest.importorskip("gradio")
    from loopui.ui import build_app

    studio = _studio(tmp_path)
    for model_id in ("THUDM/CogVideoX-5b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"):
        planned = plan_loop(_page_request(studio, model_id).request, studio.spec(model_id)).num_inference_steps
        assert studio.knobs.default("num_inference_steps", model_id) == planned == studio.knobs.model_view(
            model_id).steps
    assert studio.knobs.default("num_inference_steps") == 50
    assert _studio(tmp_path, has_gpu=False).knobs.default("num_inference_steps") == 4  # the preview settings
    config = build_app(studio).get_config_file()
    steps = [c["props"] for c in config["components"] if c["props"].get("elem_id") == "loopui-steps"]
    assert [props["value"] for props in steps] == [50]


def test_knobs_follow_each_family(tmp_path):
    studio = _studio(tmp_path)
    cog, wan, wan22, a14b = (studio.knobs.model_view(m) for m in ("THUDM/CogVideoX-5b", WAN, "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                                                            "Wan-AI/Wan2.2-T2V-A14B-Diffusers"))
    # Default fps and trained frames: 8 / 49 CogVideoX, 16 / 81 Wan 2.1, 24 / 121 Wan 2.2 5B.
    assert [(v.fps, v.num_frames) for v in (cog, wan, wan22)] == [(8, 49), (16, 81), (24, 121)]
    assert [(v.guidance.value, v.scheduler) for v in (cog, wan)] == [(6.0, "dpm"), (5.0, "auto")]
    # Schedulers of the family only, plus automatic.
    assert [value for _, value in cog.schedulers] == ["auto", "ddim", "dpm"]
    assert [value for _, value in wan.schedulers] == ["auto", "unipc", "euler", "lcm"]
    # Dynamic CFG is CogVideoX's; flow shift is flow matching's. Locked knobs carry the engine's reason.
    assert cog.dynamic_cfg.interactive and cog.dynamic_cfg.value is True
    assert not wan.dynamic_cfg.interactive and wan.dynamic_cfg.value is False
    assert "use_dynamic_cfg applies to CogVideoX only" in wan.dynamic_cfg.note
    assert not cog.flow_shift.interactive and "flow_shift applies to flow-matching models" in cog.flow_shift.note
    assert wan.flow_shift.interactive and wan.flow_shift.value is None and "automatic: 3" in wan.flow_shift.note
    # Wan 2.1 14B: the automatic shift depends on the size (3 at 480p, 5 at 720p).
    assert "3 at 832x480, 5 at 1280x720" in studio.knobs.model_view("Wan-AI/Wan2.1-T2V-14B-Diffusers").flow_shift.note
    # The second expert's guidance is said where it differs.
    assert a14b.guidance.value == 4.0 and "low-noise expert 3" in a14b.guidance.note
    # Wan 2.2 5B: 16x VAE, sizes in multiples of 32 -- 720x480 is not offered.
    assert wan22.size_step == 32 and "720x480" not in [key for _, key in wan22.resolutions]
    assert "multiple of 32" in wan22.size.note
    # The image channel belongs to image-to-video models.
    assert studio.knobs.model_view(I2V).image_channel.interactive
    assert studio.knobs.model_view("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers").image_channel.interactive
    assert not wan.image_channel.interactive and "Off: only image-to-video models" in wan.image_channel.note
    # The model note: licence and VRAM with and without offload.
    assert "Licence: Apache-2.0. VRAM: about 20 GB on one GPU, 14 GB with CPU offload." in wan.text
    assert "Licence: CogVideoX license (research" in cog.text


def test_cogvideox_5b_i2v_offers_only_its_native_size_and_forces_windows_past_its_table(tmp_path):
    from loopui.studio.knobs import rope_state, window_state

    for has_gpu in (True, False):
        studio = _studio(tmp_path, has_gpu=has_gpu)
        view = studio.knobs.model_view(I2V)
        assert view.resolutions == [("Model's native size (720x480)", "native")]  # no preview sizes, no custom
        assert not view.size.interactive and "runs only at 720x480" in view.size.note
        assert view.preview["resolution"] == "native" and view.preview["height"] is None  # preview = native size
        assert view.frames[0] == 49 and view.num_frames == 49  # its learned table needs 13 latents
        assert "(720x480, 49 frames, 4 steps)" in studio.knobs.banner(I2V) or has_gpu
    free = window_state(I2V, 49, "full")
    assert free.interactive and free.value == "full"
    forced = window_state(I2V, 97, "full")
    assert not forced.interactive and forced.value == "window" and "learned positional embeddings" in forced.note
    # In window mode its learned table takes no RoPE scale: the slider is locked with the engine's reason.
    rope = rope_state(I2V, 97, "window")
    assert not rope.interactive and rope.value == 1.0 and "(got" not in rope.note
    assert rope_state("THUDM/CogVideoX-5b", 97, "full").value == pytest.approx(1.92)


def test_public_mode_offers_only_what_the_caps_allow(tmp_path):
    from loopui.studio.knobs import RESOLUTION_PRESETS
    from loopui.studio.requests import PUBLIC_LIMITS

    studio = _studio(tmp_path, public=True)
    view = studio.knobs.model_view("Wan-AI/Wan2.1-T2V-14B-Diffusers")  # native 1280x720: over the public pixel cap
    offered = [key for _, key in view.resolutions if key in RESOLUTION_PRESETS]
    assert "native" not in offered and view.resolution == "720x480"
    assert view.frames[1] <= PUBLIC_LIMITS["num_frames"]
    assert studio.knobs.model_view("Wan-AI/Wan2.2-TI2V-5B-Diffusers").num_frames == 121  # its native length fits
    _page_request(studio, "Wan-AI/Wan2.1-T2V-14B-Diffusers", num_frames=view.num_frames,
                  height=RESOLUTION_PRESETS[view.resolution][0], width=RESOLUTION_PRESETS[view.resolution][1])


def test_the_guidance_slider_at_the_models_value_keeps_both_experts_recommendations(tmp_path):
    """Wan 2.2 A14B recommends 4 (high-noise expert) and 3 (low-noise): the slider shows 4, and while it does the
    page asks for the pair; moved, its value drives both experts. (The page used to send 4 for both.)"""
    studio = _studio(tmp_path)
    a14b = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    spec = REGISTRY[a14b]
    shown = studio.knobs.model_view(a14b).guidance.value
    plan = plan_loop(_page_request(studio, a14b, guidance_scale=shown).request, spec)
    assert (plan.guidance_scale, plan.guidance_scale_2) == (4.0, 3.0)
    plan = plan_loop(_page_request(studio, a14b, guidance_scale=3.5).request, spec)
    assert (plan.guidance_scale, plan.guidance_scale_2) == (3.5, 3.5)


def test_a_model_change_updates_every_knob_and_keeps_what_still_fits(tmp_path):
    pytest.importorskip("gradio")
    from loopui.ui.updates import FOLLOW_MODEL, model_updates

    studio = _studio(tmp_path, has_gpu=False)
    to_wan = model_updates(studio.knobs, WAN, "96x64", 64, 96)
    assert set(to_wan) == set(FOLLOW_MODEL)
    assert to_wan["resolution"]["value"] == "96x64" and to_wan["fps"]["value"] == 16
    assert [v for _, v in to_wan["scheduler"]["choices"]] == ["auto", "unipc", "euler", "lcm"]
    assert to_wan["use_dynamic_cfg"] == {"value": False, "interactive": False,
                                         "info": studio.knobs.model_view(WAN).dynamic_cfg.note, "__type__": "update"}
    assert to_wan["flow_shift"]["interactive"] is True and to_wan["image_channel"]["interactive"] is False
    # A custom size the model accepts stays; one it refuses falls back to the model's own start.
    assert model_updates(studio.knobs, WAN, "custom", 128, 128)["resolution"]["value"] == "custom"
    to_i2v = model_updates(studio.knobs, I2V, "custom", 128, 128)
    assert to_i2v["resolution"]["value"] == "native" and to_i2v["height"]["value"] is None
    assert to_i2v["height"]["interactive"] is False and to_i2v["num_frames"]["minimum"] == 49
    to_wan22 = model_updates(studio.knobs, "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "custom", 48, 80)
    assert to_wan22["resolution"]["value"] == "96x64" and to_wan22["width"]["step"] == 32


def test_the_steps_follow_a_model_change_except_the_preview_steps_without_a_gpu(tmp_path):
    """A model change sets the Steps slider to the new model's planned steps (40 on Wan 2.2 A14B, 50 on CogVideoX);
    on a server without a GPU the preview's 4 steps stay while the page shows them."""
    pytest.importorskip("gradio")
    from loopui.ui.updates import model_updates

    a14b, cog = "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "THUDM/CogVideoX-5b"
    gpu = _studio(tmp_path).knobs
    assert model_updates(gpu, a14b, steps=50)["num_inference_steps"]["value"] == 40
    assert model_updates(gpu, cog, steps=40)["num_inference_steps"]["value"] == 50
    assert model_updates(gpu, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", steps=4)["num_inference_steps"]["value"] == 40
    cpu = _studio(tmp_path, has_gpu=False).knobs
    assert "value" not in model_updates(cpu, a14b, steps=4)["num_inference_steps"]  # the preview stays
    assert model_updates(cpu, a14b, steps=30)["num_inference_steps"]["value"] == 40  # not the preview: the model's


def test_sigmas_and_the_lora_expert_follow_the_model(tmp_path):
    """The sigma box is Wan's (locked on CogVideoX with the engine's reason, cleared by a model change); the LoRA
    expert choice exists only on a two-expert model."""
    pytest.importorskip("gradio")
    from loopui.ui.updates import model_updates

    knobs = _studio(tmp_path).knobs
    cog, wan, a14b = (knobs.model_view(m) for m in ("THUDM/CogVideoX-5b", WAN, "Wan-AI/Wan2.2-T2V-A14B-Diffusers"))
    assert not cog.sigmas.interactive and "sigmas apply to flow-matching models (Wan) only" in cog.sigmas.note
    assert wan.sigmas.interactive and wan.sigmas.value is None and "1,0.9375,0.8333,0.625" in wan.sigmas.note
    assert a14b.lora_expert.interactive and not wan.lora_expert.interactive and not cog.lora_expert.interactive
    to_cog = model_updates(knobs, "THUDM/CogVideoX-5b")
    assert to_cog["sigmas"]["interactive"] is False and to_cog["sigmas"]["value"] is None
    assert to_cog["lora_expert"] == {"value": "both", "interactive": False, "info": cog.lora_expert.note,
                                     "__type__": "update"}
    assert model_updates(knobs, a14b.model_id)["lora_expert"]["interactive"] is True


def test_the_page_sends_steps_at_the_models_value_as_automatic_so_sigmas_set_the_count(tmp_path):
    studio = _studio(tmp_path)
    plan = _page_request(studio, WAN, num_inference_steps=50, sigmas="1, 0.9375, 0.8333, 0.625", scheduler="lcm")
    assert plan.num_inference_steps == 4 and plan.sigmas == (1.0, 0.9375, 0.8333, 0.625) and plan.flow_shift == 1.0
    assert _page_request(studio, WAN, num_inference_steps=50).num_inference_steps == 50
    with pytest.raises(ValueError, match="^sigmas must have one value per step: 4 given for num_inference_steps 30"):
        _page_request(studio, WAN, num_inference_steps=30, sigmas="1, 0.9375, 0.8333, 0.625")


def test_a_lora_dir_lists_its_safetensors_by_file_name(tmp_path):
    from loopui.studio import Studio

    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("b.safetensors", "A.safetensors", "notes.txt", "old.ckpt"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.safetensors").mkdir()  # a folder, not a file
    studio = Studio(has_gpu=True, output_root=tmp_path / "out", manager=object(), lora_dir=folder)
    assert list(studio.loras) == ["A.safetensors", "b.safetensors"]
    assert studio.loras["b.safetensors"] == str((folder / "b.safetensors").resolve())
    with pytest.raises(ValueError, match="^--lora-dir: '.*missing' is not a folder$"):
        Studio(has_gpu=True, output_root=tmp_path / "out", manager=object(), lora_dir=tmp_path / "missing")


def test_app_refuses_a_lora_dir_that_is_not_a_folder(tmp_path, capsys):
    import app
    from served_app import free_port

    assert app.parse_args(["--lora-dir", str(tmp_path)]).lora_dir == str(tmp_path)
    assert app.main(["--demo", "--port", str(free_port()), "--lora-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loopui: error: --lora-dir: ") and err.endswith("is not a folder")


# -- the API on a faithful Wan ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_app(tmp_path_factory, faithful_wan_dir):
    """(studio, client): the demo app whose manager loads Wan 2.1 T2V 1.3B from its faithful tiny folder."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from faithful_serving import FaithfulManager
    from served_app import demo_studio, serve

    studio = demo_studio(tmp_path_factory.mktemp("sessions"), manager=FaithfulManager({WAN: faithful_wan_dir}))
    with serve(studio) as demo:
        yield studio, Client(demo.local_url, verbose=False, download_files=False)


def _settings(files) -> dict:
    path = next(Path(f["path"] if isinstance(f, dict) else f) for f in files if str(f).endswith(".json")
                or (isinstance(f, dict) and f["path"].endswith(".json")))
    return json.loads(path.read_text())["settings"]


def test_api_lists_the_new_knobs_with_automatic_defaults(wan_app):
    _, client = wan_app
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    by_name = {p["parameter_name"]: p for p in parameters}
    for name in ("flow_shift", "guidance_scale", "use_dynamic_cfg", "fps", "num_inference_steps", "sigmas", "loras"):
        assert by_name[name]["parameter_has_default"] and by_name[name]["parameter_default"] is None, name
    assert by_name["image_channel"]["parameter_default"] == "estimate"
    assert by_name["step_cache"]["parameter_default"] == "off"


def test_api_takes_a_sigma_list_on_wan_and_refuses_it_on_cogvideox(wan_app):
    """Steps left out follow the list's length (the API's steps default to automatic); the sidecar records the
    sigmas, and the flow shift is 1 (the sigmas are final values). CogVideoX refuses a sigma list in one line."""
    from gradio_client.exceptions import AppError

    _, client = wan_app
    small = dict(prompt="waves", num_frames=9, height=32, width=48, guidance_scale=1)
    *_, files, status = client.predict(model=WAN, sigmas="1, 0.9375, 0.8333, 0.625", scheduler="lcm",
                                       api_name="/generate", **small)
    assert status.startswith("Done."), status
    settings = _settings(files)
    assert settings["sigmas"] == [1.0, 0.9375, 0.8333, 0.625] and settings["num_inference_steps"] == 4
    assert (settings["flow_shift"], settings["scheduler"]) == (1.0, "lcm")
    *_, files, _ = client.predict(model=WAN, sigmas=[1, 0.5], api_name="/generate", **small)  # a JSON list
    assert _settings(files)["num_inference_steps"] == 2
    with pytest.raises(AppError, match=r"^sigmas apply to flow-matching models \(Wan\) only"):
        client.predict(sigmas="1, 0.5", api_name="/generate", **small)


def test_api_generates_a_wan_loop_with_the_wan_recommendations(wan_app):
    """Knobs left out follow the named model: on Wan guidance 5, fps 16, no dynamic CFG and the automatic flow
    shift (the API used to send the start-up model's guidance 6 and fps 8 to every model)."""
    from loopui.media import load_video

    studio, client = wan_app
    small = dict(prompt="waves", num_frames=9, height=32, width=48, num_inference_steps=2)
    video, _, _, files, status = client.predict(model=WAN, api_name="/generate", **small)
    assert status.startswith("Done."), status
    frames, fps = load_video(Path(video["path"] if isinstance(video, dict) else video))
    assert frames.shape == (12, 32, 48, 3) and fps == 16  # L = 3 latents -> 4·L frames
    settings = _settings(files)
    assert (settings["model"], settings["family"], settings["guidance_scale"], settings["fps"]) == (WAN, "wan", 5, 16)
    assert (settings["use_dynamic_cfg"], settings["flow_shift"], settings["image_channel"]) == (False, 3.0, None)
    # Explicit values win, "auto" is automatic; the loaded model is reused.
    *_, files, _ = client.predict(model=WAN, flow_shift=5, scheduler="euler", guidance_scale="auto",
                                  api_name="/generate", **small)
    settings = _settings(files)
    assert (settings["flow_shift"], settings["scheduler"], settings["guidance_scale"]) == (5.0, "euler", 5.0)
    assert settings["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert studio.manager.load_count == 1
    # The same call without a model: the demo CogVideoX and its own recommendations.
    *_, files, _ = client.predict(api_name="/generate", **small)
    settings = _settings(files)
    assert (settings["family"], settings["guidance_scale"], settings["fps"], settings["flow_shift"]) == \
        ("cogvideox", 6.0, 8, None)


def test_api_takes_a_speed_recipe_and_the_page_offers_the_models_recipes(wan_app, tmp_path):
    """``recipe="causvid-3step"`` fills the knobs left out (steps, guidance 1, LCM, its sigmas) and adds its LoRA --
    here a downloaded copy (written in code) that stands in for the hub file; the sidecar records the recipe. An
    unknown recipe is one line naming ``recipe``; the page's dropdown lists the chosen model's recipes."""
    from gradio_client.exceptions import AppError

    from loopui.testing.faithful import build_faithful_pipeline
    from loopui.testing.lora_files import write_lora
    from loopui.ui.updates import recipe_update

    _, client = wan_app
    stand_in = write_lora(build_faithful_pipeline(WAN).transformer,
                          tmp_path / "dl" / "Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors", "comfy")
    small = dict(prompt="waves", num_frames=9, height=32, width=48)
    *_, files, status = client.predict(model=WAN, recipe="causvid-3step", loras=[str(stand_in)],
                                       api_name="/generate", **small)
    assert status.startswith("Done.") and "stands in for its Kijai/WanVideo_comfy/" in status, status
    path = next(Path(f["path"] if isinstance(f, dict) else f) for f in files if str(f).endswith(".json")
                or (isinstance(f, dict) and f["path"].endswith(".json")))
    sidecar = json.loads(path.read_text())
    assert sidecar["recipe"] == {"name": "causvid-3step",
                                 "filled": ["num_inference_steps", "guidance_scale", "scheduler", "sigmas"]}
    settings = sidecar["settings"]
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["scheduler"]) == (3, 1.0, "lcm")
    with pytest.raises(AppError, match=r"^recipe: unknown recipe 'turbo'"):
        client.predict(model=WAN, recipe="turbo", api_name="/generate", **small)
    assert [value for _, value in recipe_update(WAN)["choices"]] == ["", "causvid-3step"]
    assert not recipe_update("THUDM/CogVideoX-5b")["interactive"]
