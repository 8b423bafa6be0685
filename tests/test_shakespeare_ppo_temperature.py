"""The temperature study of shakespeare_ppo: the bisection, and a mini run beside the task's."""

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import shakespeare_ppo as sp  # noqa: E402  (tasks/ is on the path: tests/conftest.py)
import shakespeare_ppo_temperature as study  # noqa: E402

MINI = dict(pretrain_steps=2, ppo_iterations=1, episodes_per_iteration=4, ppo_epochs=1)
MINI.update(num_minibatches=1, num_seeds=2, eval_samples=4)


def shakespeare_ppo_temperature_stub_judge(judge, texts, batch=16):
    """A stand-in for SmolLM2 (loading it takes seconds): a score from the texts' count."""
    return {"judge": -5.0 - len(texts) / 100, "judge_sem": 0.1, "per_verse": np.zeros(len(texts))}


def test_shakespeare_ppo_temperature_bisection_matches_diversity():
    """A stand-in sampler whose distinct-2 grows with the temperature: the bisection returns a
    temperature whose distinct-2 is the target's, and a higher target gives a hotter one."""

    def sample(params, key, num, temp):  # words drawn from a vocabulary that grows with temp
        rng = np.random.default_rng(0)
        return rng.integers(3, 3 + max(2, int(80 * temp)), (num, sp.MAX_LEN))

    distinct2 = lambda t: sp.distinct2(np.asarray(sample(None, None, 64, t)))
    temps = [study.matched_temperature(sample, None, None, 64, d) for d in (0.5, 0.7)]
    assert 0.3 < temps[0] < temps[1] < 1.0
    for temp, target in zip(temps, (0.5, 0.7)):
        assert distinct2(temp) == pytest.approx(target, abs=0.05)


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_shakespeare_ppo_temperature_mini_run_matches_task(tmp_path, monkeypatch):
    """Same config and seed: the study's PPO and reference numbers are the task's, and the
    cooled reference is scored with every metric under the task's names."""
    monkeypatch.setattr(sp, "load_judge", lambda: None)
    monkeypatch.setattr(sp, "judge_stats", shakespeare_ppo_temperature_stub_judge)
    task = sp.main(sp.Config(**MINI, out_dir=str(tmp_path / "task")))
    m = study.main(sp.Config(**MINI, out_dir=str(tmp_path / "study")))
    saved = json.loads((tmp_path / "study" / "metrics.json").read_text())
    assert saved == m
    for key in ["ppo_reward", "reference_reward", "ppo_distinct2", "judge_ppo"]:
        assert m[key] == pytest.approx(task[key], rel=1e-6), key
    for key in ["cooled_temperature", "judge_cooled", "cooled_reward", "cooled_distinct2"]:
        assert np.isfinite(m[key]), key
    assert 0.3 < m["cooled_temperature"] < 1.0
    assert (tmp_path / "study" / "samples.txt").read_text().startswith("=== cooled")
