"""The ``mask`` subcommand: ``python -m loopui mask IMAGE --output MASK.png [--mask-model NAME] ...``.

Writes the motion mask as an 8-bit grayscale PNG (white = may move). Its defaults are ``LoopRequest``'s mask knobs
(``mask_model``, ``mask_threshold``, ``mask_grow``, ``mask_feather``), the same as ``generate``'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from loopui.cli.common import EXIT_OK, EXIT_USAGE, fail, knob_default
from loopui.messages import one_line
from loopui.saliency import MASK_MODEL_INFO, MASK_MODELS, SaliencyUnavailable, load_rgb_image, resolve_mask


def add_mask_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mask`` subcommand's arguments to ``parser`` (a subparser); returns it."""
    models = "; ".join(MASK_MODEL_INFO[name].label for name in MASK_MODELS)
    model, threshold = knob_default("mask_model"), knob_default("mask_threshold")
    grow, feather = knob_default("mask_grow"), knob_default("mask_feather")
    parser.add_argument("image", help="Reference image (PNG/JPEG/WebP...).")
    parser.add_argument("--output", "-o", required=True, help="Where to write the mask (8-bit grayscale PNG).")
    parser.add_argument("--mask-model", default=model, choices=MASK_MODELS, metavar="NAME",
                        help=f"Saliency model (default {model}): {models}.")
    parser.add_argument("--model-path", default=None,
                        help="A custom U^2-Net-style ONNX file inside rembg's model folder (used instead of "
                             "--mask-model).")
    parser.add_argument("--threshold", type=float, default=threshold,
                        help=f"Saliency cut-off in [0, 1] (default {threshold}).")
    parser.add_argument("--grow", type=int, default=grow,
                        help=f"Grow (+) or shrink (-) the mask by this many pixels (default {grow}).")
    parser.add_argument("--feather", type=int, default=feather,
                        help=f"Soften the mask edge over this many pixels (default {feather}).")
    parser.add_argument("--invert", action="store_true",
                        help="Animate the background instead of the object.")
    return parser


def run_mask_command(args: argparse.Namespace) -> int:
    """Compute the mask of ``args.image`` and write it to ``args.output``; 0 on success, 2 on a user error.

    Prints one line (output path and coverage) on success, or one ``loopui: error: ...`` line on stderr.
    """
    try:
        output = Path(args.output)
        if output.suffix.lower() != ".png":
            raise ValueError(f"--output must be a .png file, got {str(output)!r}")
        image = load_rgb_image(args.image)
        result = resolve_mask(image, model_name=args.mask_model, threshold=args.threshold, grow=args.grow,
                              feather=args.feather, invert=args.invert,
                              model_path=getattr(args, "model_path", None))
        output.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(result.mask * 255.0).astype(np.uint8), mode="L").save(output)
    except (ValueError, SaliencyUnavailable, OSError) as err:
        return fail(one_line(err), EXIT_USAGE)
    source = result.model_name if result.source == "model" else "your mask"
    print(f"{output}: mask coverage {100.0 * result.coverage:.1f}% ({source})")
    return EXIT_OK
