"""Subprocesses that tests start (2-rank runs, examples, the command) import `helpers` like the tests do."""

import os
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)
