"""DDPM on two moons: learn to undo Gaussian noise, one small step at a time.

What it teaches: a diffusion model (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic
Models"): noise the data over T steps, learn to predict the noise, and sample by running the
process backwards; DDIM (Song et al. 2021) and Heun's method on DDIM's ODE (Karras et al. 2022)
sample the same model deterministically in fewer steps. Metric: the exact 2-Wasserstein distance
between 2000 samples and 2000 fresh moons, over that between two fresh sets of moons.

    python tasks/diffusion.py
    python tasks/diffusion.py --help
    python tasks/diffusion.py --preset paper   # Ho et al.'s schedule: T = 1000

Expected at defaults: w2_ratio 1.108, 1.133, 1.036 for seeds 0, 1, 2 (bar: <= 1.2), Heun in 50
steps (99 NFE) from Sobol noise; alpha_bar_T = 2.0e-5 (bar: < 1e-3). Runtime (bar: 90 s), results
and the samplers' study (ancestral DDPM, 100 steps: 1.45 to 1.71): docs/diffusion.md. Differences
from the paper: T = 100, betas rescaled; an MLP, not a U-Net; two moons, normalised for training.
"""

# %% [markdown]
# ## Imports and helpers (the helpers are the same in every task; a test compares the copies)
# %%
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import norm, qmc
from sklearn.datasets import make_moons
from tqdm.auto import tqdm

SAMPLERS = {"ddpm": 1.0, "ddim": 0.0, "heun": 0.0}  # sampler -> eta (heun is deterministic)
NOISES = ("sobol", "iid")


def option_error(name: str, value, allowed: str) -> ValueError:
    """The one-line message for a bad option, spelled as on the command line."""
    return ValueError(f"--{name.replace('_', '-')} {value}: {allowed}")


def check_number(cfg, name: str, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Raise unless cfg.<name> is finite and in the range (NaN and inf never are)."""
    value, show = getattr(cfg, name), lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and (value < high if high_open else value <= high)):
        parts = [] if low == -math.inf else [f"{'>' if low_open else '>='} {show(low)}"]
        parts += [] if high == math.inf else [f"{'<' if high_open else '<='} {show(high)}"]
        raise option_error(name, value, "must be a finite number " + " and ".join(parts))


def check_out_dir(out_dir: str) -> None:
    """Raise unless out_dir is new, empty or an earlier run's folder (a run replaces it whole)."""
    path = pathlib.Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise option_error("out_dir", out_dir, "is a file; give a folder to write the run into")
    is_run = (path / "config.json").exists() or (path / "metrics.json").exists()
    if path.is_dir() and any(path.iterdir()) and not is_run:
        raise option_error("out_dir", out_dir, "holds other files; give an empty or a run's folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path.parent).cleanup()
    except OSError as err:
        raise option_error("out_dir", out_dir, f"cannot be written ({err.strerror})") from None


@contextlib.contextmanager
def staged_run(out_dir: str):
    """Yield a fresh folder for the run; only on success does it replace out_dir, whole."""
    final = pathlib.Path(out_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if (final / "study").is_dir():  # a study's outputs (studies/) are not this run's to drop
        os.replace(final / "study", stage / "study")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def write_metrics(out: pathlib.Path, cfg, metrics: dict) -> None:
    """config.json, then metrics.json last and atomically, as strict JSON (no NaN or Infinity)."""
    metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # numpy
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"metrics {bad} are not finite; the run diverged")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, allow_nan=False))
    os.replace(tmp, out / "metrics.json")


def save_figure(fig, path) -> None:
    """Save a figure into the run's folder and close it; in a notebook, also show it inline."""
    fig.savefig(path, dpi=120)
    if "ipykernel" in sys.modules:
        from IPython.display import display

        display(fig)
    plt.close(fig)


class PhaseTimer:
    """Seconds per phase ("setup", "train", "evaluate", "figures") for metrics' `time_split_s`:
    `lap(phase)` ends a phase (a phase lapped twice adds up) and returns the total so far."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.split: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        self.split[phase] = round(self.split.get(phase, 0.0) + now - self.last, 3)
        self.last = now
        return now - self.start


def cli_config(args: list[str] | None = None) -> "Config":
    """Flags to a Config: `--preset NAME` picks the defaults (PRESETS), other flags override them;
    in a notebook the flags come from $TOY_EXAMPLES_ARGS, not from the kernel's argv."""
    if args is None:
        in_kernel = "ipykernel" in sys.modules
        args = shlex.split(os.environ.get("TOY_EXAMPLES_ARGS", "")) if in_kernel else sys.argv[1:]
    flags = [f"{a}={b}" if a == "--preset" else a for a, b in zip(args, args[1:] + [""])]
    name = ([f.split("=", 1)[1] for f in flags if f.startswith("--preset=")] or ["cpu"])[-1]
    return tyro.cli(Config, default=PRESETS.get(name, PRESETS["cpu"]), args=args)


def run_cli() -> dict:
    """Command line: a bad option exits 2 before any work; missing data or divergence exits 1."""
    cfg = cli_config()
    try:
        validate(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return main(cfg)
    except (FloatingPointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def device_info() -> dict:
    """Where the run ran, for metrics.json: JAX's backend, the device kind, how many devices."""
    devices = jax.devices()
    kind = f"{jax.default_backend()}:{devices[0].device_kind}"
    return {"device": kind, "num_devices": len(devices)}


# %% [markdown]
# ## Config
# The defaults are the 2-core CPU run; `PRESETS["paper"]` is the DDPM schedule with T = 1000.
# %%
@dataclass(frozen=True)
class Config:
    preset: Literal["cpu", "paper"] = "cpu"  # cpu (2 cores) or paper (T = 1000); flags override it
    seed: int = 0  # Random seed for data, initialisation, training and sampling.
    out_dir: str = "runs/diffusion"  # Folder for metrics.json, samples.npy and the figures.
    num_timesteps: int = 100  # T, the diffusion steps (25..1000); betas rescaled: abar_T ~ e^-10
    train_steps: int = 10000  # Optimizer steps. Each draws a fresh batch of (x_0, t, eps).
    batch_size: int = 512  # Examples per step.
    hidden: int = 128  # Width of each hidden layer of the MLP eps(x, t).
    depth: int = 3  # Number of hidden layers.
    learning_rate: float = 3e-3  # Peak Adam learning rate; it decays to zero by a cosine schedule.
    num_train: int = 20_000  # Size of the fixed training set (evaluation uses fresh moons).
    sampler: Literal["heun", "ddim", "ddpm"] = "heun"  # heun (order 2), ddim (eta 0), ddpm (eta 1)
    sample_steps: int = 50  # Reverse steps (2..T), a subsequence of the T (ddpm at T: the paper's)
    noise: Literal["sobol", "iid"] = "sobol"  # Starting noise x_T: sobol (evenly spread) or iid.
    num_samples: int = 2000  # Samples written to samples.npy and compared with fresh moons.


PRESETS: dict[str, Config] = {"cpu": Config(), "paper": Config("paper", num_timesteps=1000)}


def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    check_number(cfg, "seed", 0, 2**32, high_open=True)  # numpy's seeds are 0 .. 2**32 - 1
    for name in ("train_steps", "batch_size", "hidden", "depth"):
        check_number(cfg, name, 1)
    check_number(cfg, "num_train", 2)  # the data are normalised by their standard deviation
    check_number(cfg, "num_samples", 2, 10_000)  # the exact W2 costs n^2 memory and n^3 time
    check_number(cfg, "num_timesteps", 25, 1000)  # the rescaled beta_T = 20 / T stays below 1
    check_number(cfg, "sample_steps", 2, cfg.num_timesteps)  # a subsequence with t = T and t = 1
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    for name, allowed in (("sampler", SAMPLERS), ("noise", NOISES), ("preset", PRESETS)):
        if getattr(cfg, name) not in allowed:
            raise option_error(name, getattr(cfg, name), f"choose one of {', '.join(allowed)}")
    check_out_dir(cfg.out_dir)


# %% [markdown]
# ## Data and the forward process
# `make_moons` is stratified (half its points a moon, evenly spaced angles), so deterministic
# samplers start from evenly spread (Sobol) noise. The forward process adds noise of variance
# $\beta_t$ at step $t$; in closed form, with $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$,
# $$q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1 - \bar\alpha_t) I).$$
# It must reach noise, $\bar\alpha_T \approx 0$, or sampling starts where the model never trained.
# Ho et al.'s betas ($10^{-4}$ to $0.02$, for $T = 1000$) leave $\bar\alpha_T = 0.36$ at $T = 100$;
# scaled by $1000 / T$ (Nichol & Dhariwal 2021), $\bar\alpha_T \approx e^{-10}$ at any $T$.
# %%
def moons(n: int, seed: int) -> np.ndarray:
    """Two moons in sklearn's original coordinates, shape (n, 2)."""
    return make_moons(n_samples=n, noise=0.1, random_state=seed)[0].astype(np.float32)


def base_noise(n: int, kind: str, seed: int) -> np.ndarray:
    """x_T ~ N(0, I), shape (n, 2): "sobol" (quasi-Monte Carlo, evenly spread) or "iid"."""
    if kind == "iid":
        return np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)
    u = qmc.Sobol(2, scramble=True, seed=seed).random_base2(int(np.ceil(np.log2(n))))[:n]
    return norm.ppf(u).astype(np.float32)


def make_schedule(num_timesteps: int) -> dict[str, jax.Array]:
    """Ho et al.'s linear betas, rescaled by 1000 / T so that abar_T ~ e^-10 at any T."""
    scale = 1000.0 / num_timesteps  # 1 at T = 1000: exactly Ho et al.'s betas
    betas = jnp.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
    alpha_bars = jnp.cumprod(1.0 - betas)  # abar_t for t = 1..T (index t - 1)
    return {"betas": betas, "alpha_bars": alpha_bars}


def q_sample(schedule, x0, t, eps):
    """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for integer steps t in 0..T-1."""
    ab = schedule["alpha_bars"][t][:, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


# %% [markdown]
# ## Model, loss and training
# An MLP $\epsilon_\theta(x_t, t)$ learns the noise that was added (the "simple" loss, Eq. 14):
# $$\mathcal L(\theta) = \mathbb E_{t, x_0, \epsilon} \big\| \epsilon - \epsilon_\theta\big(
#   \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon,\ t\big) \big\|^2 .$$
# Adam with cosine decay; fresh batches; jitted `lax.scan` chunks (between them: log, stop on NaN).
# %%
class NoiseMLP(nnx.Module):
    """eps(x, t): an MLP on [x, sinusoidal features of t / T at a few frequencies]."""

    def __init__(self, hidden: int, depth: int, rngs: nnx.Rngs, num_freqs: int = 4):
        self.freqs = 2.0 ** jnp.arange(num_freqs) * jnp.pi  # low frequencies keep eps smooth in t
        sizes = [2 + 2 * num_freqs] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x, t_frac):  # x: (batch, 2), t_frac = t / T in [0, 1): (batch,)
        angles = t_frac[:, None] * self.freqs  # (batch, num_freqs)
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        for layer in self.layers:
            h = nnx.silu(layer(h))
        return self.out(h)  # (batch, 2)


def train(cfg: Config, data: np.ndarray, key: jax.Array, num_chunks: int = 20):
    """Train eps(x, t); returns the model, the per-step losses, and steps/s after compilation."""
    key, init_key = jax.random.split(key)
    graphdef, params = nnx.split(NoiseMLP(cfg.hidden, cfg.depth, nnx.Rngs(init_key)))
    optimizer = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.train_steps))
    schedule, data, T = make_schedule(cfg.num_timesteps), jnp.asarray(data), cfg.num_timesteps

    def loss_fn(params, key):  # the simple loss (Eq. 14) on a fresh batch
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (cfg.batch_size,), 0, data.shape[0])]  # (batch, 2)
        t = jax.random.randint(k_t, (cfg.batch_size,), 0, T)
        eps = jax.random.normal(k_eps, x0.shape)
        eps_hat = nnx.merge(graphdef, params)(q_sample(schedule, x0, t, eps), t / T)
        return jnp.mean(jnp.sum((eps - eps_hat) ** 2, axis=-1))  # the target is the noise

    def step(carry, key):  # one Adam step, the body of a lax.scan
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    run_chunk = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys))
    carry, losses = (params, optimizer.init(params)), []
    keys = jax.random.split(key, cfg.train_steps)
    bounds = np.unique(np.linspace(0, cfg.train_steps, num_chunks + 1).astype(int))
    times = [time.perf_counter()]
    for i, (a, b) in enumerate(tqdm(list(zip(bounds[:-1], bounds[1:])), disable=None)):
        carry, chunk = run_chunk(carry, keys[a:b])
        losses.append(np.asarray(chunk))  # waits for the chunk: the timing is honest
        times.append(time.perf_counter())
        if not np.isfinite(losses[-1]).all():
            bad = int(np.argmin(np.isfinite(losses[-1])))
            msg = f"training diverged at step {a + bad + 1}: loss is {losses[-1][bad]}"
            raise FloatingPointError(msg + "; try a smaller --learning-rate")
        if i % 5 == 0 or i == num_chunks - 1:
            print(f"step={b} loss={losses[-1].mean():.4f}", flush=True)
    # steps/s after the first chunk, which compiles; a single chunk can only be timed with it
    first, timed = len(losses[0]), cfg.train_steps - len(losses[0])
    steps_per_s = timed / (times[-1] - times[1]) if timed else first / (times[1] - times[0])
    return nnx.merge(graphdef, carry[0]), np.concatenate(losses), steps_per_s


# %% [markdown]
# ## Sampling: DDPM, DDIM and Heun
# One update covers DDPM and DDIM (Song et al. 2021). On a subsequence $\tau$ of the steps, with
# $\hat\epsilon = \epsilon_\theta(x_t, t)$ and $\bar\alpha'$ the next step's $\bar\alpha$:
# $$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}}, \quad
#   x' = \sqrt{\bar\alpha'}\,\hat x_0 + \sqrt{1 - \bar\alpha' - \sigma^2}\,\hat\epsilon + \sigma z,
#   \; \sigma^2 = \eta^2 (1 - \bar\alpha')(1 - \bar\alpha_t / \bar\alpha') / (1 - \bar\alpha_t).$$
# $\eta = 1$ over all $T$ steps is exactly DDPM's ancestral sampler ($\sigma^2 = \tilde\beta_t$);
# $\eta = 0$ is DDIM, Euler's method on the probability-flow ODE $dy/ds = \epsilon(x, t)$ in
# $y = x / \sqrt{\bar\alpha}$, $s = \sqrt{(1 - \bar\alpha) / \bar\alpha}$: first order, so DDIM
# needs about twice the steps of Heun's method on the same ODE, which is second order.
# %%
def sampling_coefficients(alpha_bars: np.ndarray, steps: int, eta: float):
    """t, abar_t, abar_prev (1 at the end) and sigma for each step of tau, `steps` of the T."""
    tau = np.round(np.linspace(0, len(alpha_bars) - 1, steps)).astype(int)[::-1]  # T-1 ... 0
    ab_t, ab_prev = alpha_bars[tau], np.append(alpha_bars[tau[1:]], 1.0)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t)) * np.sqrt(1 - ab_t / ab_prev)
    return tau, ab_t, ab_prev, sigma


@nnx.jit(static_argnames=("num_timesteps", "heun"))
def reverse_process(model, x_T, inputs, num_timesteps: int, heun: bool):
    """Reverse steps from x_T along tau; returns the path, shape (steps + 1, batch, 2)."""
    eps = lambda x, t: model(x, jnp.full((x.shape[0],), t / num_timesteps))

    def ddpm_step(x, inputs):  # DDPM (eta = 1) or DDIM (eta = 0): the update above
        t, ab, _, ab_prev, sigma, key = inputs
        eps_hat = eps(x, t)
        x0_hat = (x - jnp.sqrt(1 - ab) * eps_hat) / jnp.sqrt(ab)
        direction = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps_hat
        x = jnp.sqrt(ab_prev) * x0_hat + direction + sigma * jax.random.normal(key, x.shape)
        return x, x

    def heun_step(x, inputs):  # Karras et al. 2022, Alg. 1: 2 NFE a step, 1 on the last (s = 0)
        t, ab, t_prev, ab_prev, _, _ = inputs
        s, s_prev = jnp.sqrt((1 - ab) / ab), jnp.sqrt((1 - ab_prev) / ab_prev)
        y, d1 = x / jnp.sqrt(ab), eps(x, t)  # in y = x / sqrt(abar), dy/ds = eps
        y_euler = y + (s_prev - s) * d1  # exactly DDIM's step
        d2 = eps(y_euler * jnp.sqrt(ab_prev), t_prev)
        y = jnp.where(t_prev >= 0, y + (s_prev - s) * 0.5 * (d1 + d2), y_euler)
        x = y * jnp.sqrt(ab_prev)
        return x, x

    _, path = jax.lax.scan(heun_step if heun else ddpm_step, x_T, inputs)
    return jnp.concatenate([x_T[None], path])


def sample(model, schedule, x_T, key, steps: int, sampler: str) -> jax.Array:
    """DDPM (eta = 1), DDIM (eta = 0) or Heun in `steps` reverse steps; returns the path."""
    alpha_bars = np.asarray(schedule["alpha_bars"], dtype=np.float64)
    tau, ab_t, ab_prev, sigma = sampling_coefficients(alpha_bars, steps, SAMPLERS[sampler])
    t_prev = np.append(tau[1:], -1)  # Heun needs t at both ends of a step (-1: past the last)
    inputs = [jnp.asarray(a, jnp.float32) for a in (tau, ab_t, t_prev, ab_prev, sigma)]
    inputs = (*inputs, jax.random.split(key, steps))
    return reverse_process(model, jnp.asarray(x_T), inputs, len(alpha_bars), sampler == "heun")


# %% [markdown]
# ## Evaluate and draw
# $W_2 = \sqrt{\min_\pi \frac1n \sum_i \|a_i - b_{\pi(i)}\|^2}$, exactly, over the floor (two fresh
# sets of moons). `samples.png` shows the samples and their reverse paths; the paper's sampler
# (ancestral DDPM over all $T$ steps) and the other figures are in `studies/diffusion_samplers.py`.
# %%
def w2_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2 between equal-size point clouds, by the optimal assignment."""
    cost = cdist(a, b, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def w2_floor(n: int, seed: int, draws: int = 5) -> float:
    """W2 between two sets of n fresh moons, averaged over draws: a perfect model's distance."""
    base = 1_000_003 * (seed + 1)
    pairs = [(moons(n, base + 2 * i), moons(n, base + 2 * i + 1)) for i in range(draws)]
    return float(np.mean([w2_distance(a, b) for a, b in pairs]))


def evaluate(cfg: Config, model, schedule, key, mu, sd):
    """The W2 ratio of cfg.sampler, and alpha_bar_T; returns the path, fresh moons, metrics."""
    x_T = base_noise(cfg.num_samples, cfg.noise, cfg.seed)
    path = np.asarray(sample(model, schedule, x_T, key, cfg.sample_steps, cfg.sampler)) * sd + mu
    if not np.isfinite(path[-1]).all():  # W2's assignment would fail on it
        raise FloatingPointError(f"sampling diverged ({cfg.sampler}, {cfg.sample_steps} steps)")
    fresh = moons(cfg.num_samples, 7_919 * (cfg.seed + 1))  # never seen in training
    floor, w2 = w2_floor(cfg.num_samples, cfg.seed), w2_distance(path[-1], fresh)
    nfe = 2 * cfg.sample_steps - 1 if cfg.sampler == "heun" else cfg.sample_steps
    metrics = dict(w2=w2, w2_floor=floor, w2_ratio=w2 / floor, w2_ratio_ceiling=1.2)
    metrics |= dict(sampler=cfg.sampler, noise=cfg.noise, nfe=nfe)
    metrics |= dict(alpha_bar_T=float(schedule["alpha_bars"][-1]), alpha_bar_T_ceiling=1e-3)
    return path, fresh, metrics


def plot_all(out, data, path, cfg, n: int = 200) -> None:
    """The README figure (legible at 480 px): samples over the data; n particles' reverse paths."""
    with plt.rc_context({"font.size": 15}):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
        axes[0].scatter(data[:, 0], data[:, 1], s=4, color="grey", alpha=0.4)
        axes[0].scatter(path[-1, :, 0], path[-1, :, 1], s=4, color="tab:orange", alpha=0.5)
        axes[0].set(title=f"samples ({cfg.sampler}, {cfg.sample_steps} steps)", xlim=(-1.6, 2.6))
        axes[0].set_ylim(-1.2, 1.7)
        axes[1].plot(path[:, :n, 0], path[:, :n, 1], color="tab:blue", lw=0.8, alpha=0.3)
        axes[1].scatter(path[0, :n, 0], path[0, :n, 1], s=10, color="black", label="noise")
        axes[1].scatter(path[-1, :n, 0], path[-1, :n, 1], s=10, color="tab:orange", label="sample")
        axes[1].set(title="the reverse process", xlim=(-2.5, 3.5), ylim=(-1.7, 2.2))
        axes[1].legend(loc="lower left", fontsize=11, markerscale=2)
        plt.setp(axes, xlabel="x1", ylabel="x2", aspect="equal")
        fig.tight_layout()
        save_figure(fig, out / "samples.png")


# %% [markdown]
# ## Main
# Train in normalised coordinates (where noise and data have the same scale), evaluate, draw.
# %%
def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    train_key, sample_key = jax.random.split(jax.random.key(cfg.seed))
    data = moons(cfg.num_train, cfg.seed)
    mu, sd = data.mean(axis=0), data.std(axis=0)
    schedule = make_schedule(cfg.num_timesteps)
    timer.lap("setup")  # the model is built, and compiled, in train's first chunk
    model, losses, steps_per_s = train(cfg, (data - mu) / sd, train_key)
    timer.lap("train")
    path, fresh, results = evaluate(cfg, model, schedule, sample_key, mu, sd)
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:  # out_dir is replaced whole, only if all of this works
        plot_all(out, fresh, path, cfg)
        np.save(out / "samples.npy", path[-1].astype(np.float32))
        wall_time_s = timer.lap("figures")
        metrics = {"task": "diffusion", "seed": cfg.seed, "preset": cfg.preset, **results}
        metrics |= {k: getattr(cfg, k) for k in ("num_timesteps", "train_steps", "batch_size")}
        metrics["train_examples_seen"] = cfg.train_steps * cfg.batch_size
        metrics["final_loss"] = float(losses[-len(losses) // 20 :].mean())
        metrics |= {**device_info(), "throughput": float(steps_per_s), "throughput_unit": "steps/s"}
        metrics |= dict(wall_time_s=wall_time_s, wall_time_s_ceiling=90, time_split_s=timer.split)
        write_metrics(out, cfg, metrics)  # config.json, then metrics.json last
    print(" ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float)))
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
