"""Tests for studies/flow_matching_sampling.py: the solver sweep and the field's figures, on a tiny
model."""

import json
import pathlib
import sys

import flow_matching as fm
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import flow_matching_sampling as study  # noqa: E402

TINY = dict(train_steps=1500, batch_size=256, hidden=64, num_train=4000, num_samples=500)


def test_fm_iid_moons_match_make_moons_distribution():
    """Independent draws have make_moons' per-axis mean and spread (4000 points; the standard
    error of a mean is about 0.014), but no stratification."""
    a, b = study.iid_moons(4000, np.random.default_rng(0)), fm.moons(4000, 0)
    np.testing.assert_allclose(a.mean(0), b.mean(0), atol=0.05)
    np.testing.assert_allclose(a.std(0), b.std(0), atol=0.05)


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_fm_sampling_study_runs(tmp_path):
    out = tmp_path / "study"
    metrics = study.main(fm.Config(out_dir=str(out), **TINY))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for solver in fm.SOLVERS:
        assert {f"w2_ratio_{solver}_{k}" for k in study.STEPS} <= set(saved)
    # More steps of a second-order solver beat one Euler step by far (seed 0: 1.5 against 8).
    assert saved["w2_ratio_heun_32"] < 0.5 * saved["w2_ratio_euler_1"]
    assert saved["w2_ratio_perfect_iid_sampler"] > 1.0  # stratified sets beat i.i.d. draws
    for fig in ("field.png", "w2_vs_nfe.png", "sampling.gif"):
        assert (out / fig).stat().st_size > 0
    # same flags and seed as the task: the same headline number
    task = fm.main(fm.Config(out_dir=str(tmp_path / "task"), **TINY))
    assert saved["w2_ratio"] == pytest.approx(task["w2_ratio"], rel=1e-6)
