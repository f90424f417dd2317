"""Regenerate ``assets/screenshot.png``: the demo app driven in headless chromium (prompt, image, mask, loop).

Run: ``python scripts/screenshot.py`` (needs playwright and /usr/bin/chromium). Without real u2netp weights the
mask preview uses the tests' tiny stand-in (a red-minus-blue detector), which suits the example images.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

logger = logging.getLogger("screenshot")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    """Launch the demo app, drive it, save the screenshot and log the measured times."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    parser.add_argument("--image", type=Path, default=ROOT / "assets" / "balloon.png")
    parser.add_argument("--prompt", default="a red hot-air balloon drifting past slow clouds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from loopui.saliency import weights_available
    from loopui.testing.browser import CHROMIUM_ARGS, VIEWPORT, chromium_executable, drive_studio

    chromium = chromium_executable()
    if chromium is None:
        logger.error("chromium not found (set LOOPUI_CHROMIUM or install Debian's chromium)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        if not weights_available("u2netp"):
            from saliency_fixtures import install_tiny_u2netp

            os.environ["U2NET_HOME"] = tmp
            os.environ["MODEL_CHECKSUM_DISABLED"] = "1"
            install_tiny_u2netp(Path(tmp))
            logger.info("u2netp weights not found: using the tiny stand-in for the mask preview")
        from playwright.sync_api import sync_playwright

        from loopui.studio import Studio
        from loopui.ui import build_app, launch_options

        studio = Studio(demo=True)
        demo = build_app(studio)
        studio.warm_up().join()  # as app.py does; measured times are then those a user sees
        demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True, **launch_options())
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                report = drive_studio(page, demo.local_url, args.prompt, args.image, screenshot=args.out)
                browser.close()
        finally:
            demo.close()
    logger.info("mask preview %.2f s, generation %.2f s (browser clock: upload to overlay, click to <video>)",
                report.mask_seconds, report.generate_seconds)
    logger.info("video: %s", report.video)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
