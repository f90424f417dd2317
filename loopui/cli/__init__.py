"""Command line: ``python -m loopui generate|mask|models|score``."""

from loopui.cli.generate import build_parser, build_request, check_output_paths, main

__all__ = ["build_parser", "build_request", "check_output_paths", "main"]
