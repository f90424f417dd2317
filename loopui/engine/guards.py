"""Guards around one generation that do not depend on the model family: NaN/Inf checks, Stop during decoding,
and VAE tiling/slicing on an accelerator when the caller has not chosen."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import NonFiniteOutput

logger = logging.getLogger(__name__)


def ensure_finite(tensor: torch.Tensor, what: str, dtype: Optional[torch.dtype] = None) -> None:
    """Raise :class:`NonFiniteOutput` when ``tensor`` holds NaN or Inf (``what`` names it in the message)."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    share = 100.0 * (1.0 - finite.float().mean().item())
    half = " (float16 overflows easily: use bfloat16 or float32)" if dtype == torch.float16 else ""
    raise NonFiniteOutput(f"the {what} contain NaN or infinite values ({share:.0f} % of them), so the video would be "
                          f"black: the model overflowed{half}. Try another dtype (--dtype), a lower guidance scale, "
                          f"or a size or length closer to the model's own")


@contextmanager
def cancel_checkpoint(module: Any, cancel_event: Optional[threading.Event],
                      cancelled: Callable[[], BaseException]) -> Iterator[None]:
    """While the block runs, every call of ``module`` (or of each module in a list) first checks ``cancel_event`` and
    raises ``cancelled()`` when it is set. On a VAE's ``decoder`` that is a check between decode chunks (CogVideoX
    decodes a few latent frames per call, Wan one, tiled decoding one tile at a time); on a transformer's blocks, a
    check between blocks, so Stop acts inside one long model call. Forward pre-hooks, so no ``forward`` is replaced;
    they are removed on the way out."""
    modules = [] if module is None else list(module) if isinstance(module, (list, tuple)) else [module]
    if cancel_event is None or not modules:
        yield
        return

    def check(_module: Any, _args: Any) -> None:
        if cancel_event.is_set():
            raise cancelled()

    handles = [m.register_forward_pre_hook(check) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _on_accelerator(pipe: Any) -> bool:
    device = getattr(pipe, "_execution_device", None)
    return device is not None and torch.device(device).type not in ("cpu", "meta")


@contextmanager
def vae_memory_defaults(pipe: Any) -> Iterator[None]:
    """Decode with VAE tiling and slicing on an accelerator unless the caller chose (switched either on already).

    Decoding a whole cycle at 720x480 untiled needs far more memory than denoising it; the model manager turns both
    on when it places a model, but a pipeline built by the caller arrives with both off. Restored afterwards.
    """
    vae = getattr(pipe, "vae", None)
    chosen = bool(getattr(vae, "use_tiling", True)) or bool(getattr(vae, "use_slicing", True))
    if vae is None or chosen or not _on_accelerator(pipe) or not hasattr(vae, "enable_tiling"):
        yield
        return
    logger.info("decoding with VAE tiling and slicing (the pipeline had neither switched on)")
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield
    finally:
        vae.disable_tiling()
        vae.disable_slicing()
