"""Where the repository is, for tests that run its scripts, read its docs or start subprocesses in it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
