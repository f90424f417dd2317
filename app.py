"""loopui web app: ``python app.py`` (real models, lazy-loaded; on a ZeroGPU Space loaded at start-up) or
``python app.py --demo`` (tiny random model). ``--devices cuda:0,cuda:1`` serves one page from several GPUs.

Thin on purpose: parse arguments, build the Blocks with ``loopui.ui.build_app``, launch.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("loopui.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the app."""
    parser = argparse.ArgumentParser(description="loopui: seamless looping videos in the browser.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, metavar="ID_OR_DIR",
                       help="default model: a registry id or a local diffusers folder (loaded on first Generate)")
    which.add_argument("--demo", action="store_true",
                       help="use the tiny random-weight model built in code (abstract noise; no GPU, no download)")
    parser.add_argument("--mcp", action="store_true", help="also serve the API as an MCP server (needs gradio[mcp])")
    parser.add_argument("--devices", default=None, metavar="LIST",
                        help="GPUs to serve from, e.g. cuda:0,cuda:1: one generation runs on each at a time, each "
                             "with its own copy of the model (default: every visible GPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build and serve the app until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from loopui.ui import Studio, build_app, launch_options
    from loopui.ui.spaces_compat import on_zero_gpu

    zero_gpu = on_zero_gpu()
    try:
        studio = Studio(model_id=args.model, demo=args.demo, devices=args.devices, zero_gpu=zero_gpu)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if zero_gpu:
        # ZeroGPU's pattern: weights to "cuda" at start-up, outside any GPU call (CUDA is emulated here), so a
        # visitor's GPU seconds are spent generating rather than loading the model again in every fresh worker.
        studio.preload()
    demo = build_app(studio)
    studio.warm_up()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, mcp_server=args.mcp or None,
                prevent_thread_lock=True, **launch_options())
    if args.mcp and not demo.mcp_server:
        logger.warning("--mcp was given but the MCP server is not running: install the extra with "
                       "`pip install \"gradio[mcp]\"` and restart")
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
