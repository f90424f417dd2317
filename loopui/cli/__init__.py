"""Command line: ``python -m loopui generate|mask|models|score``.

``main.py`` builds the parser and dispatches; ``common.py`` holds what the sub-commands share (flags made from
``LoopRequest``'s knob metadata, number parsing, one-line errors, logging); one module per sub-command.
"""

from loopui.cli.generate import build_request, check_output_paths
from loopui.cli.main import build_parser, main

__all__ = ["build_parser", "build_request", "check_output_paths", "main"]
