"""Tests for studies/scaling_laws_batching.py: it runs, writes metrics.json, both paths agree."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import scaling_laws_batching  # noqa: E402


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_scaling_laws_batching_study_runs_and_paths_agree(tmp_path):
    args = ["--channels", "2", "--num-runs", "2", "--steps", "20", "--out-dir", str(tmp_path)]
    metrics = scaling_laws_batching.main(args)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["max_curve_difference"] < 1e-4  # the same runs, batched or in turn
    assert metrics["sequential_cpu_s"] > 0 and metrics["batched_cpu_s"] > 0
