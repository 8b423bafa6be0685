"""Tests for studies/optimization_trajectory.py: the gap and the time of every step, drawn."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import optimization_trajectory as trajectory  # noqa: E402


@pytest.mark.slow
def test_optimization_trajectory_tiny_run(tmp_path):
    """20 steps per twin on 6,000 images: the twins stay bit-identical, both figures are drawn."""
    study = trajectory.StudyConfig(num_steps=20, train_size=6000, out_dir=str(tmp_path))
    metrics = trajectory.main(study)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for name in ("sgd", "momentum", "nesterov", "adam"):
        assert metrics[f"max_rel_param_diff_{name}"] <= 1e-5
        assert metrics[f"step_ms_{name}_hand"] > 0 and metrics[f"step_ms_{name}_optax"] > 0
    assert metrics["throughput"] > 0
    for figure in ("param_gap.png", "step_time.png"):
        assert (tmp_path / figure).stat().st_size > 0


def test_optimization_trajectory_bad_config_raises(tmp_path):
    with pytest.raises(ValueError, match="--num-steps"):
        trajectory.main(trajectory.StudyConfig(num_steps=0, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
