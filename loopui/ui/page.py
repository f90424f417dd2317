"""The page's layout: the Gradio Blocks of the studio, its CSS and launch options. The handlers and their wiring
are ``events.py``; the service underneath is :class:`loopui.studio.Studio`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from loopui.engine.plan import CLIP_INIT_STRENGTH
from loopui.engine.lora_refs import LORA_EXPERTS, LORA_SCALE_MAX, LORA_SCALE_MIN
from loopui.engine.request import knob_info
from loopui.saliency import MASK_MODEL_INFO, MASK_MODELS
from loopui.studio import Studio
from loopui.studio.knobs import (
    IMAGE_CHANNEL_LABELS,
    LORA_EXPERT_LABELS,
    RESOLUTION_PRESETS,
    Knobs,
    help_text,
    model_spec,
    shift_note,
    window_state,
)
from loopui.studio.masks import PAINT_MOVE_COLOR, PAINT_STILL_COLOR
from loopui.studio.requests import COMPILE_CHOICES
from loopui.ui.components import (Page, api_inputs, knob_dropdown, knob_slider, name_refused_paths, uploaded_image,
                                  uploaded_video)
from loopui.ui.events import NO_CLIP_NOTE, wire
from loopui.ui.updates import recipe_update, rope_update

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
QUEUE_MAX_SIZE = 16  # Gradio's queue bound for the page's other events (generations wait in the studio's line)
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


def build_app(studio: Studio) -> gr.Blocks:
    """The studio page, queued (a bounded waiting line, one generation per device of the studio's pool at a time);
    launch it with ``.launch()``."""
    with gr.Blocks(title="loopui — seamless looping videos", delete_cache=(3600, 6 * 3600),
                   analytics_enabled=False) as demo:
        page = layout(studio.knobs)
        wire(page, studio, demo)
    # Generations wait in the studio's own line (it knows each job's place and can refuse with "busy"); Gradio's queue
    # only bounds everything else.
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=4)
    name_refused_paths(demo)
    return demo


def layout(knobs: Knobs) -> Page:
    """The page's components, laid out (inside a ``gr.Blocks``), starting at what ``knobs`` offers for the start-up
    model."""
    spec = model_spec(knobs.model_id)
    view = knobs.model_view(knobs.model_id)
    frames0 = knobs.default("num_frames")

    history = gr.State([])
    gr.Markdown("# loopui — seamless looping videos\nType a prompt (optionally add a reference image), press "
                "**Generate**, get a loop that plays without a seam. Training-free: the model sees its latent "
                "cycle rotated a little at every denoising step, so no frame is the edge.",
                elem_id="loopui-intro")
    banner_text = knobs.banner()
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
                    model = gr.Dropdown(choices=knobs.model_choices(), value=knobs.model_id, label="Model",
                                        elem_id="loopui-model", scale=3,
                                        info="Video model; it loads on the first Generate and then stays "
                                             "loaded.")
                    resolution = gr.Dropdown(
                        choices=view.resolutions, value=knobs.default_resolution(),
                        label="Resolution (width x height)", scale=2,
                        elem_id="loopui-resolution",
                        info="Smaller is much faster; the model's native size looks best.")
                model_md = gr.Markdown(view.text, elem_id="loopui-model-note")
                with gr.Row():
                    preset_h, preset_w = RESOLUTION_PRESETS[knobs.default_resolution()]
                    width = gr.Number(label="Width", value=preset_w, minimum=knob_info("width")["min"],
                                      maximum=knob_info("width")["max"], step=view.size_step,
                                      info=view.size.note, interactive=view.size.interactive,
                                      elem_id="loopui-width")
                    height = gr.Number(label="Height", value=preset_h, minimum=knob_info("height")["min"],
                                       maximum=knob_info("height")["max"], step=view.size_step,
                                       info=view.size.note, interactive=view.size.interactive,
                                       elem_id="loopui-height")
                num_frames = knob_slider("num_frames", "Loop length (frames)", frames0, minimum=view.frames[0],
                                     maximum=view.frames[1], step=view.frames[2], elem_id="loopui-frames")
                shift_skip = knob_slider("shift_skip", "Shift step k", knobs.default("shift_skip"))
                shift_md = gr.Markdown(shift_note(frames0, knobs.default("shift_skip"),
                                                  spec.temporal_compression))
                rope0 = rope_update(knobs.model_id, frames0, knobs.default("window_mode"))
                rope_scale = knob_slider("rope_scale", "RoPE scale", rope0["value"], info=rope0["info"],
                                     interactive=rope0["interactive"], elem_id="loopui-rope")
                with gr.Row():
                    num_inference_steps = knob_slider("num_inference_steps", "Steps",
                                                  knobs.default("num_inference_steps"), elem_id="loopui-steps")
                    guidance_scale = knob_slider("guidance_scale", "Guidance", view.guidance.value,
                                             info=view.guidance.note, elem_id="loopui-guidance")
                with gr.Row():
                    seed_info = knob_info("seed")
                    # No precision: a fractional seed reaches the one whole-number rule (refused, by name)
                    # instead of being rounded silently.
                    seed = gr.Number(label="Seed", value=knobs.default("seed"), minimum=seed_info["min"],
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
                            loop_region = knob_slider("loop_region", "Loop region", knobs.default("loop_region"),
                                                  interactive=False, info=NO_CLIP_NOTE,
                                                  elem_id="loopui-loop-region")
                    with gr.Group(visible=False) as image_controls:
                        motion_region = gr.Radio(choices=list(knob_info("motion_region")["choices"]),
                                                 value=knobs.default("motion_region"), label="Motion region",
                                                 info=help_text("motion_region"))
                        anchor_strength = knob_slider("anchor_strength", "Anchor strength",
                                                  knobs.default("anchor_strength"), elem_id="loopui-anchor")
                        init_strength = knob_slider("init_strength", "Init strength",
                                                knobs.default("init_strength"), elem_id="loopui-init")
                        background_freeze = knob_slider("background_freeze", "Background freeze",
                                                    knobs.default("background_freeze"))
                        image_channel = gr.Radio(
                            choices=[(IMAGE_CHANNEL_LABELS[c], c) for c in knob_info("image_channel")["choices"]],
                            value=view.image_channel.value, label="Image channel (image-to-video models)",
                            info=view.image_channel.note, interactive=view.image_channel.interactive,
                            elem_id="loopui-image-channel")
                        with gr.Accordion("Mask settings", open=False):
                            mask_model = knob_dropdown("mask_model", "Mask model", knobs.default("mask_model"),
                                                   choices=[(MASK_MODEL_INFO[m].label, m) for m in MASK_MODELS])
                            mask_threshold = knob_slider("mask_threshold", "Mask threshold",
                                                     knobs.default("mask_threshold"))
                            mask_grow = knob_slider("mask_grow", "Mask grow / shrink", knobs.default("mask_grow"))
                            mask_feather = knob_slider("mask_feather", "Mask feather",
                                                   knobs.default("mask_feather"))

                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        scheduler = knob_dropdown("scheduler", "Scheduler", view.scheduler, choices=view.schedulers,
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
                        frame_invariant_decoding = gr.Checkbox(value=knobs.default("frame_invariant_decoding"),
                                                               label="Frame-invariant decoding",
                                                               info=help_text("frame_invariant_decoding"))
                    with gr.Row():
                        shift_start = knob_slider("shift_start", "Shift start", knobs.default("shift_start"))
                        shift_end = knob_slider("shift_end", "Shift end", knobs.default("shift_end"))
                    window0 = window_state(knobs.model_id, frames0, knob_info("window_mode")["default"])
                    window_mode = gr.Radio(choices=list(knob_info("window_mode")["choices"]),
                                           value=window0.value, label="Long-loop mode", info=window0.note,
                                           interactive=window0.interactive, elem_id="loopui-window")
                    with gr.Row():
                        fps = knob_slider("fps", "FPS", view.fps, elem_id="loopui-fps")
                        seam_polish = knob_dropdown("seam_polish", "Seam polish", knobs.default("seam_polish"))
                    with gr.Row():
                        step_cache = knob_dropdown("step_cache", "Step cache", knobs.default("step_cache"),
                                                   elem_id="loopui-step-cache")
                        sigmas = gr.Textbox(label="Sigmas (Wan; empty = the scheduler's spacing)",
                                            value=view.sigmas.value, placeholder="1, 0.9375, 0.8333, 0.625",
                                            info=view.sigmas.note, interactive=view.sigmas.interactive,
                                            elem_id="loopui-sigmas")
                    attention, compile_, quantize = runtime_controls(knobs, view)

                lora_picks, lora_file, lora_scale, lora_expert = lora_controls(knobs, view)
                first = recipe_update(knobs.model_id, knobs.public)
                recipe = gr.Dropdown(choices=first["choices"], value="", label="Speed recipe",
                                     info=first["info"], interactive=first["interactive"], elem_id="loopui-recipe")

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
    api = api_inputs(knobs)
    api_mask = gr.Image(label="Motion mask", type="filepath", image_mode="L", format="png", visible=False)
    api_mask_trigger = gr.Button(visible=False)
    api_generate_trigger = gr.Button(visible=False)
    page_origin, api_origin = gr.State("page"), gr.State("api")

    fields: dict[str, gr.components.Component] = dict(
        prompt=prompt, negative_prompt=negative_prompt, image=image, mask=mask, shift_skip=shift_skip,
        rope_scale=rope_scale, num_frames=num_frames, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, seed=seed, height=height, width=width, scheduler=scheduler,
        flow_shift=flow_shift, use_dynamic_cfg=use_dynamic_cfg, frame_invariant_decoding=frame_invariant_decoding,
        shift_start=shift_start, shift_end=shift_end, window_mode=window_mode, fps=fps, seam_polish=seam_polish,
        anchor_strength=anchor_strength, init_strength=init_strength, background_freeze=background_freeze,
        image_channel=image_channel, video=clip, loop_region=loop_region,
        motion_region=motion_region, mask_model=mask_model, mask_threshold=mask_threshold, mask_grow=mask_grow,
        mask_feather=mask_feather, step_cache=step_cache, sigmas=sigmas, loras=lora_picks, attention=attention,
        compile=compile_, quantize=quantize,
    )

    return Page(fields=fields, api=api, model=model, history=history, banner_md=banner_md, preview_btn=preview_btn,
                model_md=model_md, resolution=resolution, shift_md=shift_md, dice=dice, mask_editor=mask_editor,
                mask_note=mask_note, image_controls=image_controls, generate_btn=generate_btn, stop_btn=stop_btn,
                video=video, status=status, seam_md=seam_md, strip=strip, files=files, gallery=gallery,
                api_mask=api_mask, api_mask_trigger=api_mask_trigger, api_generate_trigger=api_generate_trigger,
                page_origin=page_origin, api_origin=api_origin, lora_file=lora_file, lora_scale=lora_scale,
                lora_expert=lora_expert, recipe=recipe)


def runtime_controls(knobs: Knobs, view: Any) -> tuple[Any, Any, Any]:
    """How the model runs: the attention kernel, compilation and quantization ("auto" = the server's setting). On a
    public server compilation and quantization stay the server's (another choice would compile or load again for
    everyone)."""
    here = knobs.runtime
    locked = " Fixed on this public server." if knobs.public else ""
    with gr.Row():
        attention = gr.Dropdown(choices=view.attentions, value="auto", label="Attention kernel",
                                info=view.attention_note, elem_id="loopui-attention")
        compile_ = gr.Dropdown(choices=list(COMPILE_CHOICES), value="auto", label="Compile",
                               info=f"{help_text('compile')} Here auto = {'on' if here['compile'] else 'off'}."
                                    f"{locked}", interactive=not knobs.public, elem_id="loopui-compile")
        quantize = gr.Dropdown(choices=["auto", *knob_info("quantize")["choices"]], value="auto", label="Quantize",
                               info=f"{help_text('quantize')} Here auto = {here['quantize']}.{locked}",
                               interactive=not knobs.public, elem_id="loopui-quantize")
    return attention, compile_, quantize


def lora_controls(knobs: Knobs, view: Any) -> tuple[Any, Any, Any, Any]:
    """The LoRA accordion: the server's LoRAs picked by file name, an upload (not in public mode), one scale for
    them all and, on a two-expert model, the expert they adapt. Hidden where there is nothing to offer (a public
    server without ``--lora-dir``)."""
    names = list(knobs.loras)
    uploads = not knobs.public
    where = (f"{len(names)} on this server" if names else "none on this server") + (
        "; or upload your own" if uploads else "")
    with gr.Accordion(f"LoRAs ({where})", open=False, visible=bool(names or uploads),
                      elem_id="loopui-loras"):
        gr.Markdown("Style, motion or speed LoRAs made for the chosen model's family (diffusers/PEFT, Kohya, "
                    "ComfyUI and lightx2v files, read by diffusers); a file made for another model is refused "
                    "before anything runs.", elem_id="loopui-lora-note")
        with gr.Row():
            picks = gr.Dropdown(choices=names, value=[], multiselect=True, label="This server's LoRAs",
                                info="By file name (--lora-dir)." if names else "None: the server was started "
                                                                                 "without --lora-dir.",
                                interactive=bool(names), elem_id="loopui-lora-picks", scale=3)
            upload = gr.File(label="Your LoRA (.safetensors)", file_types=[".safetensors"], type="filepath",
                             visible=uploads, elem_id="loopui-lora-file", scale=2, height=130)
        with gr.Row():
            slider = gr.Slider(minimum=LORA_SCALE_MIN, maximum=LORA_SCALE_MAX, step=0.05, value=1.0,
                               label="LoRA scale", info="Applies to every LoRA picked or uploaded (1 = as trained, "
                                                        "0 = off, negative = the opposite).",
                               elem_id="loopui-lora-scale", scale=3)
            expert = gr.Radio(choices=[(LORA_EXPERT_LABELS[e], e) for e in LORA_EXPERTS],
                              value=view.lora_expert.value, label="Expert (Wan 2.2 A14B)",
                              info=view.lora_expert.note, interactive=view.lora_expert.interactive,
                              elem_id="loopui-lora-expert", scale=2)
    return picks, upload, slider, expert
