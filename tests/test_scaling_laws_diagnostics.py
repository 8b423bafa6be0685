"""Tests for studies/scaling_laws_diagnostics.py: the joint law, both figures, and a tiny run."""

import dataclasses
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import scaling_laws_diagnostics as study  # noqa: E402


def _record(channels, n_train, seed, curve):
    best = int(np.argmin(curve))
    return {"channels": channels, "n_train": n_train, "seed": seed, "val_loss": curve[best],
            "best_step": 25 * (best + 1), "val_loss_curve": curve}  # fmt: skip


def test_scaling_laws_joint_law_is_chinchillas_form():
    fit = {"E": 0.03, "A": 20.0, "alpha": 0.5, "B": 8.0, "beta": 0.4}
    assert study.joint_law(400.0, 100.0, fit) == pytest.approx(0.03 + 20 / 20 + 8 / 100**0.4)


def test_scaling_laws_diagnostic_figures_draw_from_records(tmp_path):
    # Two widths on two data sizes, two seeds: the records runs.json holds, no training.
    results = [
        _record(c, n, s, [0.9 - 0.1 * c / n * 1000, 0.5, 0.6])
        for c in (4, 2)
        for n in (1000, 250)
        for s in (0, 1)
    ]
    fit = {"E": 0.1, "A": 5.0, "alpha": 0.5, "B": 3.0, "beta": 0.3, "r2": 0.9}
    study.plot_joint(results, fit, tmp_path / "joint.png")
    study.plot_curves(results, 25, tmp_path / "curves.png")
    assert (tmp_path / "joint.png").stat().st_size > 0
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_scaling_laws_diagnostics_study_runs_the_task_and_draws(tmp_path):
    tiny = dict(num_widths=3, num_data_sizes=3, base_channels=4, steps=50, batch_size=64)
    tiny |= dict(learning_rate=5e-3, eval_every=25, num_seeds=1, val_size=2000)
    cfg = dataclasses.replace(study.DEFAULT, out_dir=str(tmp_path / "run"), **tiny)
    metrics = study.main(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert metrics["num_runs"] == 3 + 2 + 2  # data sweep, model sweep, joint grid
    for name in ("scaling.png", "joint.png", "curves.png", "runs.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
