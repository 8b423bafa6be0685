"""Tests for studies/beam_search_tree.py: the search tree of the first context, on a tiny random
GPT-2 with a word-level tokenizer (the set-up of tests/test_beam_search.py)."""

import json
import pathlib
import sys

import beam_search as bs
import pytest
from test_beam_search import beam_search_run  # noqa: F401 (the tiny model and a task run)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import beam_search_tree as study  # noqa: E402


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_beam_search_tree_study_draws_the_task_search(beam_search_run, tmp_path):  # noqa: F811
    task_metrics, task_out, folder = beam_search_run
    task_cfg = json.loads((task_out / "config.json").read_text())
    cfg = bs.Config(**{**task_cfg, "out_dir": str(tmp_path / "tree")})
    metrics = study.main(cfg)
    assert json.loads((tmp_path / "tree" / "metrics.json").read_text()) == metrics
    assert metrics["model_used"] == str(folder) and metrics["num_beams"] == 3
    assert 1 <= metrics["steps"] <= cfg.max_new_tokens
    # The same search as the task's: its throughput counts the same number of steps.
    steps = task_metrics["throughput"] * task_metrics["ours_min_s"] / (2 * 3)
    assert round(steps) == metrics["steps"]
    assert (tmp_path / "tree" / "search_tree.png").stat().st_size > 0
