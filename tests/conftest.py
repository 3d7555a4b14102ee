"""Subprocesses that tests start (2-rank runs, examples, the command) import `helpers` like the tests do.

The suite never needs the network: a plain `pytest` (not through `make test`, which sets it too) runs with
HF_HUB_OFFLINE=1 as well, so the "not found" refusals fail at once instead of waiting on Hub lookups
(~70 s online here). Set before any test imports huggingface_hub, which reads it at import."""

import os
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
