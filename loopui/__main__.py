"""``python -m loopui``: the command line (see ``loopui.cli``)."""

import sys

from loopui.cli import main

if __name__ == "__main__":
    sys.exit(main())
