"""Tests for tasks/diffusion.py: the schedule, the forward process against its closed form, the
sampler's equivalence with DDPM, and a tiny run that must learn."""

import dataclasses
import json

import diffusion as dd
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# A tiny config, about 25 s on 2 cores.
TINY = dict(
    train_steps=3000,
    batch_size=256,
    hidden=128,
    num_train=4000,
    num_timesteps=100,
    sample_steps=25,
    num_samples=1000,
)
# Calibrated over seeds 0, 1, 2: w2_ratio 1.87, 1.97, 1.90 (an untrained model scores about 1600);
# the bar leaves a margin of about 0.3.
BAR = 2.3


def test_dd_schedule_reaches_noise():
    for num_timesteps in (25, 50, 100, 1000):
        alpha_bars = np.asarray(dd.make_schedule(num_timesteps)["alpha_bars"])
        assert alpha_bars[-1] < 1e-3, (num_timesteps, alpha_bars[-1])  # x_T is really noise
        assert np.all(np.diff(alpha_bars) < 0) and alpha_bars[0] > 0.99
    # Ho et al.'s unscaled betas cut to T = 100 would not get there: abar_T = 0.36.
    assert np.prod(1 - np.linspace(1e-4, 0.02, 100)) > 0.3


def test_dd_q_sample_matches_closed_form():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps has mean sqrt(abar) x0, variance 1 - abar."""
    schedule = dd.make_schedule(100)
    n, x0 = 200_000, jnp.array([[1.5, -0.5]])
    for t in (0, 30, 99):
        eps = jax.random.normal(jax.random.key(t), (n, 2))
        x_t = dd.q_sample(schedule, jnp.repeat(x0, n, 0), jnp.full((n,), t), eps)
        ab = float(schedule["alpha_bars"][t])
        np.testing.assert_allclose(x_t.mean(0), np.sqrt(ab) * x0[0], atol=5e-3)
        np.testing.assert_allclose(x_t.var(0), 1 - ab, atol=5e-3, rtol=1e-2)


def test_dd_eta_one_over_all_steps_is_ddpm():
    """With eta = 1 on every step, sigma^2 is DDPM's posterior variance
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, and the mean is DDPM's posterior mean."""
    schedule = dd.make_schedule(100)
    betas = np.asarray(schedule["betas"], dtype=np.float64)
    ab = np.asarray(schedule["alpha_bars"], dtype=np.float64)
    tau, ab_t, ab_prev, sigma = dd.sampling_coefficients(ab, 100, eta=1.0)
    np.testing.assert_array_equal(tau, np.arange(100)[::-1])
    t = tau[:-1]  # every step but the last, where abar_prev = 1 and sigma = 0
    beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    # (the schedule is float32, so 1 - abar_t / abar_{t-1} matches beta_t to about 1e-4 relative)
    np.testing.assert_allclose(sigma[:-1] ** 2, beta_tilde, rtol=2e-3)
    assert sigma[-1] == 0
    # Posterior mean: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), Eq. 11.
    x, eps, k = 0.7, -0.3, 40
    i = list(tau).index(k)
    x0_hat = (x - np.sqrt(1 - ab_t[i]) * eps) / np.sqrt(ab_t[i])
    ours = np.sqrt(ab_prev[i]) * x0_hat + np.sqrt(1 - ab_prev[i] - sigma[i] ** 2) * eps
    paper = (x - betas[k] / np.sqrt(1 - ab[k]) * eps) / np.sqrt(1 - betas[k])
    assert ours == pytest.approx(paper, rel=1e-4)
    # And eta = 0 is deterministic.
    assert np.all(dd.sampling_coefficients(ab, 10, eta=0.0)[3] == 0)


class _PointMassEps(nnx.Module):
    """The exact noise predictor when all data sit at the point m:
    eps(x_t, t) = (x_t - sqrt(abar_t) m) / sqrt(1 - abar_t)."""

    def __init__(self, alpha_bars, m):
        self.alpha_bars, self.m = nnx.Variable(alpha_bars), nnx.Variable(m)

    def __call__(self, x, t_frac):
        t = jnp.round(t_frac * self.alpha_bars.shape[0]).astype(int)
        ab = self.alpha_bars[t][:, None]
        return (x - jnp.sqrt(ab) * self.m) / jnp.sqrt(1 - ab)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "ddpm"])
def test_dd_samplers_land_on_a_point_mass(sampler):
    """With the exact eps of a point mass, every sampler must end exactly on the point."""
    schedule = dd.make_schedule(100)
    m = jnp.array([0.5, -1.0])
    model = _PointMassEps(schedule["alpha_bars"], m)
    x_T = jnp.asarray(dd.base_noise(256, "iid", 0))
    path = dd.sample(model, schedule, x_T, jax.random.key(0), 20, sampler)
    assert path.shape == (21, 256, 2)
    np.testing.assert_allclose(path[-1], jnp.broadcast_to(m, (256, 2)), atol=1e-3)
    assert dd.nfe(sampler, 20) == (39 if sampler == "heun" else 20)


@pytest.mark.parametrize(
    "change",
    [
        dict(train_steps=0),
        dict(hidden=-4),
        dict(sampler="euler"),
        dict(noise="uniform"),
        dict(num_timesteps=10),
        dict(sample_steps=500),
        dict(out_dir="/proc/not_writable"),
    ],
)
def test_dd_bad_config_raises(change, tmp_path):
    cfg = dd.Config(out_dir=str(tmp_path), **TINY)
    with pytest.raises(ValueError):
        dd.validate(dataclasses.replace(cfg, **change))


def test_dd_tiny_run_learns_and_is_deterministic(tmp_path):
    metrics = dd.main(dd.Config(out_dir=str(tmp_path / "a"), **TINY))
    assert metrics["w2_ratio"] < BAR, metrics["w2_ratio"]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["alpha_bar_T"] < 1e-3
    assert np.load(tmp_path / "a" / "samples.npy").shape == (1000, 2)
    for fig in ("forward.png", "reverse.png", "samples.png", "loss.png", "w2_vs_steps.png"):
        assert (tmp_path / "a" / fig).stat().st_size > 0
    # Same seed, same samples (a short training run twice).
    short = dd.Config(**dict(TINY, train_steps=50))
    a, _ = dd.train(short, dd.moons(500, 0), jax.random.key(3))
    b, _ = dd.train(short, dd.moons(500, 0), jax.random.key(3))
    schedule = dd.make_schedule(short.num_timesteps)
    x_T = dd.base_noise(64, "iid", 0)
    np.testing.assert_array_equal(
        dd.sample(a, schedule, x_T, jax.random.key(1), 10, "ddpm"),
        dd.sample(b, schedule, x_T, jax.random.key(1), 10, "ddpm"),
    )
