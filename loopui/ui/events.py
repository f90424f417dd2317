"""The page's event handlers over one :class:`loopui.studio.Studio`, and :func:`wire`, which connects them to the
page's components.

Handlers validate, turn ``ValueError`` into ``gr.Error`` and call one studio/engine function. Generation runs in a
worker thread (``loopui.studio.jobs``); the ``generate`` generator only relays its progress, and Stop sets the job's
cancel event, which the engine checks after every denoising step.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from typing import Any, Optional

import gradio as gr
import numpy as np

from loopui.engine.plan import CLIP_INIT_STRENGTH
from loopui.messages import one_line
from loopui.studio import Studio, requests
from loopui.studio.jobs import LeftLine, ProgressClock
from loopui.studio.knobs import RESOLUTION_PRESETS, help_text, model_spec, shift_note
from loopui.studio.requests import REQUEST_FIELDS, page_compile
from loopui.studio.results import MAX_HISTORY, RESTORED_FIELDS, HistoryEntry, error_text, history_entry
from loopui.ui.components import Page
from loopui.ui.updates import (
    FOLLOW_MODEL,
    length_updates,
    model_updates,
    preset_for,
    progress_view,
    rope_update,
    shift_update,
    window_update,
)
from loopui.ui.zerogpu import gpu_decorator

logger = logging.getLogger(__name__)

# The generator yields at least this often: a cancelled event can only close it between yields.
HEARTBEAT_SECONDS = 0.5
STOPPED_IN_LINE = "Stopped while queued: your loop left the queue before it started. Ready for the next loop."
CLIP_ANCHOR_NOTE = "Inert with a clip: the clip's first frame may change too (lower Init strength keeps it closer)."
NO_CLIP_NOTE = "Only with a clip: add one to choose how much of the cycle around the wrap may change."
# The knobs a gallery click restores besides those that follow the model (FOLLOW_MODEL), in restore's output order.
RESTORED_OTHERS = tuple(name for name in RESTORED_FIELDS if name not in FOLLOW_MODEL)


def session_id(request: Optional[gr.Request]) -> str:
    """The browser session a request comes from ("anonymous" without one)."""
    return getattr(request, "session_hash", None) or "anonymous"


def random_seed() -> int:
    """A fresh seed for the dice button."""
    return random.randint(0, 2**31 - 1)


def gallery_items(entries: list) -> list[tuple[str, str]]:
    """(thumbnail, caption) of each history entry, newest first, for the gallery."""
    return [(e.thumb, e.caption) for e in entries]


def on_resolution(preset: str) -> tuple[Any, Any]:
    """The size boxes for a resolution preset (unchanged for "Custom")."""
    if preset not in RESOLUTION_PRESETS:
        return gr.skip(), gr.skip()
    h, w = RESOLUTION_PRESETS[preset]
    return h, w


def on_frames(model_id: str, frames: float, window: str) -> tuple[Any, Any, Any]:
    """Shift, long-loop mode and RoPE scale after the loop length changed."""
    return length_updates(model_id, int(frames), window)


def on_window(model_id: str, frames: float, window: str) -> Any:
    """The RoPE slider after the long-loop mode changed."""
    return rope_update(model_id, int(frames), window)


def on_shift(model_id: str, frames: float, k: float) -> str:
    """The note under the shift slider."""
    return shift_note(int(frames), int(k), model_spec(model_id).temporal_compression)


class Handlers:
    """The page's handlers that need the studio: generation, Stop, masks, the clip, the model, the gallery."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.knobs = studio.knobs
        # ZeroGPU sizes each call by its arguments (a no-op decorator off Spaces).
        self.generate = gpu_decorator(duration=self.gpu_duration)(self.generate)

    # -- generation -----------------------------------------------------------------------------------------------

    def gpu_duration(self, *args: Any, **kwargs: Any) -> int:
        """ZeroGPU calls this with generate's own arguments and refuses a visitor whose quota is below the answer."""
        values = inspect.signature(self.generate).bind_partial(*args, **kwargs).arguments
        return self.studio.gpu_seconds(values.get("model") or self.studio.model_id, values)

    def generate(self, prompt: str, negative_prompt: str, num_frames: float,
                 seed: float, frame_invariant_decoding: bool, shift_start: float, shift_end: float,
                 window_mode: str, seam_polish: str, step_cache: str, anchor_strength: float, loop_region: float,
                 background_freeze: float, image_channel: str, motion_region: str, mask_model: str,
                 mask_threshold: float, mask_grow: float, mask_feather: float, model: Optional[str],
                 history: list, origin: str, num_inference_steps: Optional[float] = None,
                 shift_skip: Optional[float] = None,
                 rope_scale: Optional[float] = None, height: Optional[float] = None, width: Optional[float] = None,
                 scheduler: Optional[str] = None, guidance_scale: Optional[float] = None,
                 use_dynamic_cfg: Optional[bool] = None, fps: Optional[float] = None,
                 flow_shift: Optional[float] = None, init_strength: Optional[float] = None,
                 sigmas: Optional[Any] = None, loras: Optional[Any] = None, recipe: Optional[str] = None,
                 attention: str = "auto", compile: Optional[Any] = None, quantize: Optional[str] = None,
                 image: Optional[str] = None, mask: Optional[str] = None, video: Optional[str] = None,
                 lora_file: Optional[str] = None, lora_scale: Optional[float] = None,
                 lora_expert: Optional[str] = None,
                 request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """Generate a seamless loop from a prompt (optionally a reference image, or a clip to turn into a loop:
        ``video``); returns the looping MP4 first, then the seam note, the seam strip, the files (MP4, GIF, WebP,
        settings JSON) and a status line. Knobs left out (or null / "auto") get the automatic values the page
        and the CLI use (steps: the model's; init strength: 1, or 0.7 with a clip). ``sigmas``: a list or
        "1, 0.94, 0.83" (Wan); ``loras``: a list of "source:scale" (or one per line); ``recipe``: a speed recipe's
        name (``loopui models`` lists them), filling the knobs left out. ``attention``, ``compile`` and ``quantize``:
        how the model runs (left out: the server's setting)."""
        arguments = dict(locals())
        values = {name: value for name, value in arguments.items() if name in REQUEST_FIELDS}
        values["recipe"] = recipe
        studio = self.studio
        skip = gr.skip()
        try:
            model_id = studio.check_model(model).model_id
            if origin == "page":
                # The page's LoRA picks are names, with one scale and expert for them all, plus an upload.
                values["loras"] = studio.page_loras(loras, lora_file, lora_scale, lora_expert)
                values = studio.page_values(values, model_id)
            resolved = studio.build_request(values, model_id=model_id)
            # The page's Generate replaces the tab's running loop; an API client's jobs (a batch from one Client shares
            # one session) all run, each stopped by its own cancel or by Stop.
            job = studio.start(session_id(request), model_id, resolved, replace=origin == "page")
        except ValueError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None
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
                        shown, line = progress_view(event, clock)
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
                    entry = history_entry(outcome, values, model_id)
                    new_history = ([entry] + list(history or []))[:MAX_HISTORY]
                    # A warning said before the run (cost, an unused clip) is one of the notes already.
                    warn = "".join(f"\n\n⚠ {w}" for w in outcome.warnings if w not in resolved.notes)
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
                    message = error_text(exc)
                    # The status line must not keep saying "fetching" or "denoising" after a failure.
                    yield skip, skip, skip, skip, f"✖ Failed: {message}", skip
                    raise gr.Error(message, print_exception=False)
        finally:
            # A cancelled Gradio event closes this generator: make the worker stop too (within one step).
            if job.running:
                job.cancel()

    def stop(self, request: gr.Request) -> str:
        """Stop the session's job (a queued one leaves the line)."""
        job = self.studio.jobs.stop(session_id(request))
        if job is None:
            return "Nothing to stop. Ready."
        if job.stage == "queue":
            return STOPPED_IN_LINE
        return "Stopped: the worker ends after the current denoising step. Ready for the next loop."

    def cleanup(self, request: gr.Request) -> None:
        """A browser tab went away: stop its job and delete its files."""
        self.studio.drop_session(session_id(request))

    # -- masks ----------------------------------------------------------------------------------------------------

    def prepare_mask(self, image_path: Optional[str], editor: Optional[dict], mask_model: str,
                     motion_region: str) -> Optional[np.ndarray]:
        """The painted mask sent with the page's Generate (None when nothing was painted)."""
        layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
        try:
            return self.studio.masks.painted_mask(image_path, layers, mask_model, motion_region)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def show_mask(self, image_path: Optional[str], clip_path: Optional[str], mask_model: str, threshold: float,
                  grow: float, feather: float, motion_region: str, editor: Optional[dict] = None):
        """The mask editor's preview, its note and the image controls' visibility."""
        # The image controls serve a clip too (init strength, background freeze, the mask from its first frame).
        visible = gr.update(visible=bool(image_path or clip_path))
        try:
            preview = self.studio.masks.preview(image_path, mask_model, threshold, grow, feather, motion_region)
        except ValueError as exc:
            return None, f"⚠ {exc}", visible
        if preview.image is None:
            return None, "", visible
        layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
        value = {"background": preview.overlay, "layers": list(layers or []), "composite": None}
        return value, preview.note, visible

    def mask_endpoint(self, image: Optional[str], mask_model: str = "u2netp", mask_threshold: float = 0.5,
                      mask_grow: float = 0, mask_feather: float = 8,
                      motion_region: str = "object") -> np.ndarray:
        """The motion mask the engine would use for ``image`` (white = may move), at preview size."""
        if not image:
            raise gr.Error("image: no image given; pass a reference image", print_exception=False)
        try:
            knobs_in = requests.mask_settings(dict(mask_model=mask_model, mask_threshold=mask_threshold,
                                                   mask_grow=mask_grow, mask_feather=mask_feather,
                                                   motion_region=motion_region), image)
            preview = self.studio.masks.preview(image, knobs_in.mask_model, knobs_in.mask_threshold,
                                                knobs_in.mask_grow, knobs_in.mask_feather, knobs_in.motion_region)
        except ValueError as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None
        if preview.mask is None:
            if knobs_in.motion_region == "everything":
                return np.full(preview.image.shape[:2], 255, dtype=np.uint8)
            raise gr.Error(preview.note, print_exception=False)
        return np.round(preview.mask * 255).astype(np.uint8)

    # -- knobs ----------------------------------------------------------------------------------------------------

    def on_clip(self, clip_path: Optional[str], image_path: Optional[str]):
        """The image controls after a clip was added or removed."""
        # With a clip: its own starting noise (the engine's default), the loop region, and no anchor (a clip's
        # first frame may change too); without one, back to the page's start.
        given = bool(clip_path)
        return (gr.update(visible=bool(given or image_path)),
                gr.update(value=CLIP_INIT_STRENGTH if given else self.knobs.default("init_strength")),
                gr.update(interactive=given, info=help_text("loop_region") if given else NO_CLIP_NOTE),
                gr.update(interactive=not given,
                          info=CLIP_ANCHOR_NOTE if given else help_text("anchor_strength")))

    def on_model(self, model_id: str, h: Optional[float], w: Optional[float],
                 steps: Optional[float] = None) -> list:
        """Every knob that follows the model (``FOLLOW_MODEL``), for a newly chosen model."""
        # The size boxes, not the resolution dropdown, say what is shown: a dropdown input is checked against the
        # choices of the model it last showed, which a second quick model change has already replaced.
        try:
            updates = model_updates(self.knobs, model_id, preset_for(h, w), h, w, steps)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return [updates[name] for name in FOLLOW_MODEL]

    def on_size(self, model_id: str, h: Optional[float], w: Optional[float]) -> Any:
        """The resolution dropdown after the size boxes were edited."""
        # The preset these boxes now show, else "Custom" where the model offers it (never a choice the model's list
        # lacks: the boxes of a fixed-size model are locked, and an update racing a model change must not fail).
        offered = [key for _, key in self.knobs.model_view(model_id).resolutions]
        preset = preset_for(h, w)
        return preset if preset in offered else gr.skip()

    def use_preview(self, model_id: str, window: str) -> tuple:
        """The model's own preview settings: a size and a length it accepts (CogVideoX-5b-I2V runs only at
        720x480)."""
        preview = self.knobs.model_view(model_id).preview
        frames = preview["num_frames"]
        return (preview["resolution"], preview["height"], preview["width"], frames,
                preview["num_inference_steps"], *length_updates(model_id, frames, window))

    def restore(self, entries: list, evt: gr.SelectData) -> tuple:
        """A gallery click: the loop's model, its knobs, its files and a status line."""
        if not entries or evt.index is None or not 0 <= int(evt.index) < len(entries):
            raise gr.Error("that loop is no longer in this session's history", print_exception=False)
        entry: HistoryEntry = entries[int(evt.index)]
        values = dict(entry.values)
        preset = preset_for(values.get("height"), values.get("width"))
        # The loop's model first (its choices, locks and notes), then the loop's own values over it; a value the
        # page sent as "automatic" (None) shows the model's.
        updates = model_updates(self.knobs, entry.model, preset, values.get("height"), values.get("width"))
        frames = int(values["num_frames"])
        window, mode = window_update(entry.model, frames, values.get("window_mode") or "full")
        updates.update(shift_skip=shift_update(entry.model, frames, values.get("shift_skip")),
                       window_mode=window,
                       rope_scale=rope_update(entry.model, frames, mode, values.get("rope_scale")))
        for name in ("num_frames", "num_inference_steps", "guidance_scale", "scheduler", "use_dynamic_cfg",
                     "flow_shift", "sigmas", "image_channel", "fps"):
            if values.get(name) is not None or name in ("flow_shift", "sigmas"):
                updates[name] = {**updates[name], "value": values.get(name)}
        # The speed recipe and the kernel, where the loop's model offers them (a kernel chosen as "auto" stays so).
        for name, offered in (("recipe", updates["recipe"].get("choices") or []),
                              ("attention", updates["attention"].get("choices") or [])):
            if values.get(name) and values[name] in [c[1] if isinstance(c, tuple) else c for c in offered]:
                updates[name] = {**updates[name], "value": values[name]}
        values["compile"] = page_compile(values.get("compile"))
        values["quantize"] = values.get("quantize") or "auto"
        used = [what for what, flag in (("a reference image", entry.used_image), ("a clip", entry.used_video),
                                        ("LoRAs", entry.used_loras)) if flag]
        plural = len(used) > 1 or used == ["LoRAs"]
        note = f" (it used {' and '.join(used)}, which {'are' if plural else 'is'} not restored)" \
            if used else ""
        return (entry.model, *[updates[name] for name in FOLLOW_MODEL], *[values.get(name) for name in RESTORED_OTHERS],
                entry.video, entry.strip, entry.files, f"Restored the settings of loop #{entry.index}{note}.")

    def on_load(self) -> tuple:
        """The knobs a fresh page must set once it has loaded."""
        # A gr.Number built empty (native size, automatic flow shift) is sent as 0 by the browser until the server
        # sets it: set the empty boxes once, so "empty = automatic" reaches the app as None, not as a refused 0.
        knobs = self.knobs
        h, w = RESOLUTION_PRESETS[knobs.default_resolution()]
        return (shift_update(knobs.model_id, knobs.default("num_frames"), knobs.default("shift_skip")), h, w,
                knobs.model_view(knobs.model_id).flow_shift.value)


def wire(page: Page, studio: Studio, demo: gr.Blocks) -> Handlers:
    """Connect the page's components to the handlers (inside ``demo``'s ``with`` block); returns the handlers."""
    on = Handlers(studio)
    fields, api = page.fields, page.api
    private = dict(api_visibility="private")

    # -- generation: the page's Generate (its painted mask first) and the /generate and /stop endpoints
    # Inputs follow generate's signature, matched by name; the knobs whose API default is "automatic" (None) come
    # last with a Python default, which is how Gradio tells clients they may leave them out.
    def inputs_for(by_name: dict) -> list:
        return [by_name[p] for p in inspect.signature(on.generate).parameters if p in by_name]

    page_inputs = inputs_for({**fields, "model": page.model, "history": page.history, "origin": page.page_origin,
                              "lora_file": page.lora_file, "lora_scale": page.lora_scale,
                              "lora_expert": page.lora_expert, "recipe": page.recipe})
    api_inputs = inputs_for({**api, "history": page.history, "origin": page.api_origin})
    outputs = [page.video, page.seam_md, page.strip, page.files, page.status, page.history]
    # No Gradio limit of its own: a limit at the line's size kept the extra clients in Gradio's queue, where the
    # studio's line never saw them to answer "busy".
    generation = dict(concurrency_limit=None, concurrency_id="generate")
    mask_step = page.generate_btn.click(on.prepare_mask, inputs=[fields["image"], page.mask_editor,
                                                                 fields["mask_model"], fields["motion_region"]],
                                        outputs=[fields["mask"]], queue=False, **private)
    gen_event = mask_step.then(on.generate, inputs=page_inputs, outputs=outputs, api_name="page_generate",
                               show_progress_on=[page.video], **private, **generation)
    gen_event.then(gallery_items, inputs=[page.history], outputs=[page.gallery], queue=False, **private)
    page.api_generate_trigger.click(on.generate, inputs=api_inputs, outputs=outputs, api_name="generate",
                                    **generation)
    page.stop_btn.click(on.stop, inputs=None, outputs=[page.status], cancels=[gen_event], queue=False,
                        api_name="stop", api_visibility="undocumented")

    # -- masks: the editor's preview follows the image and the mask knobs; the /mask endpoint
    mask_settings = [fields[name] for name in ("mask_model", "mask_threshold", "mask_grow", "mask_feather",
                                              "motion_region")]
    mask_outputs = [page.mask_editor, page.mask_note, page.image_controls]
    fields["image"].change(on.show_mask, inputs=[fields["image"], fields["video"], *mask_settings],
                           outputs=mask_outputs, trigger_mode="always_last", show_progress_on=[page.mask_editor],
                           **private)
    gr.on([c.change for c in mask_settings], on.show_mask,
          inputs=[fields["image"], fields["video"], *mask_settings, page.mask_editor], outputs=mask_outputs,
          trigger_mode="always_last", show_progress_on=[page.mask_editor], **private)
    api_mask_inputs = [api[name] for name in ("image", "mask_model", "mask_threshold", "mask_grow",
                                              "mask_feather", "motion_region")]
    page.api_mask_trigger.click(on.mask_endpoint, inputs=api_mask_inputs, outputs=[page.api_mask], api_name="mask")

    # -- a clip to loop
    fields["video"].change(on.on_clip, inputs=[fields["video"], fields["image"]],
                          outputs=[page.image_controls, fields["init_strength"], fields["loop_region"],
                                   fields["anchor_strength"]], queue=False, **private)

    # -- knobs that depend on each other
    num_frames, window_mode, shift_skip = fields["num_frames"], fields["window_mode"], fields["shift_skip"]
    num_frames.input(on_frames, inputs=[page.model, num_frames, window_mode],
                     outputs=[shift_skip, window_mode, fields["rope_scale"]], trigger_mode="always_last",
                     queue=False, **private)
    window_mode.input(on_window, inputs=[page.model, num_frames, window_mode], outputs=[fields["rope_scale"]],
                      queue=False, **private)
    gr.on([shift_skip.change, num_frames.change], on_shift, inputs=[page.model, num_frames, shift_skip],
          outputs=[page.shift_md], trigger_mode="always_last", queue=False, **private)

    # Every knob follows the model: its fps, guidance, schedulers, sizes, loop lengths, and what it cannot do.
    following = {**fields, "model_md": page.model_md, "banner_md": page.banner_md, "resolution": page.resolution,
                 "lora_expert": page.lora_expert, "recipe": page.recipe}
    follow_outputs = [following[name] for name in FOLLOW_MODEL]
    size_boxes = [fields["height"], fields["width"]]
    page.model.input(on.on_model, inputs=[page.model, *size_boxes, fields["num_inference_steps"]],
                     outputs=follow_outputs, queue=False, **private)
    page.resolution.input(on_resolution, inputs=[page.resolution], outputs=size_boxes, queue=False, **private)
    gr.on([box.input for box in size_boxes], on.on_size, inputs=[page.model, *size_boxes],
          outputs=[page.resolution], queue=False, **private)
    page.dice.click(random_seed, outputs=[fields["seed"]], queue=False, **private)
    page.preview_btn.click(on.use_preview, inputs=[page.model, window_mode],
                           outputs=[page.resolution, *size_boxes, num_frames, fields["num_inference_steps"],
                                    shift_skip, window_mode, fields["rope_scale"]], queue=False, **private)

    # -- gallery restore
    page.gallery.select(on.restore, inputs=[page.history],
                        outputs=[page.model, *follow_outputs, *[fields[name] for name in RESTORED_OTHERS],
                                 page.video, page.strip, page.files, page.status], queue=False, **private)

    demo.load(on.on_load, outputs=[shift_skip, *size_boxes, fields["flow_shift"]], queue=False, **private)
    demo.unload(on.cleanup)
    return on
