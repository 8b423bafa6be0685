"""Tests for tasks/flow_matching.py: the path and its target, the solvers, and a tiny run that
must learn."""

import dataclasses
import json

import flow_matching as fm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# A tiny config: about 20 s on 2 cores. Calibrated over seeds 0, 1, 2: w2_ratio 1.45, 1.51, 1.34
# (an untrained model scores about 20); the bar of 1.8 leaves a margin of about 0.3.
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
    x = fm.base_noise(4096, "sobol", seed=0)
    assert x.shape == (4096, 2) and np.isfinite(x).all()
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=0.02)


@pytest.mark.parametrize(
    "change",
    [
        dict(train_steps=0),
        dict(batch_size=-1),
        dict(solver="rk4"),
        dict(noise="uniform"),
        dict(learning_rate=0.0),
        dict(out_dir="/proc/not_writable"),
    ],
)
def test_fm_bad_config_raises(change, tmp_path):
    cfg = fm.Config(out_dir=str(tmp_path), **TINY)
    with pytest.raises(ValueError):
        fm.validate(dataclasses.replace(cfg, **change))


def test_fm_tiny_run_learns_and_is_deterministic(tmp_path):
    cfg = fm.Config(out_dir=str(tmp_path / "a"), **TINY)
    metrics = fm.main(cfg)
    assert metrics["w2_ratio"] < 1.8, metrics["w2_ratio"]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["w2_ratio"] == pytest.approx(metrics["w2_ratio"])
    samples = np.load(tmp_path / "a" / "samples.npy")
    assert samples.shape == (1000, 2)
    for fig in ("samples.png", "field.png", "trajectories.png", "sampling.gif", "loss.png"):
        assert (tmp_path / "a" / fig).stat().st_size > 0
    # Same seed, same samples: train again briefly and compare with a first short run.
    short = dict(TINY, train_steps=50)
    model_a, _ = fm.train(fm.Config(**short), fm.moons(500, 0), jax.random.key(3))
    model_b, _ = fm.train(fm.Config(**short), fm.moons(500, 0), jax.random.key(3))
    x0 = jnp.asarray(fm.base_noise(64, "iid", 0))
    np.testing.assert_array_equal(
        fm.integrate(model_a, x0, 4, "heun"), fm.integrate(model_b, x0, 4, "heun")
    )
