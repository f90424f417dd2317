"""Command line: ``python -m loopui generate|mask|models|score``.

Every ``generate`` flag takes its default, range, choices and help from ``LoopRequest``'s field metadata, so the CLI,
the UI and the Python API cannot drift apart. Where the user leaves a flag out, the model's recommendation applies
(scheduler, guidance, dynamic CFG, fps, flow shift, native size), resolved by the engine's ``plan_loop`` -- which
also refuses, before the model loads, what the model's family cannot do. User mistakes end as one
``loopui: error: ...`` line and exit code 2; an interrupt exits 130.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loopui.engine.settings import (
    ResolvedRequest,
    knob_info,
    number_text,
    real_number,
    request_from_values,
    resolve_request,
    size_text,
    whole_number,
)

logger = logging.getLogger(__name__)

PROG = "loopui"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Flags of knobs left to the model's recommendation when not given (None = "ask the model": the engine's plan_loop
# fills them from the registry, e.g. guidance 6 on CogVideoX, 5 on Wan, and two values on a two-expert Wan 2.2).
_MODEL_RECOMMENDED = ("scheduler", "guidance_scale", "use_dynamic_cfg", "height", "width", "fps", "flow_shift")


def _number_or_auto(text: str) -> Optional[float]:
    """A number, or ``auto`` (None: the automatic value, see resolve_request)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return real_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _whole(text: str) -> int:
    """A whole-number flag, by the same rule as the page and the API (``7.5`` is refused, not rounded)."""
    try:
        return whole_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return real_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None


# (flag, LoopRequest field, argparse type). Booleans and the image paths are added separately.
_KNOB_FLAGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--negative-prompt", "negative_prompt", str),
    ("--frames", "num_frames", _whole),
    ("--height", "height", _whole),
    ("--width", "width", _whole),
    ("--steps", "num_inference_steps", _whole),
    ("--guidance", "guidance_scale", _number),
    ("--seed", "seed", _whole),
    ("--shift-skip", "shift_skip", _whole),
    ("--shift-start", "shift_start", _number),
    ("--shift-end", "shift_end", _number),
    ("--rope-scale", "rope_scale", _number_or_auto),
    ("--window", "window_mode", str),
    ("--scheduler", "scheduler", str),
    ("--flow-shift", "flow_shift", _number_or_auto),
    ("--fps", "fps", _whole),
    ("--seam-polish", "seam_polish", str),
    ("--mask-model", "mask_model", str),
    ("--mask-threshold", "mask_threshold", _number),
    ("--mask-grow", "mask_grow", _whole),
    ("--mask-feather", "mask_feather", _whole),
    ("--motion-region", "motion_region", str),
    ("--anchor-strength", "anchor_strength", _number),
    ("--init-strength", "init_strength", _number),
    ("--loop-region", "loop_region", _number),
    ("--background-freeze", "background_freeze", _number),
    ("--image-channel", "image_channel", str),
)

# For error messages: "num_frames must be >= 5" is clearer as "... [--frames]" on the command line.
_FIELD_FLAGS = {field: flag for flag, field, _ in _KNOB_FLAGS} | {
    "prompt": "--prompt", "use_dynamic_cfg": "--dynamic-cfg", "image": "--image", "mask": "--mask",
    "video": "--video", "frame_invariant_decoding": "--no-frame-invariant-decoding"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``loopui: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _knob_help(field: str, recommended: bool = False) -> str:
    info = knob_info(field)
    # A flag is left out rather than left empty: the knob's "empty = X" reads "default: X" here.
    text = info["help"].replace("empty = ", "default: ")
    parts = [text]
    if info.get("min") is not None and info.get("max") is not None:
        parts.append(f"Range {number_text(info['min'])}..{number_text(info['max'])}.")
    if "default: " in text:
        pass  # the help says it already
    elif recommended:
        parts.append("Default: the model's recommendation.")
    elif info["default"] is not None and info["default"] != "":
        parts.append(f"Default: {info['default']}.")
    return " ".join(parts).replace("%", "%%")  # argparse formats help with %


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from loopui.models.registry import DEFAULT_MODEL_ID

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, metavar="ID_OR_DIR",
                        help=f"Hub id, local diffusers folder, or 'demo' (a tiny random model for trying the "
                             f"pipeline without a GPU). Default: {DEFAULT_MODEL_ID}. See `{PROG} models`.")
    parser.add_argument("--prompt", required=True, help=_knob_help("prompt"))
    for flag, field, kind in _KNOB_FLAGS:
        info = knob_info(field)
        recommended = field in _MODEL_RECOMMENDED
        default = None if recommended else info["default"]
        metavar = {"rope_scale": "S|auto", "flow_shift": "F|auto"}.get(field) or (
            None if info.get("choices") else flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=field, type=kind, default=default, choices=info.get("choices"),
                            metavar=metavar, help=_knob_help(field, recommended))
    parser.add_argument("--dynamic-cfg", dest="use_dynamic_cfg", action=argparse.BooleanOptionalAction,
                        default=None, help=_knob_help("use_dynamic_cfg", recommended=True))
    parser.add_argument("--no-frame-invariant-decoding", dest="frame_invariant_decoding", action="store_false",
                        default=knob_info("frame_invariant_decoding")["default"],
                        help="Stock decoding: decode the cycle as a plain clip (the VAE's own frame count, its first "
                             "frame decoded differently from the rest). By default every latent is decoded with "
                             "context from the end of the cycle, so the loop has no odd first frame.")
    parser.add_argument("--image", default=None, metavar="PATH", help=_knob_help("image"))
    parser.add_argument("--mask", default=None, metavar="PATH", help=_knob_help("mask"))
    parser.add_argument("--video", default=None, metavar="PATH", help=_knob_help("video"))
    parser.add_argument("--invert-mask", action="store_true",
                        help="Animate the background instead of the object (same as --motion-region background).")
    parser.add_argument("--output", "-o", action="append", required=True, metavar="PATH",
                        help="Output file (.mp4, .gif or .webp); repeat for several formats. A JSON sidecar with "
                             "every setting is written beside the first.")
    parser.add_argument("--save-latents", default=None, metavar="PATH.pt",
                        help="Also save the final latents (float32, (B, T, C, H/8, W/8)) with torch.save.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="Weights dtype (default: the model's on CUDA, float32 on CPU).")
    parser.add_argument("--offload", default=None, choices=("auto", "none", "model", "sequential"),
                        help="GPU memory policy (default: LOOPUI_OFFLOAD, else chosen from free VRAM).")
    parser.add_argument("--parallel", action="store_true",
                        help="Split one loop across several GPUs (context parallelism; models with a diffusers "
                             "context-parallel plan, i.e. Wan). Start with `torchrun --nproc-per-node N -m loopui "
                             "generate --parallel ...`; process 0 writes the files.")
    parser.add_argument("--quiet", "-q", action="store_true", help="No progress output, only the summary.")
    parser.add_argument("--verbose", "-v", action="store_true", help="Log details (and diffusers' messages).")


def build_parser() -> argparse.ArgumentParser:
    """The ``loopui`` argument parser with its ``generate``, ``mask`` and ``models`` subcommands."""
    parser = _Parser(prog=PROG, description="Seamlessly looping videos from video diffusion models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate = commands.add_parser("generate", help="Generate a looping video.",
                                   description="Generate a seamlessly looping video from a text prompt "
                                               "(optionally anchored on a reference image).")
    _add_generate_arguments(generate)
    mask = commands.add_parser("mask", help="Compute the motion mask of a reference image.")
    try:
        from loopui.cli.mask import add_mask_arguments
    except ImportError as exc:  # the saliency room is optional for generate/models
        mask.set_defaults(mask_unavailable=str(exc))
    else:
        add_mask_arguments(mask)
    models = commands.add_parser("models", help="List the known models (or describe model folders).")
    models.add_argument("model", nargs="*", metavar="ID_OR_DIR", help="Describe these instead of the registry.")
    score = commands.add_parser("score", help="Score looping videos with the looping-video papers' metrics.",
                                description="Score looping videos (ours or any other program's MP4, GIF, WebP, ...) "
                                            "with the papers' metrics; several files give a comparison table.")
    _add_score_arguments(score)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad arguments, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and argument errors (2); return instead of exiting the caller
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "models":
        return _run_models(args.model)
    if args.command == "score":
        with _cli_logging(verbose=args.verbose, quiet=False):
            return _run_score(args)
    if args.command == "mask":
        if getattr(args, "mask_unavailable", None):
            return _fail(f"the mask command is unavailable: {args.mask_unavailable}")
        from loopui.cli.mask import run_mask_command

        return run_mask_command(args)
    with _cli_logging(verbose=args.verbose, quiet=args.quiet) as shown:
        return _run_generate(args, shown)


# -- generate -------------------------------------------------------------------------------------------------------

def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _flag_hint(message: str) -> str:
    """Append the flag of the setting a message starts with (``num_frames must ...`` -> ``... [--frames]``), unless
    the message names a flag already."""
    if " [--" in message or message.startswith("--"):
        return message
    field = message.split(" ", 1)[0].rstrip(":")
    flag = _FIELD_FLAGS.get(field)
    return f"{message} [{flag}]" if flag else message


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def build_request(args: argparse.Namespace, spec: Any) -> ResolvedRequest:
    """The request of parsed ``generate`` arguments, checked and resolved by ``resolve_request`` (as for the page and
    the API): flags left out stay "automatic", and the engine's plan fills them with the model's recommendations
    (a guidance given here would set both experts of a two-expert model)."""
    values = {field: getattr(args, field) for _, field, _ in _KNOB_FLAGS}
    values.update(prompt=args.prompt, use_dynamic_cfg=args.use_dynamic_cfg, image=args.image, mask=args.mask,
                  video=args.video, frame_invariant_decoding=args.frame_invariant_decoding)
    if args.invert_mask:
        if values["motion_region"] not in ("object", "background"):
            raise ValueError(f"--invert-mask contradicts --motion-region {values['motion_region']}")
        values["motion_region"] = "background"
    return resolve_request(request_from_values(values), spec)


def _check_inputs(request: Any, spec: Any) -> None:
    """Fail before the (slow) model load on mistakes the engine would only find after it."""
    from loopui.media import ImageInputError, VideoInputError, load_mask_image, load_reference_image

    if spec.image_to_video and request.image is None and request.video is None:
        raise ValueError(f"{spec.model_id} animates a reference image: pass --image PATH (or --video PATH)")
    for flag, value, load in (("--image", request.image, load_reference_image),
                              ("--mask", request.mask, load_mask_image)):
        if value is not None:
            try:
                load(value, request.width, request.height)
            except ImageInputError as exc:
                raise ValueError(f"{flag}: {_one_line(exc)}") from None
    if request.video is not None:
        from loopui.engine import load_clip

        # Read and fitted exactly as the engine will (the plan's frame count, fps and size): a clip that is
        # unreadable, too short, too large or has an unusable frame rate fails here, not after the model loaded.
        try:
            load_clip(request, spec)
        except (VideoInputError, ImageInputError) as exc:
            raise ValueError(f"--video: {_one_line(exc).removeprefix('video: ')}") from None


def check_output_paths(outputs: Sequence[str], save_latents: Optional[str] = None) -> list[Path]:
    """Every file the run will write -- outputs, their JSON sidecar, the latents -- checked before any work: a
    supported suffix, not a folder, and a folder that exists (or can be made) and can be written to. Raises
    ``ValueError`` naming the flag."""
    from loopui.engine.render import check_outputs

    try:
        paths = check_outputs(outputs)
    except ValueError as exc:
        raise ValueError(f"--output: {_one_line(exc)}") from None
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
        elif stage == "decode" and step == 0:
            self.close()
            print(f"{PROG}: decoding", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_generate(args: argparse.Namespace, shown_warnings: set[str]) -> int:
    import torch

    from loopui.engine import LoopInterrupted, NonFiniteOutput, generate_loop, render_loop
    from loopui.models import ModelLoadError, ModelManager, OutOfGPUMemory, spec_for

    progress = _Progress(enabled=not args.quiet)
    parallel = None
    try:
        # 1. Check everything that needs no model: settings, input images, every file to be written
        spec = spec_for(args.model)
        resolved = build_request(args, spec)
        request = resolved.request
        _check_inputs(request, spec)
        outputs = check_output_paths(args.output, args.save_latents)
        for note in resolved.notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
        device, offload = args.device, _usable_offload(args.offload, args.device)
        if args.parallel:
            parallel, device, offload = _start_parallel(args, spec)
            if not parallel.is_main:
                progress.enabled = False

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
                    return loaded, generate_loop(loaded.pipe, request, output_type="latent")
            return loaded, render_loop(loaded.pipe, request, outputs=outputs, model_id=spec.model_id,
                                       callback=progress)

        # 3. Generate and write the files (a CUDA out-of-memory error is retried once with more offloading)
        manager = ModelManager(device=device, offload=offload)
        start = time.perf_counter()
        loaded, render = manager.run(args.model, work, dtype=args.dtype, progress=on_load)
        if parallel is not None and not parallel.is_main:
            return EXIT_OK
        if args.save_latents:
            _save_latents(render.result.latents, Path(args.save_latents))
        elapsed = time.perf_counter() - start - loaded.load_seconds
    except (KeyboardInterrupt, LoopInterrupted) as exc:
        return _fail("interrupted" + (f": {_one_line(exc)}" if str(exc) else ""), EXIT_INTERRUPTED)
    except ModelLoadError as exc:
        return _fail(_one_line(exc))
    except ValueError as exc:  # bad settings, unreadable images, the engine's input checks
        return _fail(_flag_hint(_one_line(exc)))
    except (OutOfGPUMemory, NonFiniteOutput) as exc:
        return _fail(_one_line(exc), EXIT_FAILURE)
    except torch.cuda.OutOfMemoryError as exc:
        return _fail(f"out of memory: {_one_line(exc)} -- try a smaller size, fewer frames or --offload sequential",
                     EXIT_FAILURE)
    except OSError as exc:  # a file that could not be written after all (disk full, removed folder)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # not ffmpeg's whole command line
        return _fail(f"could not write the output: {first[:300]}", EXIT_FAILURE)
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
        print(f"seam ratio {result.seam_ratio:.2f} (the wrap's jump vs. the mean frame step; about 1 = seamless), "
              f"interior ratio {result.interior_ratio:.2f} (the largest other jump)")
    if result.scores:
        from loopui.media import format_scores

        print(f"scores: {format_scores(result.scores)} (`{PROG} score` for all)")
    timings = result.timings
    print(f"time {elapsed:.1f} s (denoise {timings.get('denoise', 0):.1f} s, decode {timings.get('decode', 0):.1f} s; "
          f"model load {loaded.load_seconds:.1f} s)")
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


# -- models ---------------------------------------------------------------------------------------------------------

def _run_models(names: Sequence[str]) -> int:
    from loopui.models.registry import DEFAULT_MODEL_ID, list_models, spec_for

    try:
        specs = [spec_for(name) for name in names] if names else list_models()
    except ValueError as exc:
        return _fail(_one_line(exc))
    rows = [("MODEL", "FAMILY", "TASK", "ROPE", "LATENTS", "NATIVE", "DTYPE", "VRAM / OFFLOAD", "LICENCE")]
    for spec in specs:
        name = spec.model_id + (" (default)" if spec.model_id == DEFAULT_MODEL_ID else "")
        family = spec.family + (f" ({spec.experts} experts)" if spec.experts > 1 else "")
        rows.append((name, family, "i2v" if spec.image_to_video else "t2v", "yes" if spec.rotary else "no",
                     str(spec.trained_latent_frames),
                     f"{size_text(spec.native_width, spec.native_height)}, {spec.native_num_frames} frames @ "
                     f"{spec.native_fps} fps",
                     spec.cuda_dtype,
                     f"~{spec.vram_gb:g} / {spec.offload_vram_gb:g} GiB",
                     _short_licence(spec.license)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not names:
        print("\nVRAM: GiB to hold the model on one GPU at its native size / peak with model CPU offload (rough).")
        print(f"'demo' is an alias of {spec_for('demo').model_id}. A local diffusers folder works as --model too.")
    notes = sorted({spec.license for spec in specs if spec.license and _short_licence(spec.license) != spec.license})
    for licence in notes:
        print(f"{_short_licence(licence)}: {licence}")
    return EXIT_OK


def _short_licence(licence: str) -> str:
    """A licence as a table cell: its name without the parenthesised terms ("CogVideoX license"), "-" if unknown."""
    return licence.split(" (", 1)[0] if licence else "-"


# -- score ----------------------------------------------------------------------------------------------------------

def _add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="Video files (MP4, GIF, WebP, ...), as played.")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="Reference image: MSE_F0 (frame 0 vs. the image) and, with --clip, CLIP-I.")
    parser.add_argument("--prompt", default=None, metavar="TEXT", help="The prompt: CLIP score (needs --clip).")
    parser.add_argument("--clip", default=None, metavar="ID_OR_DIR",
                        help="CLIP model (hub id or local folder, e.g. openai/clip-vit-base-patch32) for CLIP score, "
                             "CLIP-I, frame consistency and Loop-C in CLIP space. Default: none (those are skipped).")
    parser.add_argument("--fps", type=float, default=None,
                        help="Playback rate for dynamic degree (default: the file's, else 8).")
    parser.add_argument("--fast", action="store_true",
                        help="Skip the optical-flow metrics (motion smoothness, dynamic degree): about 0.2 s per "
                             "frame on a CPU.")
    parser.add_argument("--json", action="store_true", help="Print a JSON list, one object per file.")
    parser.add_argument("--device", default=None, help="Torch device for CLIP (default: cuda when available).")
    parser.add_argument("--verbose", "-v", action="store_true", help="Log details.")


def _score_table(rows: Sequence[dict]) -> str:
    """Metrics down, files across (one column per file), with each metric's better direction."""
    from loopui.media.scores import SCORES, format_score

    names = [Path(row["file"]).name for row in rows]
    header = ["metric", "better", *names]
    shown = [info for info in SCORES if any(row.get(info.key) is not None for row in rows)]
    body = [[info.label, info.arrow, *[format_score(info.key, row.get(info.key)) for row in rows]] for info in shown]
    body.append(["frames", "", *[f"{row['num_frames']} @ {row['fps']:g} fps" for row in rows]])
    body.append(["size", "", *[f"{row['width']}x{row['height']}" for row in rows]])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *body]]
    return "\n".join(lines)


def _run_score(args: argparse.Namespace) -> int:
    import json

    from loopui.media import ImageInputError, VideoInputError, load_video, loop_scores, open_image

    # 1. Check everything before the slow parts: the options, the reference image, every video
    if args.prompt is not None and args.clip is None:
        return _fail("--prompt is only used by the CLIP score: pass --clip MODEL too")
    if args.prompt is not None and not args.prompt.strip():
        return _fail("prompt is empty [--prompt]")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        return _fail(f"fps must be a positive number, got {args.fps:g} [--fps]")
    try:
        reference = None if args.image is None else open_image(args.image)
        videos = []
        for path in args.videos:
            frames, fps = load_video(path)
            if len(frames) < 2:
                raise VideoInputError(f"video file {path!r} has {len(frames)} frame; a loop needs at least 2")
            videos.append((path, frames, args.fps or fps))
    except ImageInputError as exc:
        return _fail(f"{_one_line(exc)} [--image]")
    except VideoInputError as exc:
        return _fail(_one_line(exc))

    # 2. CLIP, when asked for
    clip = None
    if args.clip is not None:
        from loopui.models import ModelLoadError, load_clip

        try:
            clip = load_clip(args.clip, device=args.device)
        except ModelLoadError as exc:
            return _fail(_one_line(exc))
        except (ValueError, RuntimeError) as exc:  # e.g. an unknown --device
            return _fail(f"{_one_line(exc)} [--device]")

    # 3. Score and print
    rows = []
    for path, frames, fps in videos:
        scores = loop_scores(frames, reference=reference, prompt=args.prompt, clip=clip, fps=fps, flow=not args.fast)
        rows.append({"file": str(path), **scores})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_score_table(rows))
    return EXIT_OK


# -- logging --------------------------------------------------------------------------------------------------------

class _OneLineHandler(logging.Handler):
    """Log records as ``loopui: warning: ...`` lines on stderr, remembering what was shown (to avoid repeats)."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.shown.add(message)
        sys.stderr.write(f"{PROG}: {record.levelname.lower()}: {message}\n")


class _cli_logging:
    """Route loopui's log records to one-line stderr messages for one command, then restore the logger."""

    def __init__(self, verbose: bool, quiet: bool) -> None:
        self.level = logging.INFO if verbose else (logging.ERROR if quiet else logging.WARNING)
        self.verbose = verbose
        self.quiet = quiet
        self.handler = _OneLineHandler()

    def __enter__(self) -> set[str]:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        root = logging.getLogger("loopui")
        self.libraries = (diffusers_logging, transformers_logging)
        self.saved = (root.level, root.propagate, [lib.get_verbosity() for lib in self.libraries],
                      [lib.is_progress_bar_enabled() for lib in self.libraries])
        self.handler.setLevel(self.level)
        root.addHandler(self.handler)
        root.setLevel(self.level)
        root.propagate = False  # our handler prints it; a root handler would print it twice
        if not self.verbose:
            # diffusers/transformers chat about config keys and deprecations; only their errors matter here, and
            # with --quiet not even those (a failed load still ends in our one-line error).
            for library in self.libraries:
                library.set_verbosity(logging.CRITICAL if self.quiet else logging.ERROR)
        if self.quiet:
            for library in self.libraries:  # the "Loading pipeline components" / "Loading weights" bars
                library.disable_progress_bar()
        return self.handler.shown

    def __exit__(self, *exc_info: Any) -> None:
        root = logging.getLogger("loopui")
        root.removeHandler(self.handler)
        root.setLevel(self.saved[0])
        root.propagate = self.saved[1]
        for library, verbosity, bars in zip(self.libraries, self.saved[2], self.saved[3]):
            library.set_verbosity(verbosity)
            if bars:
                library.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
