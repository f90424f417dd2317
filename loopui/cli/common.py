"""What the sub-commands share: flags made from ``LoopRequest``'s knob metadata, number parsing, the one-line
``loopui: error: ...`` exit (code 2 for user mistakes), and logging routed to one-line stderr messages."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Optional

from loopui.engine.request import knob_info, parse_sigmas
from loopui.engine.values import number_text, real_number, whole_number

PROG = "loopui"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- numbers --------------------------------------------------------------------------------------------------------

def parse_number_or_auto(text: str) -> Optional[float]:
    """A number, or ``auto`` (None: the automatic value, see resolve_request)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return real_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_whole(text: str) -> int:
    """A whole-number flag, by the same rule as the page and the API (``7.5`` is refused, not rounded)."""
    try:
        return whole_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def parse_number(text: str) -> float:
    """A finite real-number flag (``nan`` and ``inf`` are refused)."""
    try:
        return real_number("value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None


def parse_sigma_list(text: str) -> Optional[tuple[float, ...]]:
    """``1,0.9375,0.8333,0.625`` (commas or spaces); ``auto`` or nothing is the scheduler's own spacing (None)."""
    try:
        return parse_sigmas(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected noise levels separated by commas (1,0.9375,0.8333,0.625), got "
                                         f"{text!r}") from None


# -- knobs as flags -------------------------------------------------------------------------------------------------

# Flags of knobs left to the model's recommendation when not given (None = "ask the model": the engine's plan_loop
# fills them from the registry, e.g. guidance 6 on CogVideoX, 5 on Wan, and two values on a two-expert Wan 2.2).
MODEL_RECOMMENDED = ("scheduler", "guidance_scale", "use_dynamic_cfg", "height", "width", "fps", "flow_shift")

# (flag, LoopRequest field, argparse type). Booleans and the image paths are added separately.
KNOB_FLAGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--negative-prompt", "negative_prompt", str),
    ("--frames", "num_frames", parse_whole),
    ("--height", "height", parse_whole),
    ("--width", "width", parse_whole),
    ("--steps", "num_inference_steps", parse_whole),
    ("--guidance", "guidance_scale", parse_number),
    ("--seed", "seed", parse_whole),
    ("--shift-skip", "shift_skip", parse_whole),
    ("--shift-start", "shift_start", parse_number),
    ("--shift-end", "shift_end", parse_number),
    ("--rope-scale", "rope_scale", parse_number_or_auto),
    ("--window", "window_mode", str),
    ("--scheduler", "scheduler", str),
    ("--flow-shift", "flow_shift", parse_number_or_auto),
    ("--fps", "fps", parse_whole),
    ("--seam-polish", "seam_polish", str),
    ("--step-cache", "step_cache", str),
    ("--sigmas", "sigmas", parse_sigma_list),
    ("--mask-model", "mask_model", str),
    ("--mask-threshold", "mask_threshold", parse_number),
    ("--mask-grow", "mask_grow", parse_whole),
    ("--mask-feather", "mask_feather", parse_whole),
    ("--motion-region", "motion_region", str),
    ("--anchor-strength", "anchor_strength", parse_number),
    ("--init-strength", "init_strength", parse_number),
    ("--loop-region", "loop_region", parse_number),
    ("--background-freeze", "background_freeze", parse_number),
    ("--image-channel", "image_channel", str),
    ("--attention", "attention", str),
    ("--quantize", "quantize", str),
)

# For error messages: "num_frames must be >= 5" is clearer as "... [--frames]" on the command line.
FIELD_FLAGS = {field: flag for flag, field, _ in KNOB_FLAGS} | {
    "prompt": "--prompt", "use_dynamic_cfg": "--dynamic-cfg", "image": "--image", "mask": "--mask",
    "video": "--video", "frame_invariant_decoding": "--no-frame-invariant-decoding", "loras": "--lora",
    "recipe": "--recipe", "compile": "--compile"}


def knob_default(field: str) -> Any:
    """The default of a ``LoopRequest`` knob: the one definition every sub-command's flag defaults read."""
    return knob_info(field)["default"]


def knob_help(field: str, recommended: bool = False) -> str:
    """A knob's help text as a flag's: its range and default appended, ``%`` escaped for argparse."""
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


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per entry of ``KNOB_FLAGS``, its default, choices and help read from ``LoopRequest``'s metadata."""
    for flag, field, kind in KNOB_FLAGS:
        info = knob_info(field)
        recommended = field in MODEL_RECOMMENDED
        default = None if recommended else info["default"]
        metavar = {"rope_scale": "S|auto", "flow_shift": "F|auto", "sigmas": "S1,S2,..."}.get(field) or (
            None if info.get("choices") else flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=field, type=kind, default=default, choices=info.get("choices"),
                            metavar=metavar, help=knob_help(field, recommended))


# -- one-line errors ------------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``loopui: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``loopui: error: MESSAGE`` on stderr; returns ``code`` (2, a user mistake, unless told otherwise)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def flag_hint(message: str) -> str:
    """Append the flag of the setting a message starts with (``num_frames must ...`` -> ``... [--frames]``), unless
    the message names a flag already."""
    if " [--" in message or message.startswith("--"):
        return message
    field = message.split(" ", 1)[0].rstrip(":")
    flag = FIELD_FLAGS.get(field)
    return f"{message} [{flag}]" if flag else message


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


class cli_logging:
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
