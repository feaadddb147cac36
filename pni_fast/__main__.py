"""``python -m pni_fast``: see pni_fast/cli.py (demo, train, eval, info, bench)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
