"""``python -m pni_fast``: see pni_fast/cli.py (demo, train, eval, rng-stream, info, bench)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
