"""The ``loopui`` parser and the dispatch to its sub-commands: ``generate``, ``mask``, ``models``, ``score``.

User mistakes end as one ``loopui: error: ...`` line and exit code 2; an interrupt exits 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from loopui.cli.common import EXIT_USAGE, PROG, OneLineParser, cli_logging, fail
from loopui.cli.generate import add_generate_arguments, run_generate
from loopui.cli.models import add_models_arguments, run_models
from loopui.cli.score import add_score_arguments, run_score


def build_parser() -> argparse.ArgumentParser:
    """The ``loopui`` argument parser with its ``generate``, ``mask``, ``models`` and ``score`` subcommands."""
    parser = OneLineParser(prog=PROG, description="Seamlessly looping videos from video diffusion models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate = commands.add_parser("generate", help="Generate a looping video.",
                                   description="Generate a seamlessly looping video from a text prompt "
                                               "(optionally anchored on a reference image).")
    add_generate_arguments(generate)
    mask = commands.add_parser("mask", help="Compute the motion mask of a reference image.")
    try:
        from loopui.cli.mask import add_mask_arguments
    except ImportError as exc:  # the saliency room is optional for generate/models
        mask.set_defaults(mask_unavailable=str(exc))
    else:
        add_mask_arguments(mask)
    models = commands.add_parser("models", help="List the known models (or describe model folders).")
    add_models_arguments(models)
    score = commands.add_parser("score", help="Score looping videos with the looping-video papers' metrics.",
                                description="Score looping videos (ours or any other program's MP4, GIF, WebP, ...) "
                                            "with the papers' metrics; several files give a comparison table.")
    add_score_arguments(score)
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
        return run_models(args.model)
    if args.command == "score":
        with cli_logging(verbose=args.verbose, quiet=False):
            return run_score(args)
    if args.command == "mask":
        if getattr(args, "mask_unavailable", None):
            return fail(f"the mask command is unavailable: {args.mask_unavailable}")
        from loopui.cli.mask import run_mask_command

        return run_mask_command(args)
    with cli_logging(verbose=args.verbose, quiet=args.quiet) as shown:
        return run_generate(args, shown)
