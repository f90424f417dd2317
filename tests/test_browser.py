"""The studio in a real browser: Playwright driving Debian's chromium against the demo app.

Skipped when chromium or playwright is missing, except under CI (``CI`` set), where ``.ci/run`` installs them and a
missing browser must fail loudly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from served_app import demo_studio, serve

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this must not be skipped)")
    pytest.skip(reason)


def _playwright_and_chromium():
    """``(sync_playwright, chromium path)``: skipped where either is missing (a failure when CI is set)."""
    from loopui.testing.browser import chromium_executable

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _require(sync_playwright is not None, "playwright is not installed (pip install playwright)")
    chromium = chromium_executable()
    _require(chromium is not None, "chromium not found at /usr/bin/chromium (apt-get install chromium)")
    return sync_playwright, chromium


def _generate(page, timeout: float) -> str:
    """Click Generate and wait until the status says Done or Failed (or an error toast shows); the status text."""
    page.locator("#loopui-generate").click()
    page.wait_for_function("() => /Done|Failed/.test(document.querySelector('#loopui-status').innerText)"
                           " || document.querySelector('.toast-body')", timeout=timeout)
    return page.locator("#loopui-status").inner_text()


def wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def served_demo(tmp_path):
    """The demo app on a free port, rembg pointed at a tiny u2netp; yields (studio, url)."""
    pytest.importorskip("gradio")
    studio = demo_studio(tmp_path / "sessions")
    with serve(studio, tmp_path / "rembg") as demo:
        yield studio, demo.local_url


def test_page_previews_the_mask_and_plays_a_looping_video(served_demo, tmp_path):
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT, drive_studio

    sync_playwright, chromium = _playwright_and_chromium()

    studio, url = served_demo
    shot = tmp_path / "studio.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            assert not page.get_by_text("Anchor strength", exact=True).first.is_visible()  # no image yet
            report = drive_studio(page, url, "a red balloon drifting past clouds", ASSETS / "balloon.png",
                                  screenshot=shot, timeout_s=90)
            # A gallery click restores the loop's settings into the inputs.
            seed_box = page.locator("#loopui-seed input")
            seed_box.fill("7")
            page.locator("#loopui-gallery .thumbnail-item").first.click()
            page.wait_for_function("() => /Restored the settings of loop #1/.test("
                                   "document.querySelector('#loopui-status').innerText)", timeout=10000)
            restored_seed = seed_box.input_value()
            # Read before the browser closes: closing the tab deletes the session's files.
            sidecar = json.loads(next(Path(studio.output_root).rglob("*.json")).read_text())
        finally:
            browser.close()

    # The mask preview came from the (tiny) saliency model and was drawn into the editor.
    assert "may move" in report.mask_note and "u2netp" in report.mask_note
    assert report.mask_has_image and report.image_controls_visible
    assert restored_seed == "42"
    # A looping, autoplaying <video> whose source the server serves as an MP4 the browser could parse.
    video = report.video
    assert video["loop"] is True and video["autoplay"] is True
    assert video["status"] in (200, 206) and video["contentType"] == "video/mp4"
    assert video["error"] is None
    assert video["readyState"] >= 1 and video["duration"] == pytest.approx(52 / 8, abs=0.2)
    assert (video["width"], video["height"]) == (96, 64)
    assert "Done." in report.status and "Seam ratio" in report.seam
    assert report.gallery_items >= 1
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert studio.manager.load_count == 1
    assert wait_until(lambda: not any(Path(studio.output_root).rglob("*.json")), 10), "tab closed, files kept"
    # The painted stroke travelled with the request: the sidecar names the mask file the engine was given.
    assert sidecar["settings"]["image"] and sidecar["settings"]["mask"]
    painted = np.asarray(Image.open(sidecar["settings"]["mask"]).convert("L"))
    assert painted.shape == (320, 480)
    # The stroke crosses the sky, which the (tiny) saliency model calls background: those pixels now may move.
    sky_painted = (painted == 255) & (studio.masks.preview(str(ASSETS / "balloon.png"), "u2netp", 0.5, 0, 0,
                                                          "object").mask == 0)
    assert sky_painted.sum() > 300, f"stroke not in the mask (rows {np.nonzero(sky_painted.any(1))[0]})"
    assert painted[5, 5] == 0  # unpainted sky stays still


def test_page_layout_keeps_generate_in_reach_and_labels_readable(served_demo):
    """Desktop: no model name under the dropdown arrow, no mask label under the editor's toolbar. Phone (390 px):
    the prompt, Generate and the player come first (Generate used to be ~3,600 px down)."""
    from loopui.testing.browser import (CHROMIUM_ARGS, PHONE_VIEWPORT, VIEWPORT, layout_report)

    sync_playwright, chromium = _playwright_and_chromium()

    _, url = served_demo
    reports = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for name, viewport, mobile in (("desktop", VIEWPORT, False), ("phone", PHONE_VIEWPORT, True)):
                context = browser.new_context(viewport=viewport, is_mobile=mobile, has_touch=mobile)
                page = context.new_page()
                page.goto(url, wait_until="domcontentloaded")
                page.locator("#loopui-generate").wait_for(state="visible", timeout=60000)
                page.locator("#loopui-mask .top-panel").wait_for(state="attached", timeout=10000)
                reports[name] = layout_report(page)
                context.close()
        finally:
            browser.close()

    for name, report in reports.items():
        assert report["model_text_right"] <= report["model_arrow_left"] + 0.5, (name, report)
        assert not report["mask_label_hidden_by_toolbar"], (name, report)
    phone = reports["phone"]
    assert phone["page_width"] <= PHONE_VIEWPORT["width"]  # nothing scrolls sideways
    assert phone["prompt"]["y"] < phone["generate"]["y"] < phone["video"]["y"]
    assert phone["generate"]["bottom"] <= PHONE_VIEWPORT["height"]  # on the first screen, under the prompt
    assert phone["video"]["y"] < 1.5 * PHONE_VIEWPORT["height"]
    desktop = reports["desktop"]
    assert desktop["generate"]["bottom"] <= VIEWPORT["height"] and desktop["video"]["y"] < VIEWPORT["height"]


@pytest.fixture
def served_families(tmp_path, faithful_wan_dir):
    """The demo app whose manager serves Wan 2.1 T2V 1.3B from its config-faithful tiny folder; (studio, url)."""
    pytest.importorskip("gradio")
    from faithful_serving import FaithfulManager

    studio = demo_studio(tmp_path / "sessions",
                         manager=FaithfulManager({"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": faithful_wan_dir}))
    with serve(studio) as demo:
        yield studio, demo.local_url


def test_every_knob_follows_the_model_wan_and_cogvideox_5b_i2v(served_families, tmp_path):
    """Choosing Wan 2.1 1.3B sets fps 16, guidance 5, the flow-matching schedulers, locks dynamic CFG and opens the
    flow shift; a loop made on the page plays at 16 fps. Choosing CogVideoX-5b-I2V leaves only its native size (the
    preview keeps it), locks width/height, starts the loop length at 49 and forces the window mode past it."""
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT

    sync_playwright, chromium = _playwright_and_chromium()

    studio, url = served_families
    seen: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#loopui-generate").wait_for(state="visible", timeout=60000)
            page.get_by_text("Advanced", exact=True).click()

            def close_lists() -> None:
                page.locator("#loopui-intro h1").click()  # a click elsewhere closes an open dropdown list

            def option_list(elem: str):
                field = page.locator(f"#{elem} input")
                field.click()
                listbox = page.locator(f"#{field.get_attribute('aria-controls')}")
                listbox.wait_for(state="visible", timeout=5000)
                return listbox

            def options(elem: str) -> list[str]:
                texts = option_list(elem).get_by_role("option").all_inner_texts()
                close_lists()
                page.locator(f"#{elem} ul[role=listbox]").wait_for(state="detached", timeout=5000)
                return [t.replace("✓", "").strip() for t in texts]

            def choose_model(label: str, note: str) -> None:
                option_list("loopui-model").get_by_role("option", name=label).first.click()
                page.wait_for_function(f"() => document.querySelector('#loopui-model-note').innerText"
                                       f".includes({json.dumps(note)})", timeout=10000)

            def number(elem: str) -> str:
                return page.locator(f"#{elem} input[type=number]").input_value()

            def set_number(elem: str, value: str, box: str = "input[type=number]") -> None:
                field = page.locator(f"#{elem} {box}")
                field.fill(value)
                field.press("Enter")
                page.wait_for_function(f"() => document.querySelector('#{elem} {box}').value === '{value}'")

            choose_model("Wan-AI/Wan2.1-T2V-1.3B", "Wan 2.1 1.3B text-to-video")
            seen["wan"] = dict(
                fps=number("loopui-fps"), guidance=number("loopui-guidance"),
                schedulers=options("loopui-scheduler"), resolutions=options("loopui-resolution"),
                dynamic_disabled=page.locator("#loopui-dynamic-cfg input").is_disabled(),
                flow_disabled=page.locator("#loopui-flow-shift input").is_disabled(),
                note=page.locator("#loopui-model-note").inner_text())
            # A small loop from the page itself (its values, its conversions): 9 frames at 48x32, 2 steps.
            set_number("loopui-width", "48", "input")
            set_number("loopui-height", "32", "input")
            set_number("loopui-frames", "9")
            page.locator("#loopui-prompt textarea").fill("waves at dusk")
            seen["wan_status"] = _generate(page, timeout=120000)
            seen["wan_sidecar"] = json.loads(next(Path(studio.output_root).rglob("*.json")).read_text())

            choose_model("THUDM/CogVideoX-5b-I2V", "CogVideoX 5B image-to-video")
            seen["i2v"] = dict(
                resolutions=options("loopui-resolution"),
                width_disabled=page.locator("#loopui-width input").is_disabled(),
                frames_min=page.locator("#loopui-frames input[type=range]").get_attribute("min"),
                frames=number("loopui-frames"), fps=number("loopui-fps"),
                flow_disabled=page.locator("#loopui-flow-shift input").is_disabled())
            set_number("loopui-frames", "97")
            page.wait_for_function("() => document.querySelector('#loopui-window input').disabled", timeout=10000)
            seen["i2v_97"] = dict(window=page.locator("#loopui-window input:checked").get_attribute("value"),
                                  note=page.locator("#loopui-window").inner_text(),
                                  rope_disabled=page.locator("#loopui-rope input[type=range]").is_disabled())
            page.get_by_role("button", name="Use preview settings").click()
            page.wait_for_function("() => document.querySelector('#loopui-frames input[type=number]').value === "
                                   "'49'", timeout=10000)
            seen["i2v_preview"] = page.locator("#loopui-resolution input").input_value()
            # The gallery brings the Wan loop back: its model, with that model's knobs, and the loop's own values.
            page.locator("#loopui-gallery .thumbnail-item").first.click()
            page.wait_for_function("() => /Restored the settings of loop #1/.test("
                                   "document.querySelector('#loopui-status').innerText)", timeout=10000)
            seen["restored"] = dict(note=page.locator("#loopui-model-note").inner_text(), fps=number("loopui-fps"),
                                    width=page.locator("#loopui-width input").input_value(),
                                    frames=number("loopui-frames"),
                                    resolution=page.locator("#loopui-resolution input").input_value(),
                                    schedulers=options("loopui-scheduler"),
                                    dynamic_disabled=page.locator("#loopui-dynamic-cfg input").is_disabled())
        finally:
            browser.close()

    wan = seen["wan"]
    assert (wan["fps"], wan["guidance"]) == ("16", "5")
    assert wan["schedulers"] == ["Automatic: the model's own scheduler", "UniPC (flow matching)",
                                 "Euler (flow matching)", "LCM (flow matching, re-noising: distilled few-step models)"]
    assert wan["resolutions"][0] == "Model's native size (832x480)" and "Custom" in wan["resolutions"]
    assert wan["dynamic_disabled"] and not wan["flow_disabled"]
    assert "Apache-2.0" in wan["note"] and "14 GB with CPU offload" in wan["note"]
    assert seen["wan_status"].startswith("Done. 12 frames · 48x32"), seen["wan_status"]
    settings = seen["wan_sidecar"]["settings"]
    assert (settings["family"], settings["fps"], settings["guidance_scale"], settings["flow_shift"]) == \
        ("wan", 16, 5.0, 3.0)
    assert settings["use_dynamic_cfg"] is False and settings["num_output_frames"] == 12
    i2v = seen["i2v"]
    assert i2v["resolutions"] == ["Model's native size (720x480)"]
    assert i2v["width_disabled"] and i2v["flow_disabled"]
    assert (i2v["frames_min"], i2v["frames"], i2v["fps"]) == ("49", "49", "8")
    assert seen["i2v_97"]["window"] == "window" and "Forced to 'window'" in seen["i2v_97"]["note"]
    assert seen["i2v_97"]["rope_disabled"]
    assert seen["i2v_preview"] == "Model's native size (720x480)"  # the preview offers no size it refuses
    restored = seen["restored"]
    assert "Wan 2.1 1.3B" in restored["note"] and restored["dynamic_disabled"]
    assert (restored["fps"], restored["width"], restored["frames"], restored["resolution"]) == ("16", "48", "9",
                                                                                              "Custom")
    assert restored["schedulers"] == wan["schedulers"]


def test_a_gpu_server_generates_at_the_native_size_from_empty_size_boxes(tmp_path):
    """With a GPU the page starts at the model's native size: the width/height boxes are empty ("automatic"). The
    browser used to send a box built empty as 0, so the first Generate failed with "Value 0 is less than minimum
    value 16."."""
    pytest.importorskip("gradio")
    from loopui.studio import Studio
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT

    sync_playwright, chromium = _playwright_and_chromium()

    studio = Studio(model_id="demo", has_gpu=True, devices="cpu", output_root=tmp_path / "sessions")
    assert studio.knobs.default_resolution() == "native"
    with serve(studio) as demo:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(demo.local_url, wait_until="domcontentloaded")
                page.locator("#loopui-generate").wait_for(state="visible", timeout=60000)
                # Empty once the page has loaded (the load event sets the boxes; before it they showed 0).
                page.wait_for_function("() => document.querySelector('#loopui-width input')?.value === ''",
                                       timeout=10000)
                page.locator("#loopui-prompt textarea").fill("waves")
                steps = page.locator("#loopui-steps input[type=number]")
                steps.fill("2")
                steps.press("Enter")
                status = _generate(page, timeout=60000)
                toasts = page.locator(".toast-body").all_inner_texts()
            finally:
                browser.close()
    assert toasts == [] and status.startswith("Done. 52 frames · 96x64"), (status, toasts)


def test_a_clip_uploaded_in_the_page_becomes_a_loop(served_demo, clip_files):
    """The clip upload (a stock gr.Video, the file as given) reaches the engine from a real browser: adding it sets
    Init strength to the engine's clip default, unlocks Loop region and locks Anchor strength (inert with a clip);
    Generate makes a loop of the clip; removing the clip puts the knobs back (seen with an image added)."""
    from loopui.engine.plan import CLIP_INIT_STRENGTH
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT

    sync_playwright, chromium = _playwright_and_chromium()

    studio, url = served_demo
    region = "#loopui-loop-region input[type=range]"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#loopui-generate").wait_for(state="visible", timeout=60000)
            before = {"region_disabled": page.locator(region).is_disabled(),
                      "anchor_visible": page.get_by_text("Anchor strength", exact=True).first.is_visible()}
            page.locator("#loopui-prompt textarea").fill("a bar sliding")
            page.locator("#loopui-clip input[type=file]").set_input_files(str(clip_files["good"]))
            page.wait_for_function(f"() => !document.querySelector('{region}').disabled", timeout=30000)
            init = page.locator("#loopui-init input[type=number]").input_value()
            anchor_disabled = page.locator("#loopui-anchor input[type=range]").is_disabled()
            region_box = page.locator("#loopui-loop-region input[type=number]")
            region_box.fill("0.5")
            region_box.press("Enter")
            status = _generate(page, timeout=90000)
            sidecar = json.loads(next(Path(studio.output_root).rglob("*.json")).read_text())
            page.locator("#loopui-clip button[aria-label=Clear]").click()
            page.wait_for_function(f"() => document.querySelector('{region}').disabled", timeout=10000)
            # Without a clip or an image the image controls hide; an image brings them back, at the page's start.
            page.locator("#loopui-image input[type=file]").set_input_files(str(ASSETS / "balloon.png"))
            init_after = page.locator("#loopui-init input[type=number]").input_value(timeout=30000)
            anchor_after = page.locator("#loopui-anchor input[type=range]").is_disabled()
        finally:
            browser.close()

    assert before == {"region_disabled": True, "anchor_visible": False}
    assert float(init) == CLIP_INIT_STRENGTH and anchor_disabled
    assert status.startswith("Done. 52 frames · 96x64") and "video: the clip lasts 2.50 s" in status, status
    settings = sidecar["settings"]
    assert Path(settings["video"]).name == "bar.mp4"
    assert (settings["loop_region"], settings["init_strength"]) == (0.5, CLIP_INIT_STRENGTH)
    assert float(init_after) == 1.0 and not anchor_after


def test_the_page_uses_the_servers_loras_and_its_steps_follow_the_model(tmp_path):
    """--lora-dir's files are offered by file name: a pick at scale 0.5 reaches the loop (the sidecar records it
    with its sha256). A model change sets Steps to the model's planned steps (40 on Wan 2.2 A14B, 50 on
    CogVideoX-5b) and opens the sigma box and the expert choice where the model takes them (locked on CogVideoX)."""
    pytest.importorskip("gradio")
    import hashlib

    from loopui.models.demo import build_tiny_cogvideox
    from loopui.studio import Studio
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT
    from loopui.testing.lora_files import write_lora

    sync_playwright, chromium = _playwright_and_chromium()
    paper = write_lora(build_tiny_cogvideox().transformer, tmp_path / "loras" / "paper.safetensors", seed=1)
    studio = Studio(model_id="demo", has_gpu=True, devices="cpu", output_root=tmp_path / "sessions",
                    lora_dir=tmp_path / "loras")
    seen: dict = {}
    with serve(studio) as demo, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(demo.local_url, wait_until="domcontentloaded")
            page.locator("#loopui-generate").wait_for(state="visible", timeout=60000)
            page.get_by_text("Advanced", exact=True).click()
            page.get_by_text("LoRAs (1 on this server; or upload your own)").click()

            def state() -> dict:
                return dict(steps=page.locator("#loopui-steps input[type=number]").input_value(),
                            sigmas_disabled=page.locator("#loopui-sigmas textarea, #loopui-sigmas input")
                            .first.is_disabled(),
                            expert_disabled=page.locator("#loopui-lora-expert input").first.is_disabled())

            def choose_model(label: str, note: str) -> None:
                field = page.locator("#loopui-model input")
                field.click()
                listbox = page.locator(f"#{field.get_attribute('aria-controls')}")
                listbox.get_by_role("option", name=label).first.click()
                page.wait_for_function(f"() => document.querySelector('#loopui-model-note').innerText"
                                       f".includes({json.dumps(note)})", timeout=10000)

            seen["demo"] = state()
            picks = page.locator("#loopui-lora-picks input")
            picks.click()
            page.locator(f"#{picks.get_attribute('aria-controls')}").get_by_role(
                "option", name="paper.safetensors").click()
            page.locator("#loopui-intro h1").click()  # closes the list
            for elem, value in (("loopui-lora-scale", "0.5"), ("loopui-steps", "2")):
                box = page.locator(f"#{elem} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.locator("#loopui-prompt textarea").fill("a paper boat")
            seen["status"] = _generate(page, timeout=90000)
            seen["sidecar"] = json.loads(next(Path(studio.output_root).rglob("*.json")).read_text())
            choose_model("Wan-AI/Wan2.2-T2V-A14B", "Wan 2.2 A14B text-to-video")
            page.wait_for_function("() => document.querySelector('#loopui-steps input[type=number]').value === '40'",
                                   timeout=10000)
            seen["a14b"] = state()
            choose_model("THUDM/CogVideoX-5b · CogVideoX · 26 GB", "CogVideoX 5B text-to-video")
            page.wait_for_function("() => document.querySelector('#loopui-steps input[type=number]').value === '50'",
                                   timeout=10000)
            seen["cog"] = state()
        finally:
            browser.close()

    assert seen["demo"] == {"steps": "50", "sigmas_disabled": True, "expert_disabled": True}
    assert seen["status"].startswith("Done. 52 frames · 96x64"), seen["status"]
    assert seen["sidecar"]["settings"]["loras"] == [{
        "source": "paper.safetensors", "file": "paper.safetensors", "scale": 0.5, "expert": "both",
        "sha256": hashlib.sha256(paper.read_bytes()).hexdigest()}]
    assert seen["sidecar"]["settings"]["num_inference_steps"] == 2
    assert seen["a14b"] == {"steps": "40", "sigmas_disabled": False, "expert_disabled": False}
    assert seen["cog"] == {"steps": "50", "sigmas_disabled": True, "expert_disabled": True}
