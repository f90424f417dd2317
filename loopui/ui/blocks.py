"""The Gradio Blocks studio: layout and thin callbacks over :class:`loopui.ui.studio.Studio`.

Callbacks validate, turn ``ValueError`` into ``gr.Error`` and call one studio/engine function. Generation runs in a
worker thread (``loopui.ui.jobs``); the ``generate`` generator only relays its progress, and Stop sets the job's
cancel event, which the engine checks after every denoising step.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import numpy as np

from loopui.engine.plan import CLIP_INIT_STRENGTH
from loopui.engine.settings import WHOLE_NUMBER_FIELDS, LoopRequest, default_shift_skip, knob_info, latent_length
from loopui.saliency import MASK_MODEL_INFO, MASK_MODELS
from loopui.ui.jobs import LeftLine, ProgressClock
from loopui.ui.spaces_compat import gpu_decorator
from loopui.ui.studio import (
    CUSTOM_RESOLUTION,
    IMAGE_CHANNEL_LABELS,
    MAX_HISTORY,
    PAINT_MOVE_COLOR,
    PAINT_STILL_COLOR,
    REQUEST_FIELDS,
    RESOLUTION_PRESETS,
    RESTORED_FIELDS,
    HistoryEntry,
    Studio,
    help_text,
    shift_note,
)

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_PROMPTS = (
    "ocean waves rolling onto a sandy beach at sunset, gentle foam, cinematic",
    "a campfire burning at night, sparks drifting upward, warm light",
    "clouds drifting over snowy mountain peaks, timelapse, golden hour",
    "a koi fish swimming in circles in a clear pond, top-down view",
    "northern lights rippling over a frozen lake, stars, slow motion",
)
CLIP_NOTE = ("A clip that almost loops (a flag, waves, a walk): it is fitted to the loop's frames, fps and size, "
             f"re-noised to *Init strength* ({CLIP_INIT_STRENGTH:g} for a clip) and closed by the latent shift. An "
             "image-to-video model without an image uses its first frame.")
CLIP_ANCHOR_NOTE = "Inert with a clip: the clip's first frame may change too (lower Init strength keeps it closer)."
NO_CLIP_NOTE = "Only with a clip: add one to choose how much of the cycle around the wrap may change."
QUEUE_MAX_SIZE = 16  # Gradio's queue bound for the page's other events (generations wait in the studio's line)
# The generator yields at least this often: a cancelled event can only close it between yields.
HEARTBEAT_SECONDS = 0.5
STOPPED_IN_LINE = "Stopped while queued: your loop left the queue before it started. Ready for the next loop."
STAGE_LABELS = {"queue": "Queued", "load": "Loading model", "encode": "Encoding prompt", "denoise": "Denoising",
                "decode": "Decoding frames", "export": "Writing MP4 / GIF / WebP"}
CSS = """
#loopui-banner {border-left: 4px solid #f59e0b; padding: 6px 12px; background: rgba(245, 158, 11, 0.08);}
/* A knob the model cannot use is locked, and looks it (its note says why). */
#loopui-settings input:disabled, #loopui-settings textarea:disabled {opacity: 0.45; cursor: not-allowed;}
#loopui-settings label:has(input:disabled) {opacity: 0.55; cursor: not-allowed;}
#loopui-status {min-height: 1.6em;}
/* A long choice (a model name) ends in an ellipsis before the dropdown's arrow instead of running under it. */
#loopui-main input[role="combobox"] {text-overflow: ellipsis; overflow: hidden; white-space: nowrap; min-width: 0;
                                     padding-right: 28px;}
/* The mask editor's pan/zoom/undo bar sits below its label, not over it. */
#loopui-mask .top-panel {top: 34px;}
/* Phones: the two columns dissolve into one list in this order -- prompt, Generate, the player, the status, then
   the settings and the results -- so Generate and the loop stay in reach instead of a few screens down. */
@media (max-width: 768px) {
  #loopui-intro h1 {font-size: 1.5em;}
  #loopui-banner {flex-wrap: wrap;}
  #loopui-banner > * {min-width: 100% !important;}
  #loopui-main {flex-direction: column; flex-wrap: nowrap;}
  #loopui-main > #loopui-inputs, #loopui-main > #loopui-outputs {display: contents;}
  #loopui-prompt-box {order: 1;}
  #loopui-actions {order: 2; flex-wrap: nowrap;}
  #loopui-actions > * {min-width: 0 !important;}
  #loopui-video {order: 3;}
  #loopui-status {order: 4;}
  #loopui-settings {order: 5;}
  #loopui-results {order: 6;}
}
"""


# The input components below are stock Gradio components with their preprocessing replaced on the instance.
# (Subclassing a Gradio component would make Gradio write a .pyi stub next to this module at import time.)

def uploaded_image(param: str, **kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (type filepath) whose unreadable uploads end as one line naming ``param``.

    Gradio's own preprocessing error is several hundred characters listing internal component names and the
    server's temp paths (or a pydantic dump when a client sends a bare string); this one says which input and why.
    """
    from gradio.data_classes import ImageData

    return _one_line_upload(gr.Image(type="filepath", **kwargs), param, ImageData, "image",
                            lambda payload, exc: _upload_error(param, payload, exc))


def uploaded_video(param: str, **kwargs: Any) -> gr.Video:
    """A ``gr.Video`` upload (the file as given: no conversion) whose malformed payloads end as one line naming
    ``param``; what the file holds is checked by the studio (``Studio.build_request``), as the engine will read it."""
    from gradio.data_classes import FileData

    def error(payload: Any, exc: BaseException) -> str:
        return f"{param}: {_payload_name(payload)!r} cannot be used as a video ({type(exc).__name__})"

    return _one_line_upload(gr.Video(sources=["upload"], include_audio=True, **kwargs), param, FileData, "video",
                            error)


def _one_line_upload(component: Any, param: str, data_model: type, kind: str,
                     error: Callable[[Any, BaseException], str]) -> Any:
    """``component`` with its preprocessing failures as ``error(payload, exc)`` and its payload validation failure
    (not a file at all) as one line naming ``param``, instead of Gradio's own errors."""
    stock = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception as exc:  # PIL's UnidentifiedImageError, DecompressionBombError, OSError on a bad file
            raise gr.Error(error(payload, exc), print_exception=False) from None

    class Checked(data_model):  # type: ignore[misc, valid-type]
        model_config = {"title": data_model.__name__}

        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().model_validate(obj, *args, **kwargs)
            except ValueError:  # pydantic's ValidationError
                raise gr.Error(f"{param}: expected an uploaded {kind} file (gradio_client.handle_file(path)), got "
                               f"{type(obj).__name__} {str(obj)[:60]!r}", print_exception=False) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    component.data_model = Checked
    component.loopui_upload = (param, kind)  # read by _name_refused_paths
    return component


def _name_refused_paths(demo: gr.Blocks) -> None:
    """A client that names a file on the server instead of uploading one is refused by Gradio before any component
    sees it ("Cannot move /etc/passwd to the gradio cache dir ..."): the server's path, not the parameter. Answer with
    one line naming the upload parameter instead."""
    from gradio.exceptions import InvalidPathError

    stock = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list, *args: Any, **kwargs: Any) -> Any:
        try:
            return await stock(block_fn, inputs, *args, **kwargs)
        except InvalidPathError:
            named = [getattr(block, "loopui_upload", None) for block, value in zip(block_fn.inputs, inputs)
                     if isinstance(value, dict) and value.get("path")]
            param, kind = next((n for n in named if n is not None), ("an upload", "file"))
            raise gr.Error(f"{param}: expected an uploaded {kind} file (gradio_client.handle_file(path)), got a path "
                           f"on the server", print_exception=False) from None

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]


def _payload_name(payload: Any) -> str:
    return Path(str(getattr(payload, "orig_name", None) or getattr(payload, "path", None) or "upload")).name


def _upload_error(param: str, payload: Any, exc: BaseException) -> str:
    name = _payload_name(payload)
    if "DecompressionBomb" in type(exc).__name__:
        return f"{param}: {name!r} has too many pixels to decode safely; use a smaller image"
    if "cannot identify image file" in str(exc) or "UnidentifiedImage" in type(exc).__name__:
        return f"{param}: {name!r} is not an image file (or it is empty)"
    reason = " ".join(str(exc).split()).replace(str(getattr(payload, "path", "") or "\0"), name)
    return f"{param}: {name!r} cannot be read as an image ({reason[:200]})"


def api_value(component: gr.components.Component, whole: bool = False,
              automatic: bool = False) -> gr.components.Component:
    """A hidden ``/generate`` input that hands the client's value to the app untouched.

    Gradio's Number rounds to its precision and answers out-of-range values with "Value -1 is less than minimum
    value 0." (no parameter name), its Checkbox takes any value; here ``LoopRequest``'s own checks answer, naming
    the parameter, and a knob with an automatic value (``automatic``) accepts null or "auto" and defaults to null.
    """
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    if automatic:
        component.value = None  # a Checkbox turns None into False when built; null is "the model's choice"
    if isinstance(component, (gr.Number, gr.Checkbox)):
        kind = {"type": "boolean"} if isinstance(component, gr.Checkbox) else {
            "type": "integer" if whole else "number"}
        info = kind if component.value is not None else {"anyOf": [kind, {"type": "null"}]}
        component.api_info = lambda: info  # type: ignore[method-assign]
    return component


# Public mode: larger uploads are refused by Gradio before they reach the app. Above the studio's own per-input
# caps (PUBLIC_LIMITS: 20 MB for an image, 50 MB for a clip), which answer with a line naming the input.
PUBLIC_MAX_UPLOAD = "64mb"


def launch_options(public: bool = False) -> dict[str, Any]:
    """Keyword arguments every launch of the studio uses (app.py, tests, the screenshot script).

    Files are served only from Gradio's allowlist: uploads, the app's own results and the example images in
    ``assets/`` -- nothing else on disk. ``public`` also bounds the upload size.
    """
    # show_error: errors raised outside our callbacks (e.g. Gradio's own checks) still reach the client with
    # their cause instead of a blank "Error".
    options: dict[str, Any] = dict(allowed_paths=[str(ASSETS_DIR)], css=CSS, show_error=True)
    if public:
        options["max_file_size"] = PUBLIC_MAX_UPLOAD
    return options


def _slider(name: str, label: str, value: Any, **overrides: Any) -> gr.Slider:
    info = knob_info(name)
    kwargs = dict(minimum=info["min"], maximum=info["max"], step=info["step"], value=value, label=label,
                  info=help_text(name))
    kwargs.update(overrides)
    return gr.Slider(**kwargs)


def _dropdown(name: str, label: str, value: Any, choices: Optional[list] = None, **overrides: Any) -> gr.Dropdown:
    choices = choices if choices is not None else list(knob_info(name)["choices"])
    return gr.Dropdown(choices=choices, value=value, label=label, info=help_text(name), **overrides)


def _progress_view(event: Any, clock: ProgressClock) -> tuple[tuple[tuple, dict], str]:
    """(gr.Progress arguments, status line) for one worker progress event; times come from ``clock``."""
    label = STAGE_LABELS.get(event.stage, event.stage)
    if event.stage == "queue":
        ahead = event.step
        text = (f"Queued: {ahead} loop{'s' if ahead != 1 else ''} ahead of yours (position {ahead + 1}). "
                "Stop takes it out of the line.")
        return ((None,), {"desc": text}), text
    elapsed, left = clock.times(event.stage, event.step, event.total)
    timing = f"{elapsed:.0f} s elapsed" + (f" · about {left:.0f} s left" if left is not None else "")
    if event.stage == "denoise":
        return (((event.step, event.total),), {"desc": f"{label} · {timing}", "unit": "steps"}), \
            f"{label}: {event.total} steps (progress on the player)…"
    if event.stage == "load":
        text = event.message or label
        return ((event.step / 100.0 if event.total else None,), {"desc": f"{text} · {timing}"}), text
    fraction = event.step / event.total if event.total else None
    return ((fraction,), {"desc": f"{label} · {timing}"}), label + "…"


def _session(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _rope_update(studio: Studio, model_id: str, num_frames: int, window_mode: str, value: Optional[float] = None):
    """The RoPE slider for this model and cycle: locked at 1 where the engine accepts no other scale, else the
    automatic scale (or ``value``)."""
    state = studio.rope_state(model_id, int(num_frames), window_mode)
    if not state.interactive:
        return gr.update(value=state.value, interactive=False, info=state.note)
    return gr.update(value=state.value if value is None else value, interactive=True, info=state.note)


def _window_update(studio: Studio, model_id: str, num_frames: int, window_mode: str) -> tuple[Any, str]:
    """(the long-loop radio's update, the mode in effect): forced where the engine refuses the other mode."""
    state = studio.window_state(model_id, int(num_frames), window_mode)
    return gr.update(value=state.value, interactive=state.interactive, info=state.note), state.value


def _shift_update(studio: Studio, model_id: str, num_frames: int, value: Optional[int] = None):
    length = latent_length(int(num_frames), studio.spec(model_id).temporal_compression)
    k = default_shift_skip(length) if value is None else min(int(value), max(length - 1, 0))
    return gr.update(maximum=max(length - 1, 1), value=k, interactive=length > 1)


def _length_updates(studio: Studio, model_id: str, num_frames: int, window_mode: str) -> tuple[Any, Any, Any]:
    """Shift, long-loop mode and RoPE scale after the loop length (or the model) changed."""
    window, mode = _window_update(studio, model_id, num_frames, window_mode)
    return _shift_update(studio, model_id, num_frames), window, _rope_update(studio, model_id, num_frames, mode)


# The components that follow the model, in the order _model_updates returns them.
FOLLOW_MODEL = ("model_md", "banner_md", "resolution", "height", "width", "num_frames", "shift_skip", "window_mode",
                "rope_scale", "guidance_scale", "scheduler", "use_dynamic_cfg", "flow_shift", "image_channel", "fps")


def _preset_for(height: Optional[float], width: Optional[float]) -> str:
    """The resolution preset of a size (both empty: the model's native), else "Custom"."""
    size = (int(height) if height else None, int(width) if width else None)
    return next((key for key, hw in RESOLUTION_PRESETS.items() if hw == size), CUSTOM_RESOLUTION)


def _size_box(view: Any, value: Optional[int]) -> Any:
    return gr.update(value=value, step=view.size_step, interactive=view.size.interactive, info=view.size.note)


def _model_updates(studio: Studio, model_id: str, preset: Optional[str] = None, height: Optional[float] = None,
                   width: Optional[float] = None) -> dict[str, Any]:
    """Every knob that follows the model, set to what ``model_id`` offers and recommends (see ``Studio.model_view``).

    The resolution stays when the model accepts it (a preset it offers, or a custom size it plans), else it becomes
    the model's default; the loop length becomes the model's."""
    view = studio.model_view(model_id)
    offered = [key for _, key in view.resolutions]
    if preset == CUSTOM_RESOLUTION and not (height and width and studio.size_accepted(model_id, int(height),
                                                                                       int(width))):
        preset = None
    if preset not in offered:
        preset, (height, width) = view.resolution, RESOLUTION_PRESETS[view.resolution]
    elif preset != CUSTOM_RESOLUTION:
        height, width = RESOLUTION_PRESETS[preset]
    frames = view.num_frames
    shift, window, rope = _length_updates(studio, model_id, frames, knob_info("window_mode")["default"])
    banner = studio.banner(model_id)
    return dict(
        model_md=view.text, banner_md=banner, resolution=gr.update(choices=view.resolutions, value=preset),
        height=_size_box(view, height), width=_size_box(view, width),
        num_frames=gr.update(minimum=view.frames[0], maximum=view.frames[1], step=view.frames[2], value=frames),
        shift_skip=shift, window_mode=window, rope_scale=rope,
        guidance_scale=gr.update(value=view.guidance.value, info=view.guidance.note),
        scheduler=gr.update(choices=view.schedulers, value=view.scheduler),
        use_dynamic_cfg=gr.update(value=view.dynamic_cfg.value, interactive=view.dynamic_cfg.interactive,
                                  info=view.dynamic_cfg.note),
        flow_shift=gr.update(value=view.flow_shift.value, interactive=view.flow_shift.interactive,
                             info=view.flow_shift.note),
        image_channel=gr.update(value=view.image_channel.value, interactive=view.image_channel.interactive,
                                info=view.image_channel.note),
        fps=gr.update(value=view.fps),
    )


def _api_inputs(studio: Studio) -> dict[str, gr.components.Component]:
    """Hidden twins of the page's knobs for the ``/generate`` and ``/mask`` API: defaults as the page starts, except
    that knobs with an automatic value (shift, RoPE scale, size, and what follows the model: scheduler, guidance,
    dynamic CFG, fps, flow shift) default to automatic -- so a client that changes ``num_frames`` or ``model`` and
    leaves them out gets what the page and the CLI compute for that model."""
    automatic = {"shift_skip", "rope_scale", "height", "width", "scheduler", "guidance_scale", "use_dynamic_cfg",
                 "fps", "flow_shift", "init_strength"}
    hints = typing.get_type_hints(LoopRequest)
    out: dict[str, gr.components.Component] = {}
    for name in REQUEST_FIELDS:
        if name in ("image", "mask"):
            out[name] = uploaded_image(name, label=name, visible=False)
            continue
        if name == "video":
            out[name] = uploaded_video(name, label=name, visible=False)
            continue
        info = knob_info(name)
        value = None if name in automatic else studio.default(name)
        if name in ("prompt", "negative_prompt") or info.get("choices") or name == "mask_model":
            out[name] = gr.Textbox(label=name, value=value, visible=False)
        elif bool in (hints[name], *typing.get_args(hints[name])):
            out[name] = api_value(gr.Checkbox(label=name, value=bool(value), visible=False), automatic=value is None)
        else:
            out[name] = api_value(gr.Number(label=name, value=value, visible=False),
                                  whole=name in WHOLE_NUMBER_FIELDS)
    out["model"] = gr.Textbox(label="model", value=studio.model_id, visible=False)
    return out


def build_app(studio: Studio) -> gr.Blocks:
    """The studio page, queued (a bounded waiting line, one generation per device of the studio's pool at a time);
    launch it with ``.launch()``."""
    spec = studio.spec(studio.model_id)
    view = studio.model_view(studio.model_id)
    frames0 = studio.default("num_frames")

    with gr.Blocks(title="loopui — seamless looping videos", delete_cache=(3600, 6 * 3600),
                   analytics_enabled=False) as demo:
        history = gr.State([])
        gr.Markdown("# loopui — seamless looping videos\nType a prompt (optionally add a reference image), press "
                    "**Generate**, get a loop that plays without a seam. Training-free: the model sees its latent "
                    "cycle rotated a little at every denoising step, so no frame is the edge.",
                    elem_id="loopui-intro")
        banner_text = studio.banner()
        with gr.Row(visible=bool(banner_text), elem_id="loopui-banner"):
            banner_md = gr.Markdown(banner_text)
            preview_btn = gr.Button("Use preview settings", size="sm", scale=0, min_width=180)

        # Two columns on a wide screen; on a phone (see CSS) the columns dissolve so that the prompt, Generate and
        # the player come first and the settings follow.
        with gr.Row(elem_id="loopui-main"):
            # ---------------------------------------------------------------- inputs
            with gr.Column(scale=5, elem_id="loopui-inputs"):
                with gr.Group(elem_id="loopui-prompt-box"):
                    prompt = gr.Textbox(label="Prompt", lines=3, value="", elem_id="loopui-prompt",
                                        placeholder="ocean waves rolling onto a beach at sunset",
                                        info=help_text("prompt"))
                with gr.Column(elem_id="loopui-settings"):
                    gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts",
                                cache_examples=False, api_visibility="private")
                    negative_prompt = gr.Textbox(label="Negative prompt", lines=1, value="",
                                                 info=help_text("negative_prompt"))
                    with gr.Row():
                        model = gr.Dropdown(choices=studio.model_choices(), value=studio.model_id, label="Model",
                                            elem_id="loopui-model", scale=3,
                                            info="Video model; it loads on the first Generate and then stays "
                                                 "loaded.")
                        resolution = gr.Dropdown(
                            choices=view.resolutions, value=studio.default_resolution(),
                            label="Resolution (width x height)", scale=2,
                            elem_id="loopui-resolution",
                            info="Smaller is much faster; the model's native size looks best.")
                    model_md = gr.Markdown(view.text, elem_id="loopui-model-note")
                    with gr.Row():
                        preset_h, preset_w = RESOLUTION_PRESETS[studio.default_resolution()]
                        width = gr.Number(label="Width", value=preset_w, minimum=knob_info("width")["min"],
                                          maximum=knob_info("width")["max"], step=view.size_step,
                                          info=view.size.note, interactive=view.size.interactive,
                                          elem_id="loopui-width")
                        height = gr.Number(label="Height", value=preset_h, minimum=knob_info("height")["min"],
                                           maximum=knob_info("height")["max"], step=view.size_step,
                                           info=view.size.note, interactive=view.size.interactive,
                                           elem_id="loopui-height")
                    num_frames = _slider("num_frames", "Loop length (frames)", frames0, minimum=view.frames[0],
                                         maximum=view.frames[1], step=view.frames[2], elem_id="loopui-frames")
                    shift_skip = _slider("shift_skip", "Shift step k", studio.default("shift_skip"))
                    shift_md = gr.Markdown(shift_note(frames0, studio.default("shift_skip"),
                                                      spec.temporal_compression))
                    rope0 = _rope_update(studio, studio.model_id, frames0, studio.default("window_mode"))
                    rope_scale = _slider("rope_scale", "RoPE scale", rope0["value"], info=rope0["info"],
                                         interactive=rope0["interactive"], elem_id="loopui-rope")
                    with gr.Row():
                        num_inference_steps = _slider("num_inference_steps", "Steps",
                                                      studio.default("num_inference_steps"), elem_id="loopui-steps")
                        guidance_scale = _slider("guidance_scale", "Guidance", view.guidance.value,
                                                 info=view.guidance.note, elem_id="loopui-guidance")
                    with gr.Row():
                        seed_info = knob_info("seed")
                        # No precision: a fractional seed reaches the one whole-number rule (refused, by name)
                        # instead of being rounded silently.
                        seed = gr.Number(label="Seed", value=studio.default("seed"), minimum=seed_info["min"],
                                         maximum=seed_info["max"], step=1, info=seed_info["help"], scale=4,
                                         elem_id="loopui-seed")
                        dice = gr.Button("Random seed", scale=1, min_width=120)

                    with gr.Accordion("Reference image or clip (optional)", open=True):
                        with gr.Row():
                            image = uploaded_image("image", label="Reference image",
                                                   sources=["upload", "clipboard", "webcam"], height=300,
                                                   elem_id="loopui-image")
                            mask_editor = gr.ImageEditor(
                                label="Motion mask", type="numpy", format="png",
                                sources=(), transforms=(), layers=False, height=300, elem_id="loopui-mask",
                                brush=gr.Brush(colors=[(PAINT_MOVE_COLOR, 0.8), (PAINT_STILL_COLOR, 0.8)],
                                               default_color=(PAINT_MOVE_COLOR, 0.8), color_mode="fixed"),
                                eraser=gr.Eraser())
                        mask_note = gr.Markdown("", elem_id="loopui-mask-note")
                        image_examples = sorted(str(p) for p in ASSETS_DIR.glob("*.png")
                                                if p.name != "screenshot.png")
                        if image_examples:
                            gr.Examples(examples=[[p] for p in image_examples], inputs=[image],
                                        label="Example images (made by scripts/make_assets.py)",
                                        cache_examples=False, api_visibility="private")
                        with gr.Row(elem_id="loopui-clip-row"):
                            clip = uploaded_video("video", label="Your clip (optional)", height=220, scale=1,
                                                  elem_id="loopui-clip")
                            with gr.Column(scale=1):
                                gr.Markdown(CLIP_NOTE, elem_id="loopui-clip-note")
                                loop_region = _slider("loop_region", "Loop region", studio.default("loop_region"),
                                                      interactive=False, info=NO_CLIP_NOTE,
                                                      elem_id="loopui-loop-region")
                        with gr.Group(visible=False) as image_controls:
                            motion_region = gr.Radio(choices=list(knob_info("motion_region")["choices"]),
                                                     value=studio.default("motion_region"), label="Motion region",
                                                     info=help_text("motion_region"))
                            anchor_strength = _slider("anchor_strength", "Anchor strength",
                                                      studio.default("anchor_strength"), elem_id="loopui-anchor")
                            init_strength = _slider("init_strength", "Init strength",
                                                    studio.default("init_strength"), elem_id="loopui-init")
                            background_freeze = _slider("background_freeze", "Background freeze",
                                                        studio.default("background_freeze"))
                            image_channel = gr.Radio(
                                choices=[(IMAGE_CHANNEL_LABELS[c], c) for c in knob_info("image_channel")["choices"]],
                                value=view.image_channel.value, label="Image channel (image-to-video models)",
                                info=view.image_channel.note, interactive=view.image_channel.interactive,
                                elem_id="loopui-image-channel")
                            with gr.Accordion("Mask settings", open=False):
                                mask_model = _dropdown("mask_model", "Mask model", studio.default("mask_model"),
                                                       choices=[(MASK_MODEL_INFO[m].label, m) for m in MASK_MODELS])
                                mask_threshold = _slider("mask_threshold", "Mask threshold",
                                                         studio.default("mask_threshold"))
                                mask_grow = _slider("mask_grow", "Mask grow / shrink", studio.default("mask_grow"))
                                mask_feather = _slider("mask_feather", "Mask feather",
                                                       studio.default("mask_feather"))

                    with gr.Accordion("Advanced", open=False):
                        with gr.Row():
                            scheduler = _dropdown("scheduler", "Scheduler", view.scheduler, choices=view.schedulers,
                                                  elem_id="loopui-scheduler")
                            flow_info = knob_info("flow_shift")
                            flow_shift = gr.Number(label="Flow shift (empty = automatic)", value=view.flow_shift.value,
                                                   minimum=flow_info["min"], maximum=flow_info["max"],
                                                   step=flow_info["step"], info=view.flow_shift.note,
                                                   interactive=view.flow_shift.interactive,
                                                   elem_id="loopui-flow-shift")
                        with gr.Row():
                            use_dynamic_cfg = gr.Checkbox(value=view.dynamic_cfg.value, label="Dynamic CFG",
                                                          info=view.dynamic_cfg.note,
                                                          interactive=view.dynamic_cfg.interactive,
                                                          elem_id="loopui-dynamic-cfg")
                            frame_invariant_decoding = gr.Checkbox(value=studio.default("frame_invariant_decoding"),
                                                                   label="Frame-invariant decoding",
                                                                   info=help_text("frame_invariant_decoding"))
                        with gr.Row():
                            shift_start = _slider("shift_start", "Shift start", studio.default("shift_start"))
                            shift_end = _slider("shift_end", "Shift end", studio.default("shift_end"))
                        window0 = studio.window_state(studio.model_id, frames0, knob_info("window_mode")["default"])
                        window_mode = gr.Radio(choices=list(knob_info("window_mode")["choices"]),
                                               value=window0.value, label="Long-loop mode", info=window0.note,
                                               interactive=window0.interactive, elem_id="loopui-window")
                        with gr.Row():
                            fps = _slider("fps", "FPS", view.fps, elem_id="loopui-fps")
                            seam_polish = _dropdown("seam_polish", "Seam polish", studio.default("seam_polish"))

            # ---------------------------------------------------------------- outputs
            with gr.Column(scale=4, elem_id="loopui-outputs"):
                with gr.Row(elem_id="loopui-actions"):
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="loopui-generate", scale=3)
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="loopui-stop", scale=1)
                video = gr.Video(label="Loop", loop=True, autoplay=True, interactive=False, elem_id="loopui-video",
                                 height=360)
                status = gr.Markdown("Ready.", label="status", elem_id="loopui-status")
                with gr.Column(elem_id="loopui-results"):
                    seam_md = gr.Markdown("", label="seam", elem_id="loopui-seam")
                    strip = gr.Image(label="Seam strips: the wrap (last 3 | first 3), then around the largest inner "
                                           "jump", type="filepath", interactive=False, height=160)
                    files = gr.File(label="Downloads (MP4, GIF, WebP, settings JSON)", file_count="multiple",
                                    interactive=False)
                    gallery = gr.Gallery(label="This session's loops (click to restore settings)", columns=4,
                                         height=220, allow_preview=False, interactive=False, object_fit="cover",
                                         fit_columns=False, elem_id="loopui-gallery")

        # Hidden plumbing: the painted mask sent with the page's Generate, the API's inputs, the /mask output.
        mask = gr.Image(label="Motion mask", type="filepath", image_mode="L", format="png", visible=False)
        api = _api_inputs(studio)
        api_mask = gr.Image(label="Motion mask", type="filepath", image_mode="L", format="png", visible=False)
        api_mask_trigger = gr.Button(visible=False)
        api_generate_trigger = gr.Button(visible=False)
        page_origin, api_origin = gr.State("page"), gr.State("api")

        knobs: dict[str, gr.components.Component] = dict(
            prompt=prompt, negative_prompt=negative_prompt, image=image, mask=mask, shift_skip=shift_skip,
            rope_scale=rope_scale, num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, height=height, width=width, scheduler=scheduler,
            flow_shift=flow_shift, use_dynamic_cfg=use_dynamic_cfg, frame_invariant_decoding=frame_invariant_decoding,
            shift_start=shift_start, shift_end=shift_end, window_mode=window_mode, fps=fps, seam_polish=seam_polish,
            anchor_strength=anchor_strength, init_strength=init_strength, background_freeze=background_freeze,
            image_channel=image_channel, video=clip, loop_region=loop_region,
            motion_region=motion_region, mask_model=mask_model, mask_threshold=mask_threshold, mask_grow=mask_grow,
            mask_feather=mask_feather,
        )

        # ---------------------------------------------------------------- generation
        def gpu_duration(*args: Any, **kwargs: Any) -> int:
            # ZeroGPU calls this with generate's own arguments and refuses a visitor whose quota is below the answer.
            values = inspect.signature(generate).bind_partial(*args, **kwargs).arguments
            return studio.gpu_seconds(values.get("model") or studio.model_id, values)

        @gpu_decorator(duration=gpu_duration)
        def generate(prompt: str, negative_prompt: str, num_frames: float, num_inference_steps: float,
                     seed: float, frame_invariant_decoding: bool, shift_start: float, shift_end: float,
                     window_mode: str, seam_polish: str, anchor_strength: float, loop_region: float,
                     background_freeze: float, image_channel: str, motion_region: str, mask_model: str,
                     mask_threshold: float, mask_grow: float, mask_feather: float, model: Optional[str],
                     history: list, origin: str, shift_skip: Optional[float] = None,
                     rope_scale: Optional[float] = None, height: Optional[float] = None, width: Optional[float] = None,
                     scheduler: Optional[str] = None, guidance_scale: Optional[float] = None,
                     use_dynamic_cfg: Optional[bool] = None, fps: Optional[float] = None,
                     flow_shift: Optional[float] = None, init_strength: Optional[float] = None,
                     image: Optional[str] = None, mask: Optional[str] = None, video: Optional[str] = None,
                     request: gr.Request = None, progress: gr.Progress = gr.Progress()):
            """Generate a seamless loop from a prompt (optionally a reference image, or a clip to turn into a loop:
            ``video``); returns the looping MP4 first, then the seam note, the seam strip, the files (MP4, GIF, WebP,
            settings JSON) and a status line. Knobs left out (or null / "auto") get the automatic values the page
            and the CLI use (init strength: 1, or 0.7 with a clip)."""
            arguments = dict(locals())
            values = {name: value for name, value in arguments.items() if name in REQUEST_FIELDS}
            skip = gr.skip()
            try:
                model_id = studio.check_model(model).model_id
                if origin == "page":
                    values = studio.page_values(values, model_id)
                resolved = studio.build_request(values, model_id=model_id)
                job = studio.start(_session(request), model_id, resolved.request)
            except ValueError as exc:
                raise gr.Error(" ".join(str(exc).split()), print_exception=False) from None
            notes = "".join(f"\n\nNote: {n}." for n in resolved.notes)
            clock = ProgressClock()
            try:
                # Two constraints on yielding: a cancelled event can only close this generator between yields
                # (so yield at least every HEARTBEAT_SECONDS), and every yield makes the page hide the progress
                # bar (so yield no more than that, and send the last progress again right after each yield --
                # code after a yield runs at the next pull, i.e. once the yielded value has gone out).
                shown: tuple = ()
                last_yield = time.monotonic()
                for event in job.events(heartbeat=HEARTBEAT_SECONDS):
                    if event is None or event.kind == "progress":
                        text = skip
                        if event is not None:
                            shown, line = _progress_view(event, clock)
                            progress(*shown[0], **shown[1])
                            if event.stage != "denoise" or event.step <= 1:
                                text = line + notes  # a new stage or a new place in line: worth a status line
                            elif time.monotonic() - last_yield < HEARTBEAT_SECONDS:
                                continue
                        yield skip, skip, skip, skip, text, skip
                        last_yield = time.monotonic()
                        if shown:
                            progress(*shown[0], **shown[1])
                    elif event.kind == "done":
                        outcome = event.payload
                        entry = studio.history_entry(outcome, values, model_id)
                        new_history = ([entry] + list(history or []))[:MAX_HISTORY]
                        warn = "".join(f"\n\n⚠ {w}" for w in outcome.warnings)
                        text = f"Done. {outcome.details}{notes}\n\n{outcome.model_text}{warn}"
                        yield (str(outcome.video), outcome.seam_text, str(outcome.strip),
                               [str(f) for f in outcome.files], text, new_history)
                    else:  # error
                        exc = event.payload
                        from loopui.engine import LoopInterrupted

                        if isinstance(exc, LeftLine):
                            yield skip, skip, skip, skip, STOPPED_IN_LINE, skip
                            return
                        if isinstance(exc, LoopInterrupted):
                            yield skip, skip, skip, skip, f"Stopped ({exc}). Ready for the next loop.", skip
                            return
                        if not isinstance(exc, ValueError):
                            logger.error("generation failed", exc_info=exc)
                        message = studio.error_text(exc)
                        # The status line must not keep saying "fetching" or "denoising" after a failure.
                        yield skip, skip, skip, skip, f"✖ Failed: {message}", skip
                        raise gr.Error(message, print_exception=False)
            finally:
                # A cancelled Gradio event closes this generator: make the worker stop too (within one step).
                if job.running:
                    job.cancel()

        def prepare_mask(image_path: Optional[str], editor: Optional[dict], mask_model: str,
                         motion_region: str) -> Optional[np.ndarray]:
            layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
            try:
                return studio.painted_user_mask(image_path, layers, mask_model, motion_region)
            except ValueError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        def stop(request: gr.Request) -> str:
            job = studio.jobs.stop(_session(request))
            if job is None:
                return "Nothing to stop. Ready."
            if job.stage == "queue":
                return STOPPED_IN_LINE
            return "Stopped: the worker ends after the current denoising step. Ready for the next loop."

        # Inputs follow generate's signature, matched by name; the knobs whose API default is "automatic" (None) come
        # last with a Python default, which is how Gradio tells clients they may leave them out.
        def inputs_for(by_name: dict) -> list:
            return [by_name[p] for p in inspect.signature(generate).parameters if p in by_name]

        page_inputs = inputs_for({**knobs, "model": model, "history": history, "origin": page_origin})
        api_inputs = inputs_for({**api, "history": history, "origin": api_origin})
        outputs = [video, seam_md, strip, files, status, history]
        # No Gradio limit of its own: a limit at the line's size kept the extra clients in Gradio's queue, where the
        # studio's line never saw them to answer "busy".
        generation = dict(concurrency_limit=None, concurrency_id="generate")
        mask_step = generate_btn.click(prepare_mask, inputs=[image, mask_editor, mask_model, motion_region],
                                       outputs=[mask], api_visibility="private", queue=False)
        gen_event = mask_step.then(generate, inputs=page_inputs, outputs=outputs, api_name="page_generate",
                                   api_visibility="private",
                                   show_progress_on=[video], **generation)
        gen_event.then(lambda h: [(e.thumb, e.caption) for e in h], inputs=[history], outputs=[gallery],
                       api_visibility="private", queue=False)
        api_generate_trigger.click(generate, inputs=api_inputs, outputs=outputs, api_name="generate", **generation)
        stop_btn.click(stop, inputs=None, outputs=[status], cancels=[gen_event], queue=False, api_name="stop",
                       api_visibility="undocumented")

        # ---------------------------------------------------------------- masks
        mask_settings = [mask_model, mask_threshold, mask_grow, mask_feather, motion_region]

        def show_mask(image_path: Optional[str], clip_path: Optional[str], mask_model: str, threshold: float,
                      grow: float, feather: float, motion_region: str, editor: Optional[dict] = None):
            # The image controls serve a clip too (init strength, background freeze, the mask from its first frame).
            visible = gr.update(visible=bool(image_path or clip_path))
            try:
                preview = studio.mask_preview(image_path, mask_model, threshold, grow, feather, motion_region)
            except ValueError as exc:
                return None, f"⚠ {exc}", visible
            if preview.image is None:
                return None, "", visible
            layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
            value = {"background": preview.overlay, "layers": list(layers or []), "composite": None}
            return value, preview.note, visible

        image.change(show_mask, inputs=[image, clip, *mask_settings],
                     outputs=[mask_editor, mask_note, image_controls], api_visibility="private",
                     trigger_mode="always_last", show_progress_on=[mask_editor])
        gr.on([c.change for c in mask_settings], show_mask, inputs=[image, clip, *mask_settings, mask_editor],
              outputs=[mask_editor, mask_note, image_controls], api_visibility="private", trigger_mode="always_last",
              show_progress_on=[mask_editor])

        def mask_endpoint(image: Optional[str], mask_model: str = "u2netp", mask_threshold: float = 0.5,
                          mask_grow: float = 0, mask_feather: float = 8,
                          motion_region: str = "object") -> np.ndarray:
            """The motion mask the engine would use for ``image`` (white = may move), at preview size."""
            if not image:
                raise gr.Error("image: no image given; pass a reference image", print_exception=False)
            try:
                knobs_in = studio.mask_settings(dict(mask_model=mask_model, mask_threshold=mask_threshold,
                                                     mask_grow=mask_grow, mask_feather=mask_feather,
                                                     motion_region=motion_region), image)
                preview = studio.mask_preview(image, knobs_in.mask_model, knobs_in.mask_threshold,
                                              knobs_in.mask_grow, knobs_in.mask_feather, knobs_in.motion_region)
            except ValueError as exc:
                raise gr.Error(" ".join(str(exc).split()), print_exception=False) from None
            if preview.mask is None:
                if knobs_in.motion_region == "everything":
                    return np.full(preview.image.shape[:2], 255, dtype=np.uint8)
                raise gr.Error(preview.note, print_exception=False)
            return np.round(preview.mask * 255).astype(np.uint8)

        api_mask_inputs = [api[name] for name in ("image", "mask_model", "mask_threshold", "mask_grow",
                                                    "mask_feather", "motion_region")]
        api_mask_trigger.click(mask_endpoint, inputs=api_mask_inputs, outputs=[api_mask], api_name="mask")

        # ---------------------------------------------------------------- a clip to loop
        def on_clip(clip_path: Optional[str], image_path: Optional[str]):
            # With a clip: its own starting noise (the engine's default), the loop region, and no anchor (a clip's
            # first frame may change too); without one, back to the page's start.
            given = bool(clip_path)
            return (gr.update(visible=bool(given or image_path)),
                    gr.update(value=CLIP_INIT_STRENGTH if given else studio.default("init_strength")),
                    gr.update(interactive=given, info=help_text("loop_region") if given else NO_CLIP_NOTE),
                    gr.update(interactive=not given,
                              info=CLIP_ANCHOR_NOTE if given else help_text("anchor_strength")))

        clip.change(on_clip, inputs=[clip, image], outputs=[image_controls, init_strength, loop_region,
                                                             anchor_strength],
                    api_visibility="private", queue=False)

        # ---------------------------------------------------------------- knobs that depend on each other
        def on_frames(model_id: str, frames: float, window: str):
            return _length_updates(studio, model_id, int(frames), window)

        num_frames.input(on_frames, inputs=[model, num_frames, window_mode],
                         outputs=[shift_skip, window_mode, rope_scale], api_visibility="private",
                         trigger_mode="always_last", queue=False)
        window_mode.input(lambda m, f, w: _rope_update(studio, m, int(f), w), inputs=[model, num_frames, window_mode],
                          outputs=[rope_scale], api_visibility="private", queue=False)

        def on_shift(model_id: str, frames: float, k: float) -> str:
            return shift_note(int(frames), int(k), studio.spec(model_id).temporal_compression)

        gr.on([shift_skip.change, num_frames.change], on_shift, inputs=[model, num_frames, shift_skip],
              outputs=[shift_md], api_visibility="private", trigger_mode="always_last", queue=False)

        # Every knob follows the model: its fps, guidance, schedulers, sizes, loop lengths, and what it cannot do.
        following = {**knobs, "model_md": model_md, "banner_md": banner_md, "resolution": resolution}
        follow_outputs = [following[name] for name in FOLLOW_MODEL]

        def on_model(model_id: str, h: Optional[float], w: Optional[float]):
            # The size boxes, not the resolution dropdown, say what is shown: a dropdown input is checked against the
            # choices of the model it last showed, which a second quick model change has already replaced.
            try:
                updates = _model_updates(studio, model_id, _preset_for(h, w), h, w)
            except ValueError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            return [updates[name] for name in FOLLOW_MODEL]

        model.input(on_model, inputs=[model, height, width], outputs=follow_outputs, api_visibility="private",
                    queue=False)

        def on_resolution(preset: str):
            if preset not in RESOLUTION_PRESETS:
                return gr.skip(), gr.skip()
            h, w = RESOLUTION_PRESETS[preset]
            return h, w

        resolution.input(on_resolution, inputs=[resolution], outputs=[height, width], api_visibility="private",
                         queue=False)
        def on_size(model_id: str, h: Optional[float], w: Optional[float]):
            # The preset these boxes now show, else "Custom" where the model offers it (never a choice the model's list
            # lacks: the boxes of a fixed-size model are locked, and an update racing a model change must not fail).
            offered = [key for _, key in studio.model_view(model_id).resolutions]
            preset = _preset_for(h, w)
            return preset if preset in offered else gr.skip()

        gr.on([height.input, width.input], on_size, inputs=[model, height, width], outputs=[resolution],
              api_visibility="private", queue=False)
        dice.click(lambda: random.randint(0, 2**31 - 1), outputs=[seed], api_visibility="private", queue=False)

        def use_preview(model_id: str, window: str):
            # The model's own preview: a size and a length it accepts (CogVideoX-5b-I2V runs only at 720x480).
            preview = studio.model_view(model_id).preview
            frames = preview["num_frames"]
            return (preview["resolution"], preview["height"], preview["width"], frames,
                    preview["num_inference_steps"], *_length_updates(studio, model_id, frames, window))

        preview_btn.click(use_preview, inputs=[model, window_mode],
                          outputs=[resolution, height, width, num_frames, num_inference_steps, shift_skip,
                                   window_mode, rope_scale],
                          api_visibility="private", queue=False)

        # ---------------------------------------------------------------- gallery restore
        others = [name for name in RESTORED_FIELDS if name not in FOLLOW_MODEL]

        def restore(entries: list, evt: gr.SelectData):
            if not entries or evt.index is None or not 0 <= int(evt.index) < len(entries):
                raise gr.Error("that loop is no longer in this session's history", print_exception=False)
            entry: HistoryEntry = entries[int(evt.index)]
            values = dict(entry.values)
            preset = _preset_for(values.get("height"), values.get("width"))
            # The loop's model first (its choices, locks and notes), then the loop's own values over it; a value the
            # page sent as "automatic" (None) shows the model's.
            updates = _model_updates(studio, entry.model, preset, values.get("height"), values.get("width"))
            frames = int(values["num_frames"])
            window, mode = _window_update(studio, entry.model, frames, values.get("window_mode") or "full")
            updates.update(shift_skip=_shift_update(studio, entry.model, frames, values.get("shift_skip")),
                           window_mode=window,
                           rope_scale=_rope_update(studio, entry.model, frames, mode, values.get("rope_scale")))
            for name in ("num_frames", "guidance_scale", "scheduler", "use_dynamic_cfg", "flow_shift",
                         "image_channel", "fps"):
                if values.get(name) is not None or name == "flow_shift":
                    updates[name] = {**updates[name], "value": values.get(name)}
            used = [what for what, flag in (("a reference image", entry.used_image), ("a clip", entry.used_video))
                    if flag]
            note = f" (it used {' and '.join(used)}, which {'is' if len(used) == 1 else 'are'} not restored)" \
                if used else ""
            return (entry.model, *[updates[name] for name in FOLLOW_MODEL], *[values.get(name) for name in others],
                    entry.video, entry.strip, entry.files, f"Restored the settings of loop #{entry.index}{note}.")

        gallery.select(restore, inputs=[history],
                       outputs=[model, *follow_outputs, *[knobs[name] for name in others], video, strip, files,
                                status],
                       api_visibility="private", queue=False)

        def on_load():
            # A gr.Number built empty (native size, automatic flow shift) is sent as 0 by the browser until the server
            # sets it: set the empty boxes once, so "empty = automatic" reaches the app as None, not as a refused 0.
            h, w = RESOLUTION_PRESETS[studio.default_resolution()]
            return (_shift_update(studio, studio.model_id, frames0, studio.default("shift_skip")), h, w,
                    view.flow_shift.value)

        demo.load(on_load, outputs=[shift_skip, height, width, flow_shift], api_visibility="private", queue=False)

        def cleanup(request: gr.Request) -> None:
            studio.drop_session(_session(request))

        demo.unload(cleanup)

    # Generations wait in the studio's own line (it knows each job's place and can refuse with "busy"); Gradio's queue
    # only bounds everything else.
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=4)
    _name_refused_paths(demo)
    return demo
