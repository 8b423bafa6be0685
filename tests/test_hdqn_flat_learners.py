"""Tests for studies/hdqn_flat_learners.py: the exact fixed points of the expected flat
Q-learning update, flat tabular Q-learning's two regimes, and a tiny run of the whole study."""

import json
import pathlib
import sys

import hdqn
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import hdqn_flat_learners as study  # noqa: E402


def test_hdqn_expected_flat_update_keeps_only_always_left():
    # Exact enumeration of the 32 memoryless greedy policies: under epsilon-greedy
    # exploration the expected flat Q-learning update keeps only "always left", worth 0.01.
    for gamma in (0.5, 0.9, 0.99):
        for epsilon in (0.1, 0.3):
            kept = study.expected_update_fixed_points(epsilon, gamma)
            assert [policy for policy, _ in kept] == ["LLLLL"], (gamma, epsilon, kept)
            assert kept[0][1] == pytest.approx(0.01, abs=1e-4)
    # its occupancy arithmetic agrees with backward induction: the uniform random policy
    (_, random_reward), *_ = study.expected_update_fixed_points(1.0, 0.99)
    exact = hdqn.solve_mdp(3_000, policy=np.array([0.5, 0.5]))
    assert random_reward == pytest.approx(exact, abs=1e-9)


def test_hdqn_flat_tabular_q_small_steps_reach_the_always_left_fixed_point():
    # The expected Q-learning update on the aliased state prefers "left" in s2, so
    # with small steps every seed ends greedy-left and earns 0.01; large steps stay above it.
    # Calibrated over base seeds 0..9: step 0.005 gives 0.0100 on all 40 runs, every one greedy-left
    # in s2; step 0.1 gives a mean over 4 seeds of 0.084 to 0.098 (sd 0.005), far above the bar.
    cfg = hdqn.Config(num_steps=20_000, num_seeds=4)
    log, q = study.train_tabular(cfg, (0.005, 0.1))
    reward = np.stack([hdqn.last_episodes_mean(r, n) for r, n in zip(log.reward, log.count)])
    assert (q[0, :, hdqn.START, hdqn.LEFT] > q[0, :, hdqn.START, hdqn.RIGHT]).all()
    np.testing.assert_allclose(reward[0], 0.01, atol=0.002)
    assert reward[1].mean() > 0.03, reward  # the noisy regime: the flat learner keeps going right
    # Q-values never exceed the largest possible return
    assert (q >= -1e-6).all() and (q <= 1.0 + 1e-6).all()


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_hdqn_flat_learners_study_tiny_run(tmp_path):
    out = tmp_path / "study"
    cfg = study.StudyConfig(num_steps=2_000, num_seeds=2, step_sizes=(0.01, 0.1), out_dir=str(out))
    metrics = study.main(cfg)
    assert metrics["flat_expected_update_fixed_points"].startswith("LLLLL:0.0100")
    assert len(metrics["tabular_q_reward_by_step_size"].split()) == 2
    for name in (
        "dqn_s2_greedy_left_share",
        "dqn_replay_s2_left_paid_1",
        "dqn_replay_s2_right_paid_1",
    ):
        assert 0.0 <= metrics[name] <= 1.0, metrics
    assert metrics["always_right_reward"] == pytest.approx(0.1755, abs=1e-4)
    assert (out / "flat_learners.png").exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_hdqn_flat_learners_counting_run_matches_the_task(tmp_path):
    # the counter beside the flat DQN changes nothing: same seeds, same episodes as the task's run
    cfg = hdqn.Config(num_steps=1_000, num_seeds=2, target_period=100, out_dir=str(tmp_path))
    flat, log, counts = study.train_flat_dqn_counting(cfg)
    task = hdqn.train(cfg, "dqn")
    np.testing.assert_array_equal(log.reward, task.log.reward)
    np.testing.assert_array_equal(log.count, task.log.count)
    np.testing.assert_array_equal(flat.dqn.buffer.obs, task.carry.dqn.buffer.obs)
    assert counts.shape == (2, 2) and counts.sum() > 0
