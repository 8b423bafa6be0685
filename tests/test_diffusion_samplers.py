"""Tests for studies/diffusion_samplers.py: the sampler sweep, the perfect i.i.d. sampler and the
figures of the two processes, on a tiny model."""

import json
import pathlib
import sys

import diffusion as dd
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import diffusion_samplers as study  # noqa: E402

TINY = dict(
    train_steps=1500, batch_size=256, num_train=4000, num_timesteps=50, sample_steps=20,
    num_samples=500,
)  # fmt: skip


@pytest.mark.parametrize("sampler, expected", [("heun", 39), ("ddim", 20), ("ddpm", 20)])
def test_dd_nfe_counts_model_calls(sampler, expected):
    assert study.nfe(sampler, 20) == expected  # Heun: 2 a step, 1 on the last (s = 0)


def test_dd_iid_moons_match_make_moons_distribution():
    """Independent draws have make_moons' per-axis mean and spread (4000 points; the standard
    error of a mean is about 0.014), but no stratification."""
    a, b = study.iid_moons(4000, np.random.default_rng(0)), dd.moons(4000, 0)
    np.testing.assert_allclose(a.mean(0), b.mean(0), atol=0.05)
    np.testing.assert_allclose(a.std(0), b.std(0), atol=0.05)


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_dd_samplers_study_runs(tmp_path):
    out = tmp_path / "study"
    metrics = study.main(dd.Config(out_dir=str(out), **TINY))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for sampler in ("heun", "ddim", "ddpm"):  # only step counts up to T = 50
        assert {f"w2_ratio_{sampler}_{k}" for k in (5, 10, 20, 50)} <= set(saved)
        assert f"w2_ratio_{sampler}_100" not in saved
    # Second order beats first order at the same steps (seed 0: about 2 against 5).
    assert saved["w2_ratio_heun_10"] < saved["w2_ratio_ddim_10"]
    assert saved["w2_ratio_perfect_iid_sampler"] > 1.0  # stratified sets beat i.i.d. draws
    for fig in ("forward.png", "reverse.png", "w2_vs_steps.png", "loss.png"):
        assert (out / fig).stat().st_size > 0
    assert saved["w2_ratio_ddpm_ancestral"] > 1.0
    # same flags and seed as the task: the same model, so the same headline number
    task = dd.main(dd.Config(out_dir=str(tmp_path / "task"), **TINY))
    assert saved["w2_ratio"] == pytest.approx(task["w2_ratio"], rel=1e-6)
