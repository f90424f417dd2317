"""``loopui generate``: one seamless loop from a prompt (optionally an image or a clip) to files.

Every flag takes its default, range, choices and help from ``LoopRequest``'s field metadata, so the CLI, the UI and
the Python API cannot drift apart. Where the user leaves a flag out, the model's recommendation applies (scheduler,
guidance, dynamic CFG, fps, flow shift, native size), resolved by the engine's ``plan_loop`` -- which also refuses,
before the model loads, what the model's family cannot do. User mistakes end as one ``loopui: error: ...`` line and
exit code 2; an interrupt exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from loopui.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    KNOB_FLAGS,
    PROG,
    add_knob_flags,
    fail,
    flag_hint,
    knob_default,
    knob_help,
)
from loopui.engine.plan import LoopPlan, apply_recipe, resolve_request
from loopui.engine.request import request_from_values, size_text
from loopui.messages import one_line
from loopui.studio.requests import check_runtime
from loopui.studio.results import runtime_text

logger = logging.getLogger(__name__)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` sub-command's arguments to ``parser``: every knob of ``LoopRequest`` and the run's own."""
    from loopui.models.registry import DEFAULT_MODEL_ID

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, metavar="ID_OR_DIR",
                        help=f"Hub id, local diffusers folder, or 'demo' (a tiny random model for trying the "
                             f"pipeline without a GPU). Default: {DEFAULT_MODEL_ID}. See `{PROG} models`.")
    parser.add_argument("--prompt", required=True, help=knob_help("prompt"))
    add_knob_flags(parser)
    parser.add_argument("--dynamic-cfg", dest="use_dynamic_cfg", action=argparse.BooleanOptionalAction,
                        default=None, help=knob_help("use_dynamic_cfg", recommended=True))
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help=knob_help("compile"))
    parser.add_argument("--no-frame-invariant-decoding", dest="frame_invariant_decoding", action="store_false",
                        default=knob_default("frame_invariant_decoding"),
                        help="Stock decoding: decode the cycle as a plain clip (the VAE's own frame count, its first "
                             "frame decoded differently from the rest). By default every latent is decoded with "
                             "context from the end of the cycle, so the loop has no odd first frame.")
    parser.add_argument("--image", default=None, metavar="PATH", help=knob_help("image"))
    parser.add_argument("--mask", default=None, metavar="PATH", help=knob_help("mask"))
    parser.add_argument("--video", default=None, metavar="PATH", help=knob_help("video"))
    parser.add_argument("--lora", dest="loras", action="append", default=None, metavar="SOURCE[:SCALE]",
                        help="A LoRA to apply, repeatable: a local .safetensors file, a hub repo id or "
                             "owner/repo/file.safetensors, with its scale (-4..4, default 1); on Wan 2.2 A14B add "
                             ":high or :low for one expert (default both). diffusers reads the diffusers/PEFT, "
                             "Kohya, ComfyUI and lightx2v formats; the sidecar records each file's sha256.")
    parser.add_argument("--recipe", default=None, metavar="NAME", help=_recipe_help())
    parser.add_argument("--invert-mask", action="store_true",
                        help="Animate the background instead of the object (same as --motion-region background).")
    parser.add_argument("--output", "-o", action="append", required=True, metavar="PATH",
                        help="Output file (.mp4, .gif or .webp); repeat for several formats. A JSON sidecar with "
                             "every setting is written beside the first.")
    parser.add_argument("--save-latents", default=None, metavar="PATH.pt",
                        help="Also save the final latents (float32, in the model's own layout, the sidecar's "
                             "latent_layout: CogVideoX (B, T, C, H, W), Wan (B, C, T, H, W)) with torch.save.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="Weights dtype (default: the model's on CUDA, float32 on CPU).")
    parser.add_argument("--offload", default=None, choices=("auto", "none", "model", "group", "sequential"),
                        help="GPU memory policy (default: LOOPUI_OFFLOAD, else chosen from free VRAM).")
    parser.add_argument("--parallel", action="store_true",
                        help="Split one loop across several GPUs (context parallelism; models with a diffusers "
                             "context-parallel plan, i.e. Wan). Start with `torchrun --nproc-per-node N -m loopui "
                             "generate --parallel ...`; process 0 writes the files.")
    parser.add_argument("--quiet", "-q", action="store_true", help="No progress output, only the summary.")
    parser.add_argument("--verbose", "-v", action="store_true", help="Log details (and diffusers' messages).")


def _recipe_help() -> str:
    from loopui.models.recipes import RECIPES, recipe_names

    def short(model_id: str) -> str:
        return model_id.split("/")[-1].removesuffix("-Diffusers")

    names = "; ".join(f"{name} ({', '.join(short(m) for r in RECIPES if r.name == name for m in r.model_ids)})"
                      for name in recipe_names())
    return (f"A speed recipe: the published few-step settings of a distilled LoRA (steps, guidance 1 = no CFG, "
            f"scheduler, sigmas, and the LoRA itself, fetched from the hub) fill the flags you leave out; flags you "
            f"give win, and your --lora files are added (one whose path ends like a recipe file's stands in for "
            f"it: a downloaded copy). Names: {names}. Sources and values: `{PROG} models`.").replace("%", "%%")


def build_request(args: argparse.Namespace, spec: Any) -> LoopPlan:
    """The plan of parsed ``generate`` arguments, checked and resolved by ``resolve_request`` (as for the page and
    the API): flags left out stay "automatic", and the engine's plan fills them with the model's recommendations
    (a guidance given here would set both experts of a two-expert model); ``--recipe`` fills the flags left out
    first (its notes join the plan's, and the plan records it for the sidecar)."""
    values = {field: getattr(args, field) for _, field, _ in KNOB_FLAGS}
    values.update(prompt=args.prompt, use_dynamic_cfg=args.use_dynamic_cfg, image=args.image, mask=args.mask,
                  video=args.video, frame_invariant_decoding=args.frame_invariant_decoding, loras=args.loras or (),
                  compile=args.compile)
    if args.invert_mask:
        if values["motion_region"] not in ("object", "background"):
            raise ValueError(f"--invert-mask contradicts --motion-region {values['motion_region']}")
        values["motion_region"] = "background"
    values, fill = apply_recipe(values, spec, getattr(args, "recipe", None))
    return resolve_request(request_from_values(values), spec).with_recipe(fill)


def _check_inputs(plan: LoopPlan) -> LoopPlan:
    """Fail before the (slow) model load on mistakes the engine would only find after it; the plan with its clip
    read and fitted (so the engine does not read it again)."""
    from loopui.media import ImageInputError, VideoInputError, load_mask_image, load_reference_image

    request = plan.request
    for flag, value, load in (("--image", request.image, load_reference_image),
                              ("--mask", request.mask, load_mask_image)):
        if value is not None:
            try:
                load(value, request.width, request.height)
            except ImageInputError as exc:
                raise ValueError(f"{flag}: {one_line(exc)}") from None
    # Read and fitted once, as the loop uses it (the plan's frame count, fps and size): a clip that is unreadable,
    # too short, too large or has an unusable frame rate fails here, not after the model loaded.
    try:
        plan = plan.with_clip()
    except (VideoInputError, ImageInputError) as exc:
        raise ValueError(f"--video: {one_line(exc).removeprefix('video: ')}") from None
    # LoRAs found (a hub one downloaded), checked against the model's family and hashed before the model loads.
    return plan.with_loras()


def check_output_paths(outputs: Sequence[str], save_latents: Optional[str] = None) -> list[Path]:
    """Every file the run will write -- outputs, their JSON sidecar, the latents -- checked before any work: a
    supported suffix, not a folder, and a folder that exists (or can be made) and can be written to. Raises
    ``ValueError`` naming the flag."""
    from loopui.engine.render import check_outputs

    try:
        paths = check_outputs(outputs)
    except ValueError as exc:
        raise ValueError(f"--output: {one_line(exc)}") from None
    targets = [("--output", p) for p in paths] + [("--output", paths[0].with_suffix(".json"))]
    if save_latents is not None:
        latents = Path(save_latents)
        if latents.suffix.lower() != ".pt":
            raise ValueError(f"--save-latents: {str(latents)!r} must end in .pt")
        targets.append(("--save-latents", latents))
    for flag, path in targets:
        _check_writable(flag, path)
    return paths


def _check_writable(flag: str, path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag}: {str(path)!r} exists and cannot be overwritten")
    folder = path.parent
    while not folder.exists():  # the exporter creates missing folders: the nearest existing one must be writable
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: cannot create {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:  # os.access says yes to root on a read-only mount; creating a file is the real test
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{flag}: cannot write to the folder {str(folder)!r} ({reason})") from None


class _Progress:
    """The engine callback: one tqdm bar on stderr for the denoising steps."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        if stage == "denoise":
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="denoise", unit="step", file=sys.stderr, dynamic_ncols=True)
            self.bar.update(max(0, step - self.bar.n))
        elif stage == "compile":
            print(f"{PROG}: compiling the transformer blocks (first run at this size only)", file=sys.stderr)
        elif stage == "decode" and step == 0:
            self.close()
            print(f"{PROG}: decoding", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_generate(args: argparse.Namespace, shown_warnings: set[str]) -> int:
    """Check, load, generate and write the loop of ``args``; prints the summary. Returns the exit code (0 ok, 1
    failure, 2 bad arguments, 130 interrupted); ``shown_warnings`` are log messages already printed."""
    import torch

    from loopui.engine import LoopInterrupted, NonFiniteOutput, generate_loop, render_loop
    from loopui.models import ModelLoadError, ModelManager, OutOfGPUMemory, spec_for

    progress = _Progress(enabled=not args.quiet)
    parallel = None
    try:
        # 1. Check everything that needs no model: settings, input images, every file to be written
        spec = spec_for(args.model)
        plan = build_request(args, spec)
        plan = _check_inputs(plan)  # planned once, the clip read once
        outputs = check_output_paths(args.output, args.save_latents)
        for note in plan.notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
        device, offload = args.device, _usable_offload(args.offload, args.device)
        if args.parallel:
            parallel, device, offload = _start_parallel(args, spec)
            if not parallel.is_main:
                progress.enabled = False
        # --device, --attention and --quantize against this machine: refused here, not after minutes of loading.
        quantize = check_runtime(plan.request, device or ("cuda" if torch.cuda.is_available() else "cpu"))

        # 2. Load the model (progress in bytes while it downloads)
        shown: dict[str, int] = {}

        def on_load(stage: str, fraction: Optional[float], message: str) -> None:
            if args.quiet or (parallel is not None and not parallel.is_main):
                return
            if stage == "memory":
                print(f"{PROG}: warning: {message}", file=sys.stderr)
                return
            if stage == "downloading" and fraction is not None:
                tenth = int(fraction * 10)  # one line per 10 %
                if shown.get(stage) == tenth:
                    return
                shown[stage] = tenth
            print(f"{PROG}: {message}", file=sys.stderr)

        def work(loaded: Any) -> tuple[Any, Any]:
            loaded.pipe.set_progress_bar_config(disable=True)  # our own bar replaces diffusers'
            if parallel is not None:
                from loopui.engine.parallel import enable_context_parallel

                enable_context_parallel(loaded.pipe, parallel.world_size)
                if not parallel.is_main:  # the others take part in every transformer call; process 0 writes
                    return loaded, generate_loop(loaded.pipe, None, output_type="latent", plan=plan)
            return loaded, render_loop(loaded.pipe, None, outputs=outputs, model_id=spec.model_id,
                                       callback=progress, plan=plan)

        # 3. Generate and write the files (a CUDA out-of-memory error is retried once with more offloading)
        # One request per process: a LoRA set is folded into the weights at once, no copy kept (nothing to switch
        # back to).
        manager = ModelManager(device=device, offload=offload, lora_fuse="single")
        start = time.perf_counter()
        loaded, render = manager.run(args.model, work, dtype=args.dtype, progress=on_load, quantize=quantize)
        if parallel is not None and not parallel.is_main:
            return EXIT_OK
        if args.save_latents:
            _save_latents(render.result.latents, Path(args.save_latents))
        elapsed = time.perf_counter() - start - loaded.load_seconds
    except (KeyboardInterrupt, LoopInterrupted) as exc:
        return fail("interrupted" + (f": {one_line(exc)}" if str(exc) else ""), EXIT_INTERRUPTED)
    except ModelLoadError as exc:
        return fail(one_line(exc))
    except ValueError as exc:  # bad settings, unreadable images, the engine's input checks
        return fail(flag_hint(one_line(exc)))
    except (OutOfGPUMemory, NonFiniteOutput) as exc:
        return fail(one_line(exc), EXIT_FAILURE)
    except torch.cuda.OutOfMemoryError as exc:
        return fail(f"out of memory: {one_line(exc)} -- try a smaller size, fewer frames or --offload sequential",
                     EXIT_FAILURE)
    except OSError as exc:  # a file that could not be written after all (disk full, removed folder)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # not ffmpeg's whole command line
        return fail(f"could not write the output: {first[:300]}", EXIT_FAILURE)
    finally:
        progress.close()
        if parallel is not None:
            _end_parallel()

    # 4. Summary: one line per file, the seam, the time
    result = render.result
    for message in result.warnings:
        if message not in shown_warnings:
            print(f"{PROG}: warning: {message}", file=sys.stderr)
    frames, height, width = result.frames.shape[:3]
    for path in render.files:
        print(f"wrote {path} ({frames} frames, {size_text(width, height)}, {result.settings['fps']} fps, "
              f"{path.stat().st_size / 1024:.0f} KiB)")
    print(f"wrote {render.sidecar} (settings and metrics)")
    if args.save_latents:
        print(f"wrote {args.save_latents} (latents {tuple(result.latents.shape)})")
    if result.seam_ratio is not None:
        print(f"seam ratio {result.seam_ratio:.2f} (the wrap's jump vs. the steps around it; about 1 = seamless), "
              f"interior ratio {result.interior_ratio:.2f} (the largest other jump), cycle ratio "
              f"{result.cycle_ratio:.2f} (the largest jump anywhere, wrap included)")
    if result.scores:
        from loopui.media import format_scores

        print(f"scores: {format_scores(result.scores)} (`{PROG} score` for all)")
    timings = result.timings
    print(f"time {elapsed:.1f} s (denoise {timings.get('denoise', 0):.1f} s, decode {timings.get('decode', 0):.1f} s; "
          f"model load {loaded.load_seconds:.1f} s; {loaded.describe()}; {runtime_text(result)})")
    return EXIT_OK


def _usable_offload(offload: Optional[str], device: Optional[str]) -> Optional[str]:
    """``--offload`` as the model manager should get it: CPU offload needs CUDA, so without it the flag is dropped
    with a warning that names the flag (the manager's own warning names the environment variable)."""
    if offload in (None, "auto", "none"):
        return offload
    import torch

    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not on_cuda:
        logger.warning("--offload %s ignored: CPU offload needs a CUDA device", offload)
        return None
    return offload


def _save_latents(latents: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(latents.detach().to(device="cpu", dtype=torch.float32).contiguous(), path)


def _start_parallel(args: argparse.Namespace, spec: Any) -> tuple[Any, str, str]:
    """``--parallel``: check the launch and the model before any loading, join the process group; returns
    (context, this process's device, offload policy)."""
    import torch

    from loopui.engine.parallel import check_family, init_process_group, torchrun_context

    context = torchrun_context()
    check_family(spec.family, spec.model_id)
    if args.device is not None:
        raise ValueError("--parallel picks each process's GPU itself (cuda:<local rank>): leave out --device")
    if args.offload not in (None, "auto", "none"):
        raise ValueError(f"--parallel keeps each process's model on its GPU: --offload {args.offload} cannot be used")
    if not torch.cuda.is_available():
        raise ValueError("--parallel needs one CUDA GPU per process, and none is visible here")
    return context, init_process_group(context), "none"


def _end_parallel() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
