"""Drive the studio page in a real browser (Playwright + Debian's chromium): the browser test and
``scripts/screenshot.py`` both use :func:`drive_studio`, so the screenshot shows exactly what the test checks.

Playwright is imported by the callers; this module only needs a Playwright ``Page``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

CHROMIUM_PATH = "/usr/bin/chromium"
# No GPU, no sandbox (containers), and nothing that phones home: the page must work fully offline.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1440, "height": 1200}
PHONE_VIEWPORT = {"width": 390, "height": 844}  # a common phone screen, in CSS pixels

# Where the page's key parts are (CSS pixels from the top of the page) and whether labels collide with controls.
_LAYOUT_JS = """() => {
  const box = (sel) => { const el = document.querySelector(sel); if (!el) return null;
    const r = el.getBoundingClientRect(); return {x: r.x, y: r.y + window.scrollY, w: r.width, h: r.height,
                                                  right: r.right, bottom: r.bottom + window.scrollY}; };
  const overlap = (a, b) => !!a && !!b && a.x < b.right && b.x < a.right && a.y < b.bottom && b.y < a.bottom;
  const input = document.querySelector('#loopui-model input');
  const style = input ? getComputedStyle(input) : null;
  const arrow = box('#loopui-model .icon-wrap');
  const inputBox = box('#loopui-model input');
  const label = box('#loopui-mask label[data-testid=block-label]');
  const panel = box('#loopui-mask .top-panel');
  return {
    prompt: box('#loopui-prompt'), generate: box('#loopui-generate'), video: box('#loopui-video'),
    page_height: document.documentElement.scrollHeight, page_width: document.documentElement.scrollWidth,
    // The model's text area must end before the dropdown arrow starts (else the name runs under it).
    model_text_right: inputBox && style ? inputBox.right - parseFloat(style.paddingRight) : null,
    model_arrow_left: arrow ? arrow.x : null,
    mask_label_hidden_by_toolbar: overlap(label, panel),
  };
}"""

# Reads the <video> element's playback state; fetches its source so a missing/forbidden file shows up as a status.
_VIDEO_STATE_JS = """async (el) => {
  let status = null, type = null;
  try {
    const r = await fetch(el.currentSrc || el.src, {method: 'GET'});
    status = r.status; type = r.headers.get('content-type');
  } catch (e) { status = String(e); }
  return {loop: el.loop, autoplay: el.autoplay, readyState: el.readyState, duration: el.duration,
          paused: el.paused, src: el.currentSrc || el.src, error: el.error ? el.error.code : null,
          status: status, contentType: type, width: el.videoWidth, height: el.videoHeight};
}"""


def chromium_executable() -> Optional[str]:
    """The chromium binary to drive (``$LOOPUI_CHROMIUM``, else Debian's ``/usr/bin/chromium``), or None."""
    candidate = os.environ.get("LOOPUI_CHROMIUM") or CHROMIUM_PATH
    if Path(candidate).is_file():
        return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageReport:
    """What one drive through the page saw (times in seconds, measured in the browser's wall clock)."""

    mask_seconds: float
    mask_note: str
    mask_has_image: bool
    image_controls_visible: bool
    generate_seconds: float
    status: str
    seam: str
    video: dict = field(default_factory=dict)
    gallery_items: int = 0
    screenshot: Optional[Path] = None


def layout_report(page: Any) -> dict:
    """Positions of the prompt, Generate and the player, the page's size, and the two label collisions that used to
    happen (model name under the dropdown arrow, mask editor label under its toolbar)."""
    return page.evaluate(_LAYOUT_JS)


def _paint_stroke(page: Any) -> None:
    """Paint one horizontal "may move" stroke across the lower middle of the mask editor's canvas."""
    canvas = page.locator("#loopui-mask canvas").first
    canvas.scroll_into_view_if_needed()
    page.locator("#loopui-mask button[aria-label=Brush]").click()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.62
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x + i * box["width"] * 0.02, y, steps=2)
    page.mouse.up()


def drive_studio(page: Any, url: str, prompt: str, image: Path, screenshot: Optional[Path] = None,
                 timeout_s: float = 120.0, paint: bool = True) -> PageReport:
    """Open the page, type ``prompt``, upload ``image``, wait for the mask preview, paint a stroke (``paint``),
    Generate, wait for the loop.

    Returns what was seen; raises Playwright's ``TimeoutError`` when a step does not happen in time.
    """
    timeout_ms = timeout_s * 1000
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#loopui-generate").wait_for(state="visible", timeout=timeout_ms)
    page.locator("#loopui-prompt textarea").fill(prompt)

    # 1. Reference image -> mask preview (the note appears when the overlay has been computed).
    start = time.perf_counter()
    page.locator("#loopui-image input[type=file]").set_input_files(str(image))
    note = page.locator("#loopui-mask-note")
    # The note's final text (not Gradio's pending timer): a mask, a missing-weights note, or "everything".
    page.wait_for_function(
        "() => { const n = document.querySelector('#loopui-mask-note');"
        " return n && /may move|No automatic mask|Motion region/.test(n.innerText); }",
        timeout=timeout_ms)
    mask_seconds = time.perf_counter() - start
    mask_note = note.inner_text().strip()
    # The editor shows the overlay as its background image (an <img> or a drawn canvas, depending on version).
    has_image = page.locator("#loopui-mask img, #loopui-mask canvas").count() > 0
    controls = page.get_by_text("Anchor strength", exact=True).first
    controls.wait_for(state="visible", timeout=5000)  # image-mode knobs appear once an image is present
    controls_visible = controls.is_visible()
    if paint:
        _paint_stroke(page)

    # 2. Generate -> a <video> with a source.
    start = time.perf_counter()
    page.locator("#loopui-generate").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#loopui-video video'); return v && (v.currentSrc || v.src); }",
        timeout=timeout_ms)
    generate_seconds = time.perf_counter() - start
    video_el = page.locator("#loopui-video video").first
    # Metadata loads asynchronously; give the element a moment to parse the MP4 header.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "() => { const v = document.querySelector('#loopui-video video'); return v && v.readyState >= 1; }",
            timeout=15000)
    except PlaywrightTimeout as exc:  # reported through readyState 0 below; the caller decides
        logger.warning("video metadata did not load: %s", exc)
    state = video_el.evaluate(_VIDEO_STATE_JS)
    page.wait_for_function(
        "() => { const s = document.querySelector('#loopui-status'); return s && /Done|Stopped/.test(s.innerText); }",
        timeout=timeout_ms)
    status = page.locator("#loopui-status").inner_text().strip()
    seam = page.locator("#loopui-seam").inner_text().strip()
    gallery_items = page.locator("button.thumbnail-item, .thumbnail-item").count()
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    return PageReport(mask_seconds=mask_seconds, mask_note=mask_note, mask_has_image=has_image,
                      image_controls_visible=controls_visible, generate_seconds=generate_seconds, status=status,
                      seam=seam, video=state, gallery_items=gallery_items, screenshot=screenshot)
