"""``python -m loopui.cli``: the command line, as ``python -m loopui``."""

import sys

from loopui.cli import main

if __name__ == "__main__":
    sys.exit(main())
