"""Tests for studies/hdqn_visits.py: a tiny run draws the paper's Fig. 4 and reproduces the
task's s6 visits per episode (same seeds, same runs)."""

import json
import pathlib
import sys

import hdqn
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import hdqn_visits as study  # noqa: E402


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_hdqn_visits_study_tiny_run_matches_the_task(tmp_path):
    cfg = hdqn.Config(num_steps=2_000, num_seeds=2, target_period=100)
    metrics = study.main(hdqn.dataclasses.replace(cfg, out_dir=str(tmp_path / "study")))
    task = hdqn.main(hdqn.dataclasses.replace(cfg, out_dir=str(tmp_path / "task")))
    for agent in ("hdqn", "dqn"):
        name = f"{agent}_s6_visits_per_episode"
        assert metrics[name] == pytest.approx(task[name], rel=1e-6)
        for s in (3, 4, 5, 6):
            assert 0.0 <= metrics[f"{agent}_s{s}_visits_per_episode"] <= 50.0
    assert (tmp_path / "study" / "visits.png").exists()
    written = json.loads((tmp_path / "study" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
