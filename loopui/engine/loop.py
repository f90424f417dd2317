"""``generate_loop``: a stock diffusers video pipeline (CogVideoX, Wan), turned into a seamless-loop sampler.

Nothing of the pipeline's ``__call__`` is copied. For one call, three extension points are used:
the transformer's ``forward`` (clips of the cycle: rotate in / rotate back, windows, seam polish, the init-strength
oracle, I2V conditioning), the rotary-table preparation (NTK scaling of time; where it lives is the family's
business) and ``callback_on_step_end`` (step counter, image pulls, progress, cooperative cancel). When an I2V model's
image channel carries the loop's own estimate, the scheduler's ``step`` is observed (not changed) to read it. All of
it is restored afterwards, so a cached pipeline stays stock. The same numbered steps serve every family: what
differs lives in ``loopui.engine.families``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from loopui.models import accel
from loopui.models.lora import active_loras
from loopui.models.quantize import check_pipeline_quantization, pipeline_quantization

from .conditioning import ImageConditioning, mask_to_latent_grid
from .decode import decode_with_still, video_to_uint8
from .families import Family, family_for
from .families.base import patch_attribute
from .errors import LoopInterrupted
from .guards import cancel_checkpoint, ensure_finite, vae_memory_defaults
from .locks import holds_pipeline_lock
from .noise import clean_estimate
from .plan import LoopPlan, plan_loop
from .polish import SEAM_POLISH_PRESETS
from .request import LoopRequest
from .schedules import scheduled
from .stepcache import LoopStepCache, check_no_diffusers_cache
from .shift import CycleDenoiser, ImageChannel, ShiftSchedule, StepState, noise_fraction

logger = logging.getLogger(__name__)

# callback(stage, step, total): "encode", "compile" (before a first call at a shape with compile on), "denoise" (after
# each step), "decode", "export" (render_loop).
ProgressCallback = Callable[[str, int, int], None]

__all__ = ["LoopResult", "generate_loop", "pipeline_spec"]


@dataclass
class LoopResult:
    """What one loop generation produced: the frames, the plan it followed and what the run itself found."""

    frames: Optional[np.ndarray]  # (F, H, W, 3) uint8, None for output_type="latent"
    latents: torch.Tensor  # final latents before decoding, float32 on CPU, the family's layout (latent_layout)
    plan: LoopPlan
    seam_ratio: Optional[float]
    interior_ratio: Optional[float]
    worst_step: Optional[tuple[int, int]]
    family: str
    pipeline: str  # the diffusers class name
    scheduler_class: str
    latent_layout: str
    num_output_frames: int
    anchor_frame_shift: int = 0
    model_calls: int = 0
    model_id: Optional[str] = None  # the name the model was asked for (render_loop), else the spec's
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    latent_seam_ratio: Optional[float] = None
    latent_interior_ratio: Optional[float] = None
    scores: dict = field(default_factory=dict)  # the papers' pixel metrics (loopui.media.loop_scores, no flow/CLIP)
    # The largest jump anywhere in the cycle, wrap included, against the steps around it: no rotation changes it.
    cycle_ratio: Optional[float] = None
    latent_cycle_ratio: Optional[float] = None
    attention: str = "native"  # the attention kernel the denoiser(s) ran with (loopui.models.accel)
    compiled: bool = False  # whether their repeated blocks ran compiled
    quantize: str = "none"  # the quantization of their weights (loopui.models.quantize), whoever chose it

    @property
    def settings(self) -> dict:
        """Every setting as used, JSON-ready: the request's knobs with the plan's resolved values (the sidecar's
        ``settings``)."""
        plan, spec = self.plan, self.plan.spec
        settings = plan.request.to_dict()
        settings.update(
            shift_skip=plan.shift_skip, rope_scale=plan.rope_scale, height=plan.height, width=plan.width,
            num_latent_frames=plan.num_latents, trained_latent_frames=spec.trained_latent_frames,
            guidance_scale=plan.guidance_scale, guidance_scale_2=plan.guidance_scale_2,
            use_dynamic_cfg=plan.use_dynamic_cfg, fps=plan.fps, flow_shift=plan.flow_shift,
            num_output_frames=self.num_output_frames, scheduler_class=self.scheduler_class,
            scheduler=plan.scheduler, model=self.model_id or spec.model_id, family=self.family,
            pipeline=self.pipeline, latent_layout=self.latent_layout, anchor_frame_shift=self.anchor_frame_shift,
            init_strength=plan.init_strength, model_calls=self.model_calls,
            num_inference_steps=plan.num_inference_steps, negative_prompt=plan.negative_prompt,
            image_channel=plan.image_channel,  # None: inert without image-to-video conditioning
            loras=[lora.record() for lora in plan.lora_files or ()],  # each with its file's sha256
            attention=self.attention, compile=self.compiled, quantize=self.quantize,
        )
        if plan.request.video is not None:
            settings["anchor_strength"] = 0.0  # inert with a clip: its first frame may change too
        return settings

    def describe_worst_step(self) -> str:
        if self.worst_step is None:
            return ""
        return f"largest jump between frames {self.worst_step[0]} and {self.worst_step[1]}"


def pipeline_spec(pipe: Any) -> Any:
    """The ``ModelSpec`` of a built pipeline (registry recommendations when it was loaded from a registry id)."""
    from loopui.models.registry import spec_for_pipeline

    return spec_for_pipeline(pipe)  # raises ValueError for unsupported pipelines (e.g. CogVideoX 1.5)


@contextmanager
def _scheduler_swapped(pipe: Any, scheduler: Any) -> Iterator[None]:
    if scheduler is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def _scheduler_for(pipe: Any, family: Family, plan: LoopPlan) -> Any:
    """The scheduler to swap in for this call, or None to keep the pipeline's own."""
    if plan.scheduler is not None:
        return family.build_scheduler(plan.scheduler, pipe.scheduler.config, plan.flow_shift)
    if plan.flow_shift is not None:
        return family.reshifted_scheduler(pipe.scheduler, plan.flow_shift)
    return None


def _resolve_accel(pipe: Any, family: Family, request: LoopRequest, device: Any) -> tuple[str, bool]:
    """The attention kernel and whether to compile, checked before any work (a kernel that cannot run here -- this
    GPU, the transformer's dtype, context parallelism -- is one ``ValueError`` line). ``auto`` never refuses: on a
    family whose attention does not dispatch (CogVideoX; the plan refuses a named kernel there) it is native."""
    if not family.attention_kernels:
        return "native", accel.resolve_compile(request.compile)
    parallel = any(getattr(module, "_parallel_config", None) is not None for module in family.denoisers(pipe))
    attention = accel.resolve_attention(request.attention, device, family.transformer_dtype(pipe), parallel)
    return attention, accel.resolve_compile(request.compile)


def _apply_accel(modules: list, attention: str, compiled: bool) -> None:
    """Kernel and compilation on the denoiser(s): module state that stays between calls (switched only on change)."""
    accel.use_attention(modules, attention)
    for module in modules:
        if compiled:
            accel.compile_blocks(module)
        else:
            accel.uncompile_blocks(module)  # a pipeline compiled by an earlier call runs eagerly again


def _compile_key(plan: LoopPlan, dtype: torch.dtype, attention: str) -> tuple:
    """What fixes the shapes (and the LoRA layers and the attention kernel) the compiled blocks see in one call: the
    loop's rotations keep every shape of a call fixed, so a new key is a first compilation."""
    window = plan.spec.trained_latent_frames if plan.request.window_mode == "window" else None
    loras = tuple((lora.sha256, lora.scale, lora.expert) for lora in plan.lora_files or ())
    return (plan.height, plan.width, plan.num_latents, window, plan.guidance_scale > 1, plan.image_to_video,
            str(dtype), loras, attention)


def _prepare_conditioning(pipe: Any, family: Family, plan: LoopPlan, device: Any, dtype: torch.dtype,
                          prediction_type: str):
    """Load the reference image and the motion mask, encode them and the plan's clip; return (PIL image or None,
    ImageConditioning or None)."""
    from PIL import Image

    request, clip = plan.request, plan.clip
    if request.image is None and clip is None:
        return None, None
    from loopui.media import load_reference_image

    image = (load_reference_image(request.image, plan.width, plan.height) if request.image is not None
             else Image.fromarray(clip[0]))
    anchor = float(request.anchor_strength) if clip is None else 0.0  # a clip's first frame may change too
    # Motion everywhere leaves no background to freeze: the freeze is inert then.
    freeze = float(request.background_freeze) if request.motion_region != "everything" else 0.0
    hold = None
    if clip is not None:
        from .conditioning import wrap_hold

        hold = wrap_hold(plan.num_latents, float(request.loop_region))
    wants = (anchor > 0 or plan.init_strength < 1 or freeze > 0 or clip is not None)
    if not wants:
        return image, None
    factor = pipe.vae_scale_factor_spatial
    latent_h, latent_w = plan.height // factor, plan.width // factor
    motion, mask = None, None
    if freeze > 0:
        mask = _motion_mask(image, request)
        motion = mask_to_latent_grid(mask, latent_h, latent_w, device=device, dtype=dtype)
    reference = family.encode_image(pipe, image, plan.height, plan.width, device, dtype)
    gen = torch.Generator("cpu").manual_seed((request.seed + 0x5EED) % 2**63)
    noise = torch.randn(reference.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    clip_latents = clip_noise = None
    if clip is not None:
        clip_latents = family.encode_video(pipe, list(clip), plan.height, plan.width, device, dtype)
        clip_noise = torch.randn(clip_latents.shape, generator=gen, dtype=torch.float32).to(device=device,
                                                                                           dtype=dtype)
    conditioning = ImageConditioning(
        reference=reference, noise=noise, motion_mask=motion, anchor_strength=anchor,
        init_strength=plan.init_strength, background_freeze=freeze, num_steps=plan.num_inference_steps,
        prediction_type=prediction_type, time_dim=family.time_dim, channel_dim=family.channel_dim,
        clip=clip_latents, clip_noise=clip_noise, hold=hold, pixel_motion=mask,
        reference_from_model=clip is not None)  # a clip's still is its own first frame, not the I2V condition
    return image, conditioning


def _motion_mask(image, request: LoopRequest) -> np.ndarray:
    """The user's mask when given, else the saliency model's; inverted for motion_region='background'."""
    from loopui import saliency
    from loopui.media import load_mask_image

    invert = request.motion_region == "background"
    # A user mask gets the same cover-and-centre-crop as the reference image, so the two stay aligned.
    user_mask = None if request.mask is None else load_mask_image(request.mask, image.width, image.height)
    try:
        result = saliency.resolve_mask(
            np.asarray(image), user_mask=user_mask, model_name=request.mask_model,
            threshold=request.mask_threshold, grow=request.mask_grow, feather=request.mask_feather, invert=invert)
    except saliency.SaliencyUnavailable as exc:
        raise ValueError(f"background freeze needs a motion mask: {exc} (or pass a mask image)") from exc
    return np.asarray(result.mask, dtype=np.float32)


def _watch_scheduler(scheduler: Any, family: Family, state: StepState, prediction_type: str,
                     conditioning: Optional[ImageConditioning], record_clean: bool):
    """Patch ``scheduler.step`` for one call: read the pipeline's own starting noise at the first step (the init
    strength builds on it, so every random draw stays in the stock pipeline's order), pull a multistep solver's
    history as the image controls pulled the latents, and record the step's clean estimate (the image controls pull
    clean parts with it; an I2V image channel carries it)."""
    original = scheduler.step
    signature = inspect.signature(original)

    # The pipeline reads step's signature to decide whether to pass the generator (and eta): a bare (*args, **kwargs)
    # would make a stochastic scheduler (CogVideoX DPM) draw from torch's global RNG instead of the seed.
    @functools.wraps(original)
    def step(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        output, sample = bound.arguments["model_output"], bound.arguments["sample"]
        if conditioning is not None:
            if conditioning.initial_noise is None and conditioning.init_steps > 0:
                conditioning.initial_noise = sample.detach().clone()
            family.pull_solver_history(scheduler, bound.arguments, conditioning)
        if record_clean:
            level = family.level(scheduler, state.step)
            state.clean = clean_estimate(sample, output, level, prediction_type).detach()
        return original(*bound.args, **bound.kwargs)

    return patch_attribute(scheduler, "step", step)


def _keep_image_promises(frames: np.ndarray, still: np.ndarray, conditioning: ImageConditioning,
                         frame_invariant: bool, ratio: int) -> tuple[np.ndarray, int]:
    """Frame 0 is the image; a frozen background does not move.

    Frame-invariant decoding plays the anchored latent as ``ratio`` frames, the one closest to the image among them
    not necessarily the first: any rotation of a loop is the same loop, so the played loop is rotated to start on it.
    The decoder mixes each latent's regions (its normalisation spans the frame), so a background frozen in latent
    space still drifts by a few levels in pixels: with a freeze the decoded still is composited back through the
    feathered mask (weight ``b * (1 - mask)``), exactly the still outside the mask at ``b = 1``.
    """
    shift = 0
    if conditioning.anchor_strength > 0 and frame_invariant and len(frames) > 1:
        errors = [float(np.mean((frames[k].astype(np.float32) - still.astype(np.float32)) ** 2))
                  for k in range(min(ratio, len(frames)))]
        shift = int(np.argmin(errors))
        frames = np.roll(frames, -shift, axis=0)
    if conditioning.background_freeze > 0 and conditioning.pixel_motion is not None:
        weight = (conditioning.background_freeze * (1.0 - conditioning.pixel_motion))[None, :, :, None]
        blended = frames.astype(np.float32) * (1.0 - weight) + still.astype(np.float32)[None] * weight
        frames = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return frames, shift


@holds_pipeline_lock
def generate_loop(pipe, request: Optional[LoopRequest], output_type: str = "np",
                  callback: Optional[ProgressCallback] = None, cancel_event: Optional[threading.Event] = None,
                  plan: Optional[LoopPlan] = None) -> LoopResult:
    """Generate a seamless loop with ``pipe`` (a built CogVideoX or Wan text/image-to-video pipeline).

    ``callback(stage, step, total)`` reports "encode", "compile" (with ``compile`` on, before the first call at a
    shape), "denoise" (after each step) and "decode"; ``request.attention`` and ``request.compile`` choose how the
    denoiser runs (:mod:`loopui.models.accel`; state kept on the modules between calls); setting
    ``cancel_event`` stops the denoising loop within one step (decoding between two decoder calls) and raises
    :class:`LoopInterrupted`. One call at a time per pipeline: a second call on the same pipeline (or on one sharing
    its components) waits for the first. NaN/Inf output raises ``NonFiniteOutput`` instead of a black video.
    Values left empty in ``request`` take the model's recommendations (:func:`loopui.engine.plan.plan_loop`).
    A caller that planned already (the page, the CLI: :func:`loopui.engine.plan.resolve_request`) passes that
    ``plan`` (``request`` may then be None); it is not planned again, and a clip it read is not read again.
    With ``shift_skip=0`` and no image control in play (no image or clip; with an image, ``anchor_strength=0`` --
    it is 1 by default --, ``init_strength`` 1 and no ``background_freeze``) this is exactly the stock pipeline's
    sampling, an image-to-video pipeline's included.
    """
    # 1. Check inputs and resolve the automatic values (once: a caller's plan is used as it is)
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    family = family_for(pipe)
    if plan is None:
        if request is None:
            raise ValueError("generate_loop needs a request or a plan")
        request.validate()
        if not request.prompt.strip():
            raise ValueError("prompt is empty: describe what the loop should show")
        plan = plan_loop(request, pipeline_spec(pipe))
    else:
        if request is not None and request is not plan.request:
            raise ValueError("pass either a request or the plan made of it (plan.request), not a different request")
        if plan.spec.family != family.name:
            raise ValueError(f"the plan was made for a {plan.spec.family} model, not for this {family.name} pipeline")
    check_no_diffusers_cache(pipe, family.denoisers(pipe), plan.shift_skip)
    check_pipeline_quantization(pipe, plan.request.quantize)
    plan = plan.with_clip().with_loras()
    request, spec = plan.request, plan.spec
    length, skip = plan.num_latents, plan.shift_skip
    for message in plan.warnings:
        logger.warning(message)
    steps = plan.num_inference_steps
    # A model whose image is optional runs its own image-to-video pipeline (over the same modules) with an image.
    pipe = family.pipeline_for(pipe, plan.pipeline_class)
    t_start = time.perf_counter()
    if callback:
        callback("encode", 0, steps)

    # 2. Scheduler, device and the pipeline's own noise (drawn exactly as prepare_latents draws it)
    scheduler = _scheduler_for(pipe, family, plan)
    device = pipe._execution_device
    attention, compiled = _resolve_accel(pipe, family, request, device)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    schedule = ShiftSchedule(length=length, skip=skip, num_steps=steps, start=request.shift_start,
                             end=request.shift_end, polish=SEAM_POLISH_PRESETS[request.seam_polish],
                             noise_levels=lambda: [noise_fraction(family.level(pipe.scheduler, i))
                                                   for i in range(steps + 1)],
                             step_cache=plan.step_cache == "loop")
    state = StepState()

    # The request's LoRAs, exactly, before any forward is wrapped (loading one re-installs offload hooks) and inside
    # this call's pipeline lock, so no other call sees them.
    with _scheduler_swapped(pipe, scheduler), active_loras(pipe, plan.lora_files):
        sched = pipe.scheduler
        dtype = family.transformer_dtype(pipe)
        prediction_type = family.prediction_type(sched)
        # 3. Reference image (encode + mask) when given
        image, conditioning = _prepare_conditioning(pipe, family, plan, device, dtype, prediction_type)
        for note in plan.clip_notes:
            logger.info("video: %s", note)
        override, observe = None, None
        if conditioning is not None and conditioning.init_steps > 0:
            # The skipped steps are not run through the model: an exact "oracle" prediction walks the scheduler from
            # the pipeline's own noise (drawn in its own order) along the noised reference.
            override = lambda step, noisy, t: conditioning.override_prediction(  # noqa: E731
                step, noisy, family.level(sched, step))

        # 4. Attention kernel and compiled blocks; hooks: transformer forward(s), rotary tables, step callback (and,
        # for I2V, the clean estimate)
        _apply_accel(family.denoisers(pipe), attention, compiled)
        compile_key = _compile_key(plan, dtype, attention)
        window = spec.trained_latent_frames if request.window_mode == "window" else None
        condition = family.condition_latent_channels(pipe)
        image_channel = None
        if condition is not None:
            image_channel = ImageChannel(policy=plan.image_channel, noisy_channels=family.latent_channels(pipe),
                                         latent_start=condition[0], latent_count=condition[1])
            if conditioning is not None:
                observe = lambda step, noisy, cond: conditioning.use_model_condition(  # noqa: E731
                    cond, condition[0], condition[1])
        denoisers = [CycleDenoiser(module.forward, schedule, state, time_dim=family.time_dim,
                                   channel_dim=family.channel_dim, window=window, override=override,
                                   clip_kwargs=family.clip_kwargs, image_channel=image_channel, observe=observe,
                                   cache=None if plan.step_cache != "loop" else LoopStepCache(
                                       lambda i: family.level(sched, i), prediction_type, family.time_dim))
                     for module in family.denoisers(pipe)]

        def on_step_end(pipeline, i: int, t, kwargs: dict) -> dict:
            out = {}
            if conditioning is not None:
                out["latents"] = conditioning.after_step(i, kwargs["latents"], family.level(sched, i + 1),
                                                         state.clean)
            state.step = i + 1  # the offset advances after each scheduler step
            if callback:
                callback("denoise", i + 1, steps)
            if cancel_event is not None and cancel_event.is_set() and i + 1 < steps:
                pipeline._interrupt = True  # the pipeline skips the remaining steps
            return out

        call_kwargs = dict(
            prompt=request.prompt, negative_prompt=plan.negative_prompt or None, height=plan.height,
            width=plan.width, num_frames=request.num_frames, num_inference_steps=steps,
            guidance_scale=plan.guidance_scale, generator=generator, output_type="latent",
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            **family.call_kwargs(pipe, request, plan),
        )
        if plan.image_to_video:
            call_kwargs["image"] = image
        # Stop acts between transformer blocks too: one call at a large size or length can take many minutes.
        stop_in_call = lambda: LoopInterrupted(f"stopped during step {state.step + 1} of {steps}")  # noqa: E731
        with ExitStack() as hooks, torch.no_grad():
            for module, denoiser in zip(family.denoisers(pipe), denoisers):
                hooks.enter_context(patch_attribute(module, "forward", denoiser))
                hooks.enter_context(cancel_checkpoint(accel.transformer_blocks(module), cancel_event, stop_in_call))
            hooks.enter_context(family.rope_scaled(pipe, plan.rope_scale))
            hooks.enter_context(scheduled(sched, plan.sigmas, generator))
            # The I2V estimate channel reads the clean estimate, and the image controls pull clean parts with it.
            record_clean = conditioning is not None or (image_channel is not None
                                                        and image_channel.policy == "estimate")
            if record_clean:
                hooks.enter_context(_watch_scheduler(sched, family, state, prediction_type, conditioning,
                                                     record_clean))
            if compiled and callback and accel.compiled_shape_pending(family.denoisers(pipe), compile_key):
                callback("compile", 0, steps)  # the first call at this shape compiles (a minute or more on a GPU)
            final = pipe(**call_kwargs).frames  # the family's latent layout
            if compiled:
                accel.remember_compiled_shape(family.denoisers(pipe), compile_key)
    t_denoise = time.perf_counter()
    if state.step < steps:  # only an interrupt leaves steps undone
        raise LoopInterrupted(f"stopped after {state.step} of {steps} steps")
    ensure_finite(final, "final latents", dtype)

    # 5. Decode (frame-invariant by default); an image loop starts on its image and keeps a still background still
    frames, anchor_shift = None, 0
    if output_type == "np":
        if callback:
            callback("decode", 0, 1)
        stop = lambda: LoopInterrupted("stopped while decoding")  # noqa: E731
        with torch.no_grad(), vae_memory_defaults(pipe), \
                cancel_checkpoint(getattr(pipe.vae, "decoder", pipe.vae), cancel_event, stop):
            # The reference latent decoded on its own: the picture the anchored frame and the background hold.
            holds = conditioning is not None and (conditioning.anchor_strength > 0 or conditioning.background_freeze > 0)
            video, still = decode_with_still(pipe, final, conditioning.reference if holds else None,
                                             request.frame_invariant_decoding, family)
            still = None if still is None else video_to_uint8(pipe, still)[0]
        ensure_finite(video, "decoded frames", pipe.vae.dtype)
        frames = video_to_uint8(pipe, video)
        if still is not None:
            frames, anchor_shift = _keep_image_promises(frames, still, conditioning, request.frame_invariant_decoding,
                                                        pipe.vae_scale_factor_temporal)
        if callback:
            callback("decode", 1, 1)
    t_decode = time.perf_counter()

    # 6. Metrics and settings; an anchored loop plays from its image, so its pixels are measured at the cycle's wrap
    from loopui.media import loop_metrics, loop_scores
    from loopui.media.scores import pixel_loop_metrics

    latents_cpu = final.detach().float().cpu()
    latent_metrics = loop_metrics(family.time_first(latents_cpu)) if length > 2 else None
    pixel_metrics = (pixel_loop_metrics(frames, rotation=anchor_shift)
                     if frames is not None and len(frames) > 2 else None)
    metrics = pixel_metrics or latent_metrics
    scores = (loop_scores(frames, reference=image, flow=False, rotation=anchor_shift)
              if pixel_metrics is not None else {})
    t_scores = time.perf_counter()  # SSIM over every frame pair: seconds at 480p on a CPU core, so it is timed too
    return LoopResult(
        frames=frames,
        latents=latents_cpu,
        plan=plan,
        seam_ratio=None if metrics is None else float(metrics.seam_ratio),
        interior_ratio=None if metrics is None else float(metrics.interior_ratio),
        cycle_ratio=None if metrics is None else float(metrics.cycle_ratio),
        worst_step=None if metrics is None else tuple(int(v) for v in metrics.worst_interior_step),
        family=family.name, pipeline=type(pipe).__name__,
        scheduler_class=type(pipe.scheduler if scheduler is None else scheduler).__name__,
        latent_layout="(B, T, C, H, W)" if family.time_dim == 1 else "(B, C, T, H, W)",
        num_output_frames=int(frames.shape[0]) if frames is not None else plan.num_output_frames,
        anchor_frame_shift=anchor_shift, model_calls=sum(d.model_calls for d in denoisers),
        timings={"denoise": t_denoise - t_start, "decode": t_decode - t_denoise, "scores": t_scores - t_decode,
                 "total": t_scores - t_start},
        warnings=list(plan.warnings) + [f"video: {note}" for note in plan.clip_notes],
        latent_seam_ratio=None if latent_metrics is None else float(latent_metrics.seam_ratio),
        latent_interior_ratio=None if latent_metrics is None else float(latent_metrics.interior_ratio),
        latent_cycle_ratio=None if latent_metrics is None else float(latent_metrics.cycle_ratio),
        scores=scores, attention=attention, compiled=compiled, quantize=pipeline_quantization(pipe),
    )
