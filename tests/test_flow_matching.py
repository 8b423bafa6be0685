"""Tests for tasks/flow_matching.py: the path and its target, the solvers, and a tiny run that
must learn."""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import flow_matching as fm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# A tiny config: about 20 s on 2 cores. Calibrated over seeds 0..9: w2_ratio 1.29 to 1.51, mean
# 1.38, std 0.08 (seed 0, used here, 1.45; an untrained model scores about 20). The bar of 1.8 is
# 0.29 above the worst seed and 5 standard deviations above the mean.
TINY = dict(
    train_steps=3000, batch_size=256, hidden=64, num_train=4000, sample_steps=8, num_samples=1000
)


def test_fm_interpolant_and_target():
    x0, x1 = jnp.array([[0.0, 0.0], [1.0, -1.0]]), jnp.array([[2.0, 4.0], [3.0, 1.0]])
    t = jnp.array([0.25, 1.0])
    x_t, target = fm.interpolant(x0, x1, t)
    np.testing.assert_allclose(x_t, [[0.5, 1.0], [3.0, 1.0]])  # (1 - t) x0 + t x1
    np.testing.assert_allclose(target, x1 - x0)  # the path's velocity
    # The target is the time derivative of the path, by finite differences.
    eps = 1e-3
    x_plus, _ = fm.interpolant(x0, x1, t + eps)
    np.testing.assert_allclose((x_plus - x_t) / eps, target, atol=1e-3)


class _Identity(nnx.Module):
    """An exactly solvable field: v(x, t) = x, so x(1) = e * x(0)."""

    def __call__(self, x, t):
        return x


def test_fm_solvers_converge_at_their_order():
    """fm.integrate's error halves per doubling of steps for Euler and quarters for Heun."""
    x0 = jnp.ones((1, 2))

    def error(steps, solver):
        return float(jnp.abs(fm.integrate(_Identity(), x0, steps, solver)[-1] - np.e * x0).max())

    assert error(16, "euler") / error(32, "euler") == pytest.approx(2.0, rel=0.1)  # first order
    for solver in ("midpoint", "heun"):
        assert error(16, solver) / error(32, solver) == pytest.approx(4.0, rel=0.1)  # second


def test_fm_integrate_matches_exact_solution():
    """fm.integrate itself on a model whose flow is known: v = x gives x(1) = e x(0)."""

    x0 = jnp.array([[1.0, -2.0]])
    for solver, tol in (("euler", 0.05), ("midpoint", 1e-3), ("heun", 1e-3)):
        path = fm.integrate(_Identity(), x0, 64, solver)
        assert path.shape == (65, 1, 2)
        np.testing.assert_allclose(path[-1], np.e * x0, rtol=tol)


def test_fm_w2_distance_is_exact():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 0.1], [0.0, 0.1]])  # the best assignment crosses the input order
    assert fm.w2_distance(a, b) == pytest.approx(0.1)
    assert fm.w2_distance(a, a) == 0.0


def test_fm_sobol_noise_is_standard_normal():
    # Over seeds 0..99, the largest |mean| was 0.0004 and the largest |std - 1| 0.0018 (i.i.d.
    # draws of 4096 points: |mean| up to 0.057). 0.02 is 10x the worst seed.
    x = fm.base_noise(4096, "sobol", seed=0)
    assert x.shape == (4096, 2) and np.isfinite(x).all()
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=0.02)


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(train_steps=0), "--train-steps"),
        (dict(batch_size=-1), "--batch-size"),
        (dict(solver="rk4"), "--solver"),
        (dict(noise="uniform"), "--noise"),
        (dict(learning_rate=0.0), "--learning-rate"),
        (dict(learning_rate=-1e-3), "--learning-rate"),
        (dict(learning_rate=math.nan), "--learning-rate"),
        (dict(learning_rate=math.inf), "--learning-rate"),
        (dict(seed=-1), "--seed"),
        (dict(seed=2**32), "--seed"),
        (dict(num_samples=1), "--num-samples"),
        (dict(num_samples=10**6), "--num-samples"),  # the exact W2 would need 8 TB
        (dict(out_dir="/proc/not_writable"), "--out-dir"),
    ],
)
def test_fm_bad_config_raises(change, option, tmp_path):
    cfg = fm.Config(out_dir=str(tmp_path), **TINY)
    with pytest.raises(ValueError, match=f"^{option} "):
        fm.validate(dataclasses.replace(cfg, **change))
    with pytest.raises(ValueError, match=f"^{option} "):  # main validates before any work
        fm.main(dataclasses.replace(cfg, **change))


def test_fm_out_dir_that_is_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="^--out-dir "):
        fm.validate(fm.Config(out_dir=str(tmp_path / "file")))


def test_fm_command_line_rejects_bad_value_in_one_line():
    script = pathlib.Path(fm.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--learning-rate", "inf"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --learning-rate inf: must be a finite number > 0 and <= 1"
    ]


def test_fm_help_shows_the_paper_preset(capsys):
    with pytest.raises(SystemExit):
        fm.cli_config(["--help"])
    assert "paper" in capsys.readouterr().out


def test_fm_paper_preset_is_valid_and_runs(tmp_path, monkeypatch):
    paper = fm.PRESETS["paper"]
    assert (paper.hidden, paper.depth, paper.batch_size, paper.train_steps) == (512, 3, 4096, 10000)
    fm.validate(paper)
    assert fm.cli_config(["--preset", "paper", "--train-steps", "7"]) == dataclasses.replace(
        paper, train_steps=7
    )
    assert fm.cli_config([]) == fm.PRESETS["cpu"] == fm.Config()
    # A smoke run of the paper's model: a few steps, small batch and sample sizes.
    tiny = dict(train_steps=4, batch_size=64, num_train=200, sample_steps=2, num_samples=64)
    # The figures do not depend on the preset (test_fm_tiny_run... draws them): skip them here.
    monkeypatch.setattr(fm, "plot_all", lambda *args: None)
    metrics = fm.main(dataclasses.replace(paper, out_dir=str(tmp_path / "paper"), **tiny))
    assert metrics["preset"] == "paper" and metrics["throughput"] > 0
    saved = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert saved["hidden"] == 512 and saved["depth"] == 3


def _no_constants(name):
    raise ValueError(f"metrics.json holds {name}")


def test_fm_tiny_run_learns_and_is_deterministic(tmp_path):
    cfg = fm.Config(out_dir=str(tmp_path / "a"), **TINY)
    metrics = fm.main(cfg)
    assert metrics["w2_ratio"] < 1.8, metrics["w2_ratio"]
    # strict JSON, written whole, with the device, the preset and the throughput
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text(), parse_constant=_no_constants)
    assert saved["w2_ratio"] == pytest.approx(metrics["w2_ratio"])
    assert saved["device"].startswith(jax.default_backend()) and saved["num_devices"] >= 1
    assert saved["preset"] == "cpu" and saved["throughput_unit"] == "steps/s"
    assert saved["throughput"] > 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["seed"] == 0
    assert not list(tmp_path.glob(".a.*"))  # no staging folder left behind
    samples = np.load(tmp_path / "a" / "samples.npy")
    assert samples.shape == (1000, 2)
    for fig in ("samples.png", "loss.png"):
        assert (tmp_path / "a" / fig).stat().st_size > 0
    # the bars beside their metrics, and the time split
    assert saved["w2_ratio_ceiling"] == 1.2 and saved["wall_time_s_ceiling"] == 90
    assert set(saved["time_split_s"]) == {"setup", "train", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert saved["wall_time_s"] == pytest.approx(sum(saved["time_split_s"].values()), abs=0.02)
    assert not [k for k in saved if k.endswith("_target")]
    assert "w2_ratio_iid_noise" in saved
    # Same seed, same samples: train again briefly and compare with a first short run.
    short = dict(TINY, train_steps=50)
    model_a, _, _ = fm.train(fm.Config(**short), fm.moons(500, 0), jax.random.key(3))
    model_b, _, _ = fm.train(fm.Config(**short), fm.moons(500, 0), jax.random.key(3))
    x0 = jnp.asarray(fm.base_noise(64, "iid", 0))
    np.testing.assert_array_equal(
        fm.integrate(model_a, x0, 4, "heun"), fm.integrate(model_b, x0, 4, "heun")
    )


def test_fm_divergence_stops_the_run_and_keeps_old_results(tmp_path, monkeypatch):
    """A diverged run raises with the step, and leaves the previous run's folder as it was."""
    out = tmp_path / "run"
    out.mkdir()  # an earlier run's folder
    (out / "config.json").write_text("{}")
    (out / "metrics.json").write_text('{"old": 1}')
    moons = fm.moons

    def poisoned_moons(n, seed):  # a NaN in the training set: every loss is NaN
        data = moons(n, seed)
        data[0] = np.nan
        return data

    monkeypatch.setattr(fm, "moons", poisoned_moons)
    with pytest.raises(FloatingPointError, match="diverged at step 1: loss is nan"):
        fm.main(fm.Config(out_dir=str(out), **dict(TINY, train_steps=40)))
    assert json.loads((out / "metrics.json").read_text()) == {"old": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["run"]  # no staging folder left behind
