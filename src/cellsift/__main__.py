"""``python -m cellsift``: the ``cellsift`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
