"""Shared test set-up: task files live in tasks/ and are imported by their module name."""

import os
import pathlib
import sys

# Never reach a model hub from a test: without this, a failed lookup waits about 50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tasks"))
