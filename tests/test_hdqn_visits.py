"""Tests for studies/hdqn_visits.py: visits per episode counted from a trajectory by hand, and a
tiny run that draws the paper's Fig. 4 from the task's own runs, its visits agreeing with their
rewards."""

import json
import pathlib
import sys

import hdqn
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import hdqn_visits as study  # noqa: E402


def test_hdqn_episode_visits_count_each_finished_episode():
    # one seed: s3 s2 s1 | s3 s4 s3 s2 s1 | s3 s4 (unfinished: not counted); index 0..5 is s1..s6
    pos = np.array([[2, 1, 0, 2, 3, 2, 1, 0, 2, 3]])
    done = np.array([[0, 0, 1, 0, 0, 0, 0, 1, 0, 0]], bool)
    visits = study.episode_visits(hdqn.Trajectory(pos, np.zeros(pos.shape), done))
    assert visits.shape == (1, 10, 6)
    np.testing.assert_array_equal(visits[0, 0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(visits[0, 1], [1, 1, 2, 1, 0, 0])
    assert visits[0, 2:].sum() == 0


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_hdqn_visits_study_tiny_run_agrees_with_the_rewards(tmp_path):
    cfg = hdqn.Config(num_steps=2_000, num_seeds=2, target_period=100, out_dir=str(tmp_path))
    metrics = study.main(cfg)
    for agent in ("hdqn", "dqn"):
        for s in (3, 4, 5, 6):
            assert 0.0 <= metrics[f"{agent}_s{s}_visits_per_episode"] <= 50.0
    assert (tmp_path / "visits.png").exists()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    # the same run (same seeds): an episode paid 1 went through s6, one paid 0.01 did not, and
    # every paid episode ends with its one visit to s1
    run = hdqn.train(cfg, "hdqn")
    visits = study.episode_visits(run.trajectory)
    for reward, seen, n in zip(run.log.reward, visits, run.log.count):
        reward, seen = reward[:n], seen[:n]
        assert (seen[reward == 1.0, hdqn.GOAL_STATE] > 0).all()
        assert (seen[np.isclose(reward, 0.01), hdqn.GOAL_STATE] == 0).all()
        np.testing.assert_array_equal(seen[:, hdqn.TERMINAL], reward > 0)
