"""The app served on a free port for the app, API and browser tests; rembg can point at a tiny u2netp."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Iterator, Optional

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(studio, rembg_home: Optional[Path] = None) -> Iterator:
    """Build and launch ``studio``'s page on a free port; yield the running Blocks (``.local_url``), then close it.
    With ``rembg_home`` the mask models come from a tiny u2netp installed there."""
    from loopui.saliency import clear_session_cache
    from loopui.ui import build_app, launch_options
    from saliency_fixtures import install_tiny_u2netp

    with pytest.MonkeyPatch.context() as mp:
        if rembg_home is not None:
            install_tiny_u2netp(rembg_home)
            mp.setenv("U2NET_HOME", str(rembg_home))
            mp.setenv("MODEL_CHECKSUM_DISABLED", "1")
        clear_session_cache()
        demo = build_app(studio)
        demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, **launch_options())
        try:
            yield demo
        finally:
            demo.close()
            clear_session_cache()


def demo_studio(output_root: Path, **kwargs):
    """The demo model's studio without a GPU, its session files under ``output_root``."""
    from loopui.studio import Studio

    return Studio(**{"demo": True, "has_gpu": False, "output_root": output_root, **kwargs})
