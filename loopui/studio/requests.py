"""A request from page or API values: the served model, the engine's own resolution of every automatic value, the
public caps, and the uploads and clip read as the engine will read them -- all before anything is queued or loaded.

Every refusal is a ``ValueError`` of one line naming the parameter (the page turns it into ``gr.Error``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from loopui.engine.plan import LoopPlan, apply_recipe, resolve_request
from loopui.engine.lora_refs import LORA_SUFFIX
from loopui.engine.request import LoopRequest, request_from_values, size_text
from loopui.messages import one_line

AUTO_SCHEDULER = "auto"  # dropdown value for "the model's own scheduler" (LoopRequest.scheduler = None)

# The /generate parameters that are LoopRequest fields, in the order the UI and the API list them.
REQUEST_FIELDS: tuple[str, ...] = (
    "prompt", "negative_prompt", "image", "mask", "video", "shift_skip", "rope_scale", "num_frames", "num_inference_steps",
    "guidance_scale", "seed", "height", "width", "scheduler", "flow_shift", "use_dynamic_cfg",
    "frame_invariant_decoding", "shift_start", "shift_end", "window_mode", "fps", "seam_polish", "anchor_strength",
    "init_strength", "loop_region", "background_freeze", "image_channel", "motion_region", "mask_model", "mask_threshold",
    "mask_grow", "mask_feather", "step_cache", "sigmas", "loras", "attention", "compile", "quantize",
)
# The page's compile dropdown: "auto" = the server's setting (LoopRequest.compile = None).
COMPILE_CHOICES = {"auto": None, "on": True, "off": False}


def page_compile(value: Any) -> str:
    """A request's ``compile`` (None, True, False, or the dropdown's own text) as the page's dropdown shows it."""
    if value is True or value is False:
        return "on" if value else "off"
    return value if isinstance(value, str) and value in COMPILE_CHOICES else "auto"

# Public mode (a shared server, e.g. a Space): what one request may ask for at most.
# Wan 2.1 1.3B's native 832x480 at 81 frames and Wan 2.2 5B's 121 frames fit; 720p and longer cycles do not.
# Uploads are capped per input by file size (a clip is larger than an image); the decoded size has the engine's own
# caps (64 megapixels per image; 8K frames per clip, of which only the frames the loop uses are decoded).
PUBLIC_LIMITS: dict[str, int] = {"num_inference_steps": 50, "num_frames": 121, "pixels": 480 * 832,
                                 "prompt_chars": 2000, "image_bytes": 20 * 10**6, "video_bytes": 50 * 10**6}


def check_model(model_id: Any, served: Sequence[str], default: str) -> Any:
    """The spec of the model a request names (``default`` when it names none); only the ``served`` models (the
    dropdown's) are served, never a path from a client."""
    from loopui.models import resolve_model_id, spec_for

    allowed = list(served)
    name = resolve_model_id(model_id.strip()) if isinstance(model_id, str) and model_id.strip() else None
    if name is None:
        name = default
    if name not in allowed:
        raise ValueError(f"model {model_id!r} is not served here; choose one of: {', '.join(allowed)}")
    return spec_for(name)


def build_request(values: dict, spec: Any, public: bool = False,
                  server_loras: Optional[Mapping[str, str]] = None, recipe: Any = None,
                  local_files_only: bool = False, cache_dir: Optional[str] = None) -> LoopPlan:
    """The plan of a validated request for ``spec`` with every automatic value filled in
    (``loopui.engine.plan.resolve_request``, the same function the CLI uses), from page or API values;
    ``ValueError`` naming the parameter otherwise.

    Checked here, before anything is queued or loaded: the numbers and choices are in range, uploads are readable
    images, a clip is a video the engine can fit to the loop (read and resampled as the engine will), the LoRAs are
    found, fit the model's family and are hashed (``LoopPlan.with_loras``), and in public mode the request and its
    uploads are within their caps. ``server_loras`` (file name -> path): the server's own LoRAs, named by file
    name; in public mode the only ones a request may use. ``recipe``: a speed recipe's name, filling the values left
    automatic (the CLI's rule: what the caller gave wins). ``local_files_only`` / ``cache_dir``: where hub LoRAs
    are looked up (the model manager's own settings).
    """
    data = {name: values[name] for name in REQUEST_FIELDS if name in values}
    if data.get("scheduler") == AUTO_SCHEDULER:
        data["scheduler"] = None
    data, fill = apply_recipe(data, spec, recipe)
    request = request_from_values(data)
    allowed = lora_allowlist(request, server_loras or {}, public)
    with _lora_names(request):
        plan = resolve_request(request, spec, allowed).with_recipe(fill)
    request = plan.request
    if public:
        check_public_limits(request)
        check_public_runtime(request)
    for name in ("image", "mask", "video"):
        value = getattr(request, name)
        if value is not None and not isinstance(value, np.ndarray):
            cap = PUBLIC_LIMITS["video_bytes" if name == "video" else "image_bytes"] if public else None
            _check_file_size(name, value, cap)
            if name == "video":
                plan = _check_clip(plan)  # read and fitted once: the generation uses these frames
            else:
                _check_upload(name, value)
    with _lora_names(request):
        # A hub LoRA is fetched here, before the line (where the manager fetches models): a bad one is refused at once.
        plan = plan.with_loras(local_files_only, cache_dir)
    # Said before the run (the status line's notes): a step far beyond the model's own, a clip that is not used.
    warned = tuple(w for w in plan.warnings if w.startswith(("cost:", "video:")))
    return dataclasses.replace(plan, notes=plan.notes + warned) if warned else plan


def check_public_runtime(request: LoopRequest) -> None:
    """On a public server compilation and quantization are the server's (its LOOPUI_COMPILE / LOOPUI_QUANTIZE): a
    visitor asking for another would make it compile again or load the model again for everyone."""
    if request.compile is not None:
        raise ValueError("compile: this public server decides compilation itself; leave compile empty (auto)")
    if request.quantize is not None:
        raise ValueError("quantize: this public server loads its models with its own quantization; leave quantize "
                         "empty (auto)")


def server_runtime(device: Optional[str]) -> dict:
    """What "auto" means on this server for the attention kernel, compilation and quantization (its
    LOOPUI_ATTENTION, LOOPUI_COMPILE and LOOPUI_QUANTIZE, else what fits ``device``); a bad setting is one
    ``ValueError`` line naming it, at start-up. ``device`` None: the GPU cannot be asked yet (ZeroGPU lends it only
    inside a call), so only the settings' spelling is checked and the kernel is chosen on the GPU."""
    import os

    from loopui.models.accel import ATTENTION_ENV, ATTENTION_NAMES, resolve_attention, resolve_compile
    from loopui.models.quantize import QUANTIZE_ENV, check_mode, resolve_quantize

    if device is None:
        if resolve_compile(None):
            raise ValueError("LOOPUI_COMPILE: a ZeroGPU Space may run each call in a fresh worker, which would compile "
                             "the model again every time; unset it")
        attention = os.environ.get(ATTENTION_ENV, "").strip().lower() or "auto"
        if attention not in ATTENTION_NAMES:
            raise ValueError(f"{ATTENTION_ENV} must be one of {', '.join(ATTENTION_NAMES)}; got {attention!r}")
        quantize = os.environ.get(QUANTIZE_ENV, "").strip()
        return {"attention": attention if attention != "auto" else "chosen on the GPU",
                "compile": resolve_compile(None),
                "quantize": check_mode(quantize, QUANTIZE_ENV) if quantize else "none"}
    return {"attention": resolve_attention("auto", device), "compile": resolve_compile(None),
            "quantize": resolve_quantize(None, device)}


def check_runtime(request: LoopRequest, device: str) -> str:
    """The request's attention kernel and quantization checked against ``device`` before the model loads (a device
    torch does not know, a kernel that is not installed or does not fit the GPU: one ``ValueError`` line naming it
    and how to install it); returns the quantization the model is loaded with."""
    from loopui.models.accel import resolve_attention
    from loopui.models.quantize import resolve_quantize

    resolve_attention(request.attention, device)
    return resolve_quantize(request.quantize, device)


def list_lora_dir(folder: Any) -> dict[str, str]:
    """A server's own LoRAs: the ``*.safetensors`` files of ``folder`` (not its sub-folders), file name -> path,
    sorted by name; ``ValueError`` naming ``--lora-dir`` when it is not a folder."""
    path = Path(os.fspath(folder)).expanduser()
    if not path.is_dir():
        raise ValueError(f"--lora-dir: {os.fspath(folder)!r} is not a folder")
    files = sorted((p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(LORA_SUFFIX)),
                   key=lambda p: p.name.lower())
    return {p.name: str(p.resolve()) for p in files}


def lora_allowlist(request: LoopRequest, server_loras: Mapping[str, str],
                   public: bool) -> Optional[dict[str, str]]:
    """The ``allowed_loras`` the engine plans with: in public mode the server's own (file name -> path), and
    nothing else; otherwise the server's names resolved to their files, any other source (a path, a hub id)
    passing as it is -- None when the request names none of the server's."""
    if public:
        return dict(server_loras)
    if not any(lora.source in server_loras for lora in request.loras):
        return None
    return {**{lora.source: lora.source for lora in request.loras}, **server_loras}


@contextlib.contextmanager
def _lora_names(request: LoopRequest) -> Iterator[None]:
    """A LoRA refusal names a file by its own name, never by the server's folder (an upload's temp path)."""
    try:
        yield
    except ValueError as exc:
        text = one_line(exc)
        for lora in request.loras:
            if os.path.isabs(lora.source):
                text = text.replace(lora.source, _upload_name(lora.source))
        if text == one_line(exc):
            raise
        raise ValueError(text) from None


def mask_settings(values: dict, image: Any) -> LoopRequest:
    """The mask knobs of a ``/mask`` call, checked like a generation's (``ValueError`` naming the parameter), and
    the image checked to be readable."""
    from loopui.saliency import mask_model_info

    request = request_from_values(values)
    try:
        mask_model_info(request.mask_model)
    except ValueError as exc:
        raise ValueError(f"mask_model: {exc}") from None
    _check_upload("image", image)
    return request


def check_public_limits(request: LoopRequest) -> None:
    """Refuse a request over ``PUBLIC_LIMITS`` (steps, frames, pixels, prompt length), naming the parameter."""
    limits = PUBLIC_LIMITS
    for name in ("num_inference_steps", "num_frames"):
        if getattr(request, name) > limits[name]:
            raise ValueError(f"{name} must be <= {limits[name]} on this public server, got "
                             f"{getattr(request, name)}")
    if request.height * request.width > limits["pixels"]:
        raise ValueError(f"height x width must be at most {limits['pixels']} pixels on this public server "
                         f"(832x480), got {size_text(request.width, request.height)}")
    if len(request.prompt) + len(request.negative_prompt) > limits["prompt_chars"]:
        raise ValueError(f"prompt must be at most {limits['prompt_chars']} characters on this public server, "
                         f"got {len(request.prompt) + len(request.negative_prompt)}")


def _upload_name(path: Any) -> str:
    """An upload's own file name (never the server's temp path)."""
    return Path(os.fspath(path)).name if isinstance(path, (str, os.PathLike)) else "upload"


def _check_file_size(name: str, path: Any, max_bytes: Optional[int]) -> None:
    """Refuse an upload over ``max_bytes`` (public mode), naming the parameter."""
    if max_bytes is None or not isinstance(path, (str, os.PathLike)):
        return
    try:
        size = os.path.getsize(path)
    except OSError:
        return  # a missing file is answered by the readers, in their words
    if size > max_bytes:
        raise ValueError(f"{name}: {_upload_name(path)!r} is {size / 10**6:.3g} MB; this public server takes "
                         f"{'clips' if name == 'video' else 'images'} up to {max_bytes / 10**6:.3g} MB")


def _check_clip(plan: LoopPlan) -> LoopPlan:
    """The plan with its clip read and fitted (``LoopPlan.with_clip``); a clip the engine could not use -- not a
    video, truncated, too short, too large once decoded, an unusable frame rate -- is refused with one line naming
    ``video`` and the file's own name."""
    from loopui.media import ImageInputError, VideoInputError

    path = plan.request.video
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"video: {_upload_name(path)!r} is empty")
    try:
        return plan.with_clip()
    except (VideoInputError, ImageInputError) as exc:
        name = _upload_name(path)
        text = one_line(exc).removeprefix("video: ")
        if isinstance(path, (str, os.PathLike)):
            text = text.replace(f"video file {os.fspath(path)!r}", repr(name)).replace(os.fspath(path), name)
        if "not a video file" in text:  # text, a picture or a cut-off MP4
            text = f"{name!r} is not a video file (or it is truncated)"
        elif "truncated" in text:
            text = f"{name!r} is truncated (an incomplete upload?)"
        raise ValueError(f"video: {text}") from None


def _check_upload(name: str, path: Any) -> None:
    """Refuse an upload that is not a readable image, with one line naming the parameter and the file's own name
    (never the server's temp path)."""
    from loopui.media import ImageInputError, open_image, read_mask

    try:
        (open_image if name == "image" else read_mask)(path)
    except ImageInputError as exc:
        text = one_line(exc)
        if isinstance(path, (str, os.PathLike)):
            text = text.replace(os.fspath(path), _upload_name(path))
        if "cannot identify image file" in text:
            text = f"{_upload_name(path)!r} is not an image file (or it is empty)"
        elif "truncated" in text:
            text = f"{_upload_name(path)!r} is truncated (an incomplete upload?)"
        raise ValueError(f"{name}: {text}") from None
