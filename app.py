"""loopui web app: ``python app.py`` (real models, lazy-loaded; on a ZeroGPU Space loaded at start-up) or
``python app.py --demo`` (tiny random model). ``--devices cuda:0,cuda:1`` serves one page from several GPUs.

Thin on purpose: parse arguments, make the service (``loopui.studio.Studio``), build the Blocks with
``loopui.ui.build_app`` (the page and its events), launch.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

logger = logging.getLogger("loopui.app")

EXIT_USAGE = 2


HOUSEKEEPING_DEFAULTS = {"keep_hours": ("LOOPUI_KEEP_HOURS", 24.0), "keep_gb": ("LOOPUI_KEEP_GB", 2.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the app."""
    parser = argparse.ArgumentParser(
        description="loopui: seamless looping videos in the browser.",
        epilog="How the models run, from the environment (the page's 'auto'; a bad value stops the app at start): "
               "LOOPUI_ATTENTION=native|flash|flash3|sage|xformers (default: the fastest installed kernel that fits "
               "the GPU), LOOPUI_COMPILE=1 (compile the transformer blocks), LOOPUI_QUANTIZE=none|fp8|int8, "
               "LOOPUI_OFFLOAD=none|model|group|sequential (default: chosen from free VRAM).")
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
    parser.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                        help="public mode for a shared server: registry models only (no local folders), capped "
                             "steps, frames and size, small uploads (default: on when running on a Hugging Face "
                             "Space, i.e. SPACE_ID is set)")
    parser.add_argument("--lora-dir", default=None, metavar="DIR",
                        help="a folder of .safetensors LoRAs offered on the page by file name (the API names them "
                             "the same way); in public mode the only LoRAs a request may use")
    parser.add_argument("--keep-hours", type=float, default=None, metavar="H",
                        help="delete generated files older than this (default 24, or LOOPUI_KEEP_HOURS)")
    parser.add_argument("--keep-gb", type=float, default=None, metavar="GB",
                        help="keep generated files below this total size, oldest deleted first (default 2, or "
                             "LOOPUI_KEEP_GB)")
    args = parser.parse_args(argv)
    if args.public is None:
        args.public = bool(os.environ.get("SPACE_ID"))
    for name, (variable, default) in HOUSEKEEPING_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) is None:
            text = os.environ.get(variable, "").strip()
            try:
                setattr(args, name, float(text) if text else default)
            except ValueError:
                parser.error(f"{variable} must be a number, got {text!r}")
            flag = variable
        value = getattr(args, name)
        if not (value > 0 and value != float("inf")):
            parser.error(f"{flag} must be a positive number, got {value!r}")
    return args


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (checked before the model and the page are built)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _busy(port: int) -> int:
    print(f"loopui: error: port {port} is busy: use --port (for example --port {port + 1})", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Build and serve the app until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not port_is_free(args.host, args.port):
        return _busy(args.port)
    from loopui.studio import Studio
    from loopui.studio.zerogpu import on_zero_gpu
    from loopui.ui import build_app, launch_options

    zero_gpu = on_zero_gpu()
    try:
        studio = Studio(model_id=args.model, demo=args.demo, devices=args.devices, zero_gpu=zero_gpu,
                        public=args.public, max_output_age_s=args.keep_hours * 3600,
                        max_output_bytes=int(args.keep_gb * 2**30), lora_dir=args.lora_dir)
    except ValueError as exc:
        print(f"loopui: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    if zero_gpu:
        # ZeroGPU's pattern: weights to "cuda" at start-up, outside any GPU call (CUDA is emulated here), so a
        # visitor's GPU seconds are spent generating rather than loading the model again in every fresh worker.
        studio.preload()
    demo = build_app(studio)
    studio.warm_up()
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, mcp_server=args.mcp or None,
                    prevent_thread_lock=True, **launch_options(public=args.public))
    except OSError as exc:  # taken between the check and the launch: Gradio words it as "Cannot find empty port"
        if "port" not in str(exc).lower():
            raise
        return _busy(args.port)
    if args.public:
        logger.info("public mode: registry models only, requests capped, generated files kept %.0f h / %.1f GB, "
                    "LoRAs: %s", args.keep_hours, args.keep_gb, ", ".join(studio.loras) or "none")
    if args.mcp and not demo.mcp_server:
        logger.warning("--mcp was given but the MCP server is not running: install the extra with "
                       "`pip install \"gradio[mcp]\"` and restart")
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
