"""The page's components: uploads and hidden API inputs whose bad values end as one line naming the parameter,
sliders and dropdowns that take their range, choices and help from ``LoopRequest``, and ``Page``, the components
the handlers read and write."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from loopui.engine.request import WHOLE_NUMBER_FIELDS, LoopRequest, knob_info
from loopui.messages import one_line
from loopui.studio.knobs import Knobs, help_text
from loopui.studio.requests import REQUEST_FIELDS


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
    component.loopui_upload = (param, kind)  # read by name_refused_paths
    return component


def name_refused_paths(demo: gr.Blocks) -> None:
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
    reason = one_line(exc).replace(str(getattr(payload, "path", "") or "\0"), name)
    return f"{param}: {name!r} cannot be read as an image ({reason[:200]})"


# The API's list knobs: a JSON list or one string (sigmas "1, 0.94, 0.83"; LoRAs one per line), null = none.
LIST_SCHEMAS: dict[str, dict] = {
    "sigmas": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}, {"type": "null"}]},
    "loras": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]},
}


def api_value(component: gr.components.Component, whole: bool = False,
              automatic: bool = False, schema: Optional[dict] = None) -> gr.components.Component:
    """A hidden ``/generate`` input that hands the client's value to the app untouched.

    Gradio's Number rounds to its precision and answers out-of-range values with "Value -1 is less than minimum
    value 0." (no parameter name), its Checkbox takes any value; here ``LoopRequest``'s own checks answer, naming
    the parameter, and a knob with an automatic value (``automatic``) accepts null or "auto" and defaults to null.
    ``schema``: the JSON schema clients see (a list knob's, ``LIST_SCHEMAS``).
    """
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    if automatic:
        component.value = None  # a Checkbox turns None into False when built; null is "the model's choice"
    if schema is not None:
        component.api_info = lambda: schema  # type: ignore[method-assign]
    elif isinstance(component, (gr.Number, gr.Checkbox)):
        kind = {"type": "boolean"} if isinstance(component, gr.Checkbox) else {
            "type": "integer" if whole else "number"}
        info = kind if component.value is not None else {"anyOf": [kind, {"type": "null"}]}
        component.api_info = lambda: info  # type: ignore[method-assign]
    return component


def knob_slider(name: str, label: str, value: Any, **overrides: Any) -> gr.Slider:
    """A slider for the knob ``name`` with ``LoopRequest``'s range and step and the knob's help as its note."""
    info = knob_info(name)
    kwargs = dict(minimum=info["min"], maximum=info["max"], step=info["step"], value=value, label=label,
                  info=help_text(name))
    kwargs.update(overrides)
    return gr.Slider(**kwargs)


def knob_dropdown(name: str, label: str, value: Any, choices: Optional[list] = None,
                  **overrides: Any) -> gr.Dropdown:
    """A dropdown for the knob ``name``: ``LoopRequest``'s choices (unless ``choices`` says otherwise), its help as
    the note."""
    choices = choices if choices is not None else list(knob_info(name)["choices"])
    return gr.Dropdown(choices=choices, value=value, label=label, info=help_text(name), **overrides)


def api_inputs(knobs: Knobs) -> dict[str, gr.components.Component]:
    """Hidden twins of the page's knobs for the ``/generate`` and ``/mask`` API: defaults as the page starts, except
    that knobs with an automatic value (shift, RoPE scale, size, and what follows the model: scheduler, guidance,
    dynamic CFG, fps, flow shift) default to automatic -- so a client that changes ``num_frames`` or ``model`` and
    leaves them out gets what the page and the CLI compute for that model. The steps are the model's own (50; 40
    on Wan 2.1 I2V and Wan 2.2 A14B; with ``sigmas``, one per sigma); ``sigmas`` and ``loras`` take a JSON list or
    one string."""
    automatic = {"shift_skip", "rope_scale", "height", "width", "scheduler", "guidance_scale", "use_dynamic_cfg",
                 "fps", "flow_shift", "init_strength", "num_inference_steps", "sigmas", "compile", "quantize"}
    hints = typing.get_type_hints(LoopRequest)
    out: dict[str, gr.components.Component] = {}
    for name in REQUEST_FIELDS:
        if name in ("image", "mask"):
            out[name] = uploaded_image(name, label=name, visible=False)
            continue
        if name == "video":
            out[name] = uploaded_video(name, label=name, visible=False)
            continue
        if name in LIST_SCHEMAS:
            out[name] = api_value(gr.Textbox(label=name, value=None, visible=False), automatic=True,
                                  schema=LIST_SCHEMAS[name])
            continue
        info = knob_info(name)
        value = None if name in automatic else knobs.default(name)
        if name in ("prompt", "negative_prompt") or info.get("choices") or name == "mask_model":
            out[name] = gr.Textbox(label=name, value=value, visible=False)
        elif bool in (hints[name], *typing.get_args(hints[name])):
            out[name] = api_value(gr.Checkbox(label=name, value=bool(value), visible=False), automatic=value is None)
        else:
            out[name] = api_value(gr.Number(label=name, value=value, visible=False),
                                  whole=name in WHOLE_NUMBER_FIELDS)
    out["model"] = gr.Textbox(label="model", value=knobs.model_id, visible=False)
    out["recipe"] = gr.Textbox(label="recipe", value=None, visible=False)
    return out


@dataclass
class Page:
    """The components the handlers read and write: ``fields`` holds the page's input for each request field
    (``REQUEST_FIELDS``), ``api`` their hidden twins for the API plus ``model``."""

    fields: dict[str, gr.components.Component]
    api: dict[str, gr.components.Component]
    model: Any
    history: Any
    banner_md: Any
    preview_btn: Any
    model_md: Any
    resolution: Any
    shift_md: Any
    dice: Any
    mask_editor: Any
    mask_note: Any
    image_controls: Any
    generate_btn: Any
    stop_btn: Any
    video: Any
    status: Any
    seam_md: Any
    strip: Any
    files: Any
    gallery: Any
    api_mask: Any
    api_mask_trigger: Any
    api_generate_trigger: Any
    page_origin: Any
    api_origin: Any
    # The page's LoRA controls besides the picks (``fields["loras"]``): an upload, one scale, the expert.
    lora_file: Any = None
    lora_scale: Any = None
    lora_expert: Any = None
    recipe: Any = None
