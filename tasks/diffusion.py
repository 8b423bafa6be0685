"""DDPM on two moons: learn to undo Gaussian noise, one small step at a time.

The idea (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"): a fixed forward
process adds noise over T steps with variances beta_t,

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),     abar_t = prod_{s<=t} (1 - beta_s),

so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I). A network eps_theta(x_t, t)
learns to predict the noise that was added (the "simple" loss, Eq. 14 of the paper):

    L(theta) = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2.

Sampling runs the process backwards from x_T ~ N(0, I). Ancestral (DDPM) sampling draws
x_{t-1} ~ N(mu_theta(x_t, t), beta~_t I) at every one of the T steps. DDIM (Song, Meng, Ermon 2021)
writes the same marginals as a family with a noise scale eta; eta = 0 is a deterministic ODE-like
sampler that can skip steps. One function below does both: on a subsequence tau of the steps,

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev),

and eta = 1 over all T steps is exactly DDPM's ancestral sampler (sigma^2 = beta~_t). With eta = 0,
DDIM's step is Euler's method on an ODE (the probability-flow ODE, in the variables
y = x / sqrt(abar), s = sqrt((1 - abar) / abar): dy/ds = eps(x, t)). Euler is first order, and on
two moons 100 DDIM steps are still visibly off; Heun's method on the same ODE (Karras et al. 2022)
is second order and converges in about 25 steps, as the run's W2-against-NFE figure shows.

The schedule must really reach noise at step T: abar_T ~ 0, or sampling starts from a
distribution the model never saw. Ho et al.'s linear betas (1e-4 to 0.02) were meant for T = 1000;
cut to T = 100 they leave abar_T = 0.36. We scale them by 1000 / T, so the sum of betas stays about
10 and abar_T is about e^-10 for any T (this is the scaling of Nichol & Dhariwal 2021).

Metric: the exact 2-Wasserstein distance (optimal assignment) between 2000 samples and 2000 fresh
moons, over the floor between two fresh sets. As flow_matching.py explains, make_moons is
stratified, so an i.i.d. sampler, even a perfect one, scores about 1.35 against that floor. The
deterministic samplers (DDIM, Heun) can start from evenly spread (Sobol) noise and carry that
evenness onto the moons; ancestral sampling injects fresh noise at every step and cannot. So the
headline uses Heun, and the run reports ancestral sampling and the perfect i.i.d. sampler beside it.

    python tasks/diffusion.py
    python tasks/diffusion.py --help
    python tasks/diffusion.py --preset paper   # Ho et al.'s schedule: T = 1000, betas 1e-4..0.02

Expected at defaults (2-core CPU, about 60 s of CPU time including compilation and evaluation):
w2_ratio 1.108, 1.133, 1.036 for seeds 0, 1, 2 (bar: <= 1.2) with Heun in 50 steps (99 NFE) from
Sobol noise; ancestral DDPM in 100 steps scores 1.45 to 1.71, beside a perfect i.i.d. sampler's
1.34 to 1.46. abar_T = 2.0e-5.
Differences from the paper: T = 100 instead of 1000, with the betas rescaled; an MLP instead of a
U-Net; the data are normalised to unit variance for training and mapped back for the samples.
Outputs in runs/diffusion/: metrics.json, config.json, samples.npy, forward.png, reverse.png,
samples.png, w2_vs_steps.png, loss.png. metrics.json also records the device, the preset and the
training throughput (steps/s, compilation excluded).

The `paper` preset is the DDPM schedule itself: T = 1000 with Ho et al.'s linear betas from 1e-4 to
0.02 (our 1000 / T rescaling is exactly 1 there, so no other schedule is needed). The model, the
training and the headline sampler stay as in the default; the paper's own sampler, ancestral over
all 1000 steps, is reported beside it (w2_ratio_ddpm_ancestral). It has not been run to the end
here, only smoke-tested for a few steps.
"""

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
import typing
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import norm, qmc
from sklearn.datasets import make_moons
from tqdm import tqdm

Sampler = Literal["heun", "ddim", "ddpm"]
Noise = Literal["sobol", "iid"]
SAMPLERS = {"ddpm": 1.0, "ddim": 0.0, "heun": 0.0}  # sampler -> eta (heun is deterministic)
NOISES = typing.get_args(Noise)
MAX_SAMPLES = 10_000  # the exact W2 assignment costs n^2 memory and about n^3 time


# %% ---------------------------------------------------------------- helpers
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
    """Raise unless out_dir is a new or empty folder, or an earlier run's, that can be written.
    The run replaces it whole, so a folder holding anything else is refused."""
    path = pathlib.Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise option_error("out_dir", out_dir, "is a file; give a folder to write the run into")
    is_run = (path / "config.json").exists() or (path / "metrics.json").exists()
    if path.is_dir() and any(path.iterdir()) and not is_run:
        raise option_error(
            "out_dir", out_dir, "holds other files; give a new or empty folder, or a run's folder"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path.parent).cleanup()
    except OSError as err:
        raise option_error("out_dir", out_dir, f"cannot be written ({err.strerror})") from None


@contextlib.contextmanager
def staged_run(out_dir: str):
    """Yield a fresh folder to write a run into; on success it replaces out_dir whole, so a failed
    or killed run leaves the previous results as they were, never a mix of two runs."""
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


def cli_config(args: list[str] | None = None) -> "Config":
    """Parse the command line: `--preset NAME` picks the defaults from PRESETS, and any other flag
    overrides them. In a notebook the flags come from $TOY_EXAMPLES_ARGS, not the kernel's argv."""
    if args is None:
        in_kernel = "ipykernel" in sys.modules
        args = shlex.split(os.environ.get("TOY_EXAMPLES_ARGS", "")) if in_kernel else sys.argv[1:]
    flags = [f"{a}={b}" if a == "--preset" else a for a, b in zip(args, args[1:] + [""])]
    name = ([f.split("=", 1)[1] for f in flags if f.startswith("--preset=")] or ["cpu"])[-1]
    return tyro.cli(Config, default=PRESETS.get(name, PRESETS["cpu"]), args=args)


def run_cli() -> dict:
    """`python tasks/<task>.py [flags]`: a bad option prints one line and exits 2 before any work;
    missing or corrupt data, or a diverged run, prints one line and exits 1."""
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
    return {
        "device": f"{jax.default_backend()}:{devices[0].device_kind}",
        "num_devices": len(devices),
    }


# %% ---------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    preset: Literal["cpu", "paper"] = "cpu"
    """cpu (the 2-core run) or paper (Ho et al.'s DDPM schedule: T = 1000, betas 1e-4..0.02).
    Flags given on the command line override the preset's values."""
    seed: int = 0
    """Random seed for data, initialisation, training and sampling."""
    out_dir: str = "runs/diffusion"
    """Folder for metrics.json, samples.npy and the figures."""
    num_timesteps: int = 100
    """T, the diffusion steps (25..1000); the betas are rescaled so that abar_T ~ e^-10."""
    train_steps: int = 10000
    """Optimizer steps. Each draws a fresh batch of (x_0, t, eps)."""
    batch_size: int = 512
    """Examples per step."""
    hidden: int = 128
    """Width of each hidden layer of the MLP eps(x, t)."""
    depth: int = 3
    """Number of hidden layers."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate; it decays to zero by a cosine schedule."""
    num_train: int = 20_000
    """Size of the fixed training set of moons (evaluation always uses fresh moons)."""
    sampler: Sampler = "heun"
    """heun (DDIM's ODE, second order), ddim (deterministic, eta = 0) or ddpm (ancestral)."""
    sample_steps: int = 50
    """Reverse steps (2..T), a subsequence of the T steps (ddpm with T steps is the paper's)."""
    noise: Noise = "sobol"
    """Starting noise x_T: sobol (quasi-random, evenly spread) or iid (plain draws)."""
    num_samples: int = 2000
    """Samples written to samples.npy and compared with fresh moons."""


PRESETS: dict[str, Config] = {
    "cpu": Config(),
    "paper": Config(preset="paper", num_timesteps=1000),
}


def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    check_number(cfg, "seed", 0, 2**32, high_open=True)  # numpy's seeds are 0 .. 2**32 - 1
    for name in ("train_steps", "batch_size", "hidden", "depth"):
        check_number(cfg, name, 1)
    check_number(cfg, "num_train", 2)  # the data are normalised by their standard deviation
    check_number(cfg, "num_samples", 2, MAX_SAMPLES)
    # the rescaled beta_T = 20 / T must stay well below 1
    check_number(cfg, "num_timesteps", 25, 1000)
    # 2 at least: the reverse steps run from t = T down to t = 1, so both ends are on the grid
    check_number(cfg, "sample_steps", 2)
    if cfg.sample_steps > cfg.num_timesteps:
        raise option_error(
            "sample_steps",
            cfg.sample_steps,
            f"cannot exceed --num-timesteps ({cfg.num_timesteps}): a subsequence of the T steps",
        )
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    if cfg.sampler not in SAMPLERS:
        raise option_error("sampler", cfg.sampler, f"choose one of {', '.join(SAMPLERS)}")
    if cfg.noise not in NOISES:
        raise option_error("noise", cfg.noise, f"choose one of {', '.join(NOISES)}")
    if cfg.preset not in PRESETS:
        raise option_error("preset", cfg.preset, f"choose one of {', '.join(PRESETS)}")
    check_out_dir(cfg.out_dir)


# %% ---------------------------------------------------------------- data
def moons(n: int, seed: int) -> np.ndarray:
    """Two moons in sklearn's original coordinates, shape (n, 2)."""
    return make_moons(n_samples=n, noise=0.1, random_state=seed)[0].astype(np.float32)


def iid_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Independent draws from the distribution that make_moons samples in a stratified way."""
    moon, angle = rng.integers(0, 2, n), rng.uniform(0, np.pi, n)
    x = np.where(moon == 0, np.cos(angle), 1 - np.cos(angle))
    y = np.where(moon == 0, np.sin(angle), 0.5 - np.sin(angle))
    return (np.stack([x, y], axis=-1) + rng.normal(0, 0.1, (n, 2))).astype(np.float32)


def base_noise(n: int, kind: str, seed: int) -> np.ndarray:
    """x_T ~ N(0, I), shape (n, 2): a scrambled Sobol set through the Gaussian inverse CDF (evenly
    spread, quasi-Monte Carlo), or independent draws."""
    if kind == "iid":
        return np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)
    u = qmc.Sobol(2, scramble=True, seed=seed).random_base2(int(np.ceil(np.log2(n))))[:n]
    return norm.ppf(u).astype(np.float32)


# %% ---------------------------------------------------------------- the forward process
def make_schedule(num_timesteps: int) -> dict[str, jax.Array]:
    """Ho et al.'s linear betas, rescaled by 1000 / T so that abar_T ~ e^-10 at any T."""
    scale = 1000.0 / num_timesteps
    betas = jnp.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
    alpha_bars = jnp.cumprod(1.0 - betas)  # abar_t for t = 1..T (index t - 1)
    return {"betas": betas, "alpha_bars": alpha_bars}


def q_sample(schedule, x0, t, eps):
    """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for integer steps t in 0..T-1."""
    ab = schedule["alpha_bars"][t][:, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


# %% ---------------------------------------------------------------- model
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


# %% ---------------------------------------------------------------- loss and step
def make_train_step(graphdef, optimizer, schedule, data: jax.Array, batch_size: int):
    """A scan body: one Adam step of the simple loss (Eq. 14) on a fresh batch."""
    num_timesteps = schedule["betas"].shape[0]

    def loss_fn(params, key):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])]  # (batch, 2)
        t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps)
        eps = jax.random.normal(k_eps, x0.shape)
        eps_hat = nnx.merge(graphdef, params)(q_sample(schedule, x0, t, eps), t / num_timesteps)
        return jnp.mean(jnp.sum((eps - eps_hat) ** 2, axis=-1))  # the target is the noise

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def train(cfg: Config, data: np.ndarray, key: jax.Array, num_chunks: int = 20):
    """Train eps(x, t) with Adam. The steps run jitted, in lax.scan chunks, so the host only
    wakes up between chunks to log and to check that the loss is finite. Returns the trained
    model, the per-step losses and the throughput in steps/s (the first chunk, which compiles,
    left out)."""
    key, init_key = jax.random.split(key)
    model = NoiseMLP(cfg.hidden, cfg.depth, nnx.Rngs(init_key))
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.train_steps))
    schedule = make_schedule(cfg.num_timesteps)
    step = make_train_step(graphdef, optimizer, schedule, jnp.asarray(data), cfg.batch_size)
    run_chunk = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys))

    carry = (params, optimizer.init(params))
    losses = []
    keys = jax.random.split(key, cfg.train_steps)
    bounds = np.unique(np.linspace(0, cfg.train_steps, num_chunks + 1).astype(int))
    start = compiled = time.perf_counter()
    for i, (a, b) in enumerate(tqdm(list(zip(bounds[:-1], bounds[1:])), disable=None)):
        carry, chunk_losses = run_chunk(carry, keys[a:b])
        losses.append(np.asarray(chunk_losses))  # waits for the chunk: the timing is honest
        if not np.isfinite(losses[-1]).all():
            bad = int(np.argmin(np.isfinite(losses[-1])))
            raise FloatingPointError(
                f"training diverged at step {a + bad + 1}: loss is {losses[-1][bad]}; "
                "try a smaller --learning-rate"
            )
        if i == 0:  # the first chunk includes compilation
            compiled, first = time.perf_counter(), b
        if i % 5 == 0 or i == num_chunks - 1:
            print(f"step={sum(map(len, losses))} loss={losses[-1].mean():.4f}", flush=True)
    # steps/s after compilation; a run of a single chunk can only be timed with it
    end = time.perf_counter()
    timed = cfg.train_steps - first
    steps_per_s = timed / (end - compiled) if timed else first / (end - start)
    return nnx.merge(graphdef, carry[0]), np.concatenate(losses), steps_per_s


# %% ---------------------------------------------------------------- sampling
def sampling_coefficients(alpha_bars: np.ndarray, steps: int, eta: float):
    """For a subsequence tau of `steps` of the T steps (evenly spaced, ending at T): for each
    reverse step, t, abar_t, abar_prev and sigma (see the docstring). abar_prev = 1 at the end."""
    num_timesteps = len(alpha_bars)
    tau = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(int)[::-1]  # T-1 ... 0
    ab_t = alpha_bars[tau]
    ab_prev = np.append(alpha_bars[tau[1:]], 1.0)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t)) * np.sqrt(1 - ab_t / ab_prev)
    return tau, ab_t, ab_prev, sigma


@nnx.jit(static_argnames=("num_timesteps",))
def reverse_process(model, x_T, coefficients, keys, num_timesteps: int):
    """Run the reverse process from x_T, one scan step per entry of tau. Returns the whole path,
    shape (steps + 1, batch, 2), from x_T to the samples."""

    def step(x, inputs):
        t, ab, ab_prev, sigma, key = inputs
        eps_hat = model(x, jnp.full((x.shape[0],), t / num_timesteps))
        x0_hat = (x - jnp.sqrt(1 - ab) * eps_hat) / jnp.sqrt(ab)
        direction = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps_hat
        x = jnp.sqrt(ab_prev) * x0_hat + direction + sigma * jax.random.normal(key, x.shape)
        return x, x

    _, path = jax.lax.scan(step, x_T, (*coefficients, keys))
    return jnp.concatenate([x_T[None], path])


@nnx.jit(static_argnames=("num_timesteps",))
def probability_flow_heun(model, x_T, coefficients, num_timesteps: int):
    """DDIM's deterministic update is Euler's method for an ODE in y = x / sqrt(abar) and
    s = sqrt((1 - abar) / abar): dy/ds = eps(x, t) (Song et al. 2021, Eq. 14). Heun's method
    averages the slope at both ends of each Euler step (Karras et al. 2022, Algorithm 1), which is
    second order: 2 NFE a step, 1 on the last step, which ends at s = 0 where there is no model."""

    def eps(x, t):
        return model(x, jnp.full((x.shape[0],), t / num_timesteps))

    def step(x, inputs):
        t, ab, t_prev, ab_prev = inputs
        s, s_prev = jnp.sqrt((1 - ab) / ab), jnp.sqrt((1 - ab_prev) / ab_prev)
        y = x / jnp.sqrt(ab)
        d1 = eps(x, t)
        y_euler = y + (s_prev - s) * d1  # exactly DDIM's step
        d2 = eps(y_euler * jnp.sqrt(ab_prev), t_prev)
        y = jnp.where(t_prev >= 0, y + (s_prev - s) * 0.5 * (d1 + d2), y_euler)
        x = y * jnp.sqrt(ab_prev)
        return x, x

    _, path = jax.lax.scan(step, x_T, coefficients)
    return jnp.concatenate([x_T[None], path])


def sample(model, schedule, x_T, key, steps: int, sampler: str) -> jax.Array:
    """DDPM (eta = 1), DDIM (eta = 0) or Heun in `steps` reverse steps; returns the path."""
    alpha_bars = np.asarray(schedule["alpha_bars"], dtype=np.float64)
    tau, ab_t, ab_prev, sigma = sampling_coefficients(alpha_bars, steps, SAMPLERS[sampler])
    f32 = lambda *arrays: tuple(jnp.asarray(a, dtype=jnp.float32) for a in arrays)
    if sampler == "heun":
        t_prev = np.append(tau[1:], -1)  # -1: past the last step, abar = 1
        coefficients = f32(tau, ab_t, t_prev, ab_prev)
        return probability_flow_heun(model, jnp.asarray(x_T), coefficients, len(alpha_bars))
    keys = jax.random.split(key, steps)
    coefficients = f32(tau, ab_t, ab_prev, sigma)
    return reverse_process(model, jnp.asarray(x_T), coefficients, keys, len(alpha_bars))


def nfe(sampler: str, steps: int) -> int:
    """Function evaluations: one a step, Heun two (one on its last step)."""
    return 2 * steps - 1 if sampler == "heun" else steps


# %% ---------------------------------------------------------------- evaluation
def w2_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-size point clouds: the optimal assignment
    minimises the summed squared distances, W2 = sqrt(mean ||a_i - b_pi(i)||^2)."""
    cost = cdist(a, b, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def w2_floor(n: int, seed: int, draws: int = 5) -> float:
    """W2 between two independent sets of n fresh moons, averaged over draws."""
    base = 1_000_003 * (seed + 1)
    return float(
        np.mean(
            [w2_distance(moons(n, base + 2 * i), moons(n, base + 2 * i + 1)) for i in range(draws)]
        )
    )


# %% ---------------------------------------------------------------- figures
def plot_all(out, schedule, data, ddim, ddpm, path, losses, w2_table, cfg):
    lim = ((-1.6, 2.6), (-1.2, 1.7))
    num_timesteps = cfg.num_timesteps
    alpha_bars = np.asarray(schedule["alpha_bars"])

    # the forward process: data noised at several t, and the schedule
    ts = [round(f * (num_timesteps - 1)) for f in (0, 0.05, 0.1, 0.25, 0.5, 1)]
    fig, axes = plt.subplots(1, len(ts) + 1, figsize=(4 * (len(ts) + 1), 3.8))
    rng = np.random.default_rng(0)
    z = (data - data.mean(0)) / data.std(0)
    for ax, t in zip(axes, ts):
        ab = alpha_bars[t]
        x_t = np.sqrt(ab) * z + np.sqrt(1 - ab) * rng.standard_normal(z.shape)
        ax.scatter(x_t[:, 0], x_t[:, 1], s=2, alpha=0.4)
        ax.set(
            title=f"q(x_t | x_0), t = {t + 1}, abar = {ab:.2g}",
            xlabel="x1 (normalised)",
            xlim=(-4, 4),
            ylim=(-4, 4),
            aspect="equal",
        )
    axes[0].set_ylabel("x2 (normalised)")
    axes[-1].plot(np.arange(1, num_timesteps + 1), alpha_bars, label="abar_t")
    axes[-1].plot(np.arange(1, num_timesteps + 1), np.asarray(schedule["betas"]), label="beta_t")
    axes[-1].set(yscale="log", xlabel="step t", title="the schedule", ylim=(1e-5, 1.5))
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(out / "forward.png", dpi=90)
    plt.close(fig)

    # reverse-process snapshots (DDPM, ancestral, all T steps)
    # The moons form late: most of the structure appears in the last tenth of the steps.
    snaps = (np.array([0, 0.5, 0.8, 0.9, 0.95, 1.0]) * (len(path) - 1)).round().astype(int)
    fig, axes = plt.subplots(1, 6, figsize=(22, 4), sharex=True, sharey=True)
    for ax, k in zip(axes, snaps):
        ax.scatter(path[k][:, 0], path[k][:, 1], s=2, alpha=0.4, color="tab:orange")
        ax.set(
            title=f"reverse step {k} of {len(path) - 1}",
            xlabel="x1",
            xlim=(-3, 4),
            ylim=(-3, 3),
            aspect="equal",
        )
    axes[0].set_ylabel("x2")
    fig.suptitle("ancestral (DDPM) sampling: noise at t = T becomes two moons at t = 0")
    fig.tight_layout()
    fig.savefig(out / "reverse.png", dpi=100)
    plt.close(fig)

    # samples beside the data
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True, sharey=True)
    panels = [
        (data, "fresh two moons (data)"),
        (ddim, f"{cfg.sampler}, {cfg.sample_steps} steps, {cfg.noise} noise"),
        (ddpm, f"DDPM (ancestral), {num_timesteps} steps"),
    ]
    for ax, (pts, title) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5)
        ax.set(title=title, xlabel="x1", xlim=lim[0], ylim=lim[1], aspect="equal")
    axes[0].set_ylabel("x2")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)

    # W2 against the number of sampling steps
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, row in w2_table.items():
        ax.plot([nfe(sampler, n) for n in row], list(row.values()), marker="o", label=sampler)
    ax.axhline(1.0, color="black", ls="--", label="floor (fresh vs fresh)")
    ax.axhline(1.2, color="black", ls=":", label="bar: 1.2 x floor")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="function evaluations (NFE)",
        ylabel="W2 / floor (1000 points)",
        title="sample quality against sampler cost",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "w2_vs_steps.png", dpi=110)
    plt.close(fig)

    # loss curve
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    window = max(1, len(losses) // 100)
    ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), label="moving average")
    ax.set(xlabel="step", ylabel="noise-prediction loss", title="training loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


# %% ---------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    validate(cfg)
    start = time.perf_counter()
    train_key, sample_key = jax.random.split(jax.random.key(cfg.seed))

    # Train in normalised coordinates, where N(0, I) and the data have the same scale.
    data = moons(cfg.num_train, cfg.seed)
    mu, sd = data.mean(axis=0), data.std(axis=0)
    model, losses, steps_per_s = train(cfg, (data - mu) / sd, train_key)
    schedule = make_schedule(cfg.num_timesteps)

    def draw(x_T, steps, sampler, path=False):
        xs = np.asarray(sample(model, schedule, x_T, sample_key, steps, sampler)) * sd + mu
        if not np.isfinite(xs[-1]).all():  # W2's assignment would fail on it, after all this work
            raise FloatingPointError(f"sampling diverged ({sampler}, {steps} steps)")
        return xs if path else xs[-1]

    x_T = base_noise(cfg.num_samples, cfg.noise, cfg.seed)
    samples = draw(x_T, cfg.sample_steps, cfg.sampler)
    fresh = moons(cfg.num_samples, 7_919 * (cfg.seed + 1))  # never seen in training
    floor = w2_floor(cfg.num_samples, cfg.seed)
    w2 = w2_distance(samples, fresh)
    # Context: the paper's sampler (ancestral, all T steps, i.i.d. noise), and a perfect i.i.d.
    # sampler of the true distribution.
    ddpm_path = draw(
        base_noise(cfg.num_samples, "iid", cfg.seed), cfg.num_timesteps, "ddpm", path=True
    )
    w2_ddpm = w2_distance(ddpm_path[-1], fresh)
    rng = np.random.default_rng(cfg.seed)
    w2_perfect_iid = np.mean(
        [w2_distance(iid_moons(cfg.num_samples, rng), fresh) for _ in range(5)]
    )
    # The sampler study, on 1000 points (fewer if num_samples is smaller) with its own floor (an
    # assignment of 2000 poor samples takes seconds). DDIM starts from cfg.noise; DDPM from i.i.d.
    # noise, as it injects more.
    n_study = min(1000, cfg.num_samples)
    steps_grid = [s for s in (5, 10, 20, 50, 100) if s <= cfg.num_timesteps]
    fresh_small = moons(n_study, 7_919 * (cfg.seed + 1) + 1)
    floor_small = w2_floor(n_study, cfg.seed, 3)
    w2_table = {
        sampler: {
            n: w2_distance(draw(base_noise(n_study, noise, cfg.seed), n, sampler), fresh_small)
            / floor_small
            for n in steps_grid
        }
        for sampler, noise in (("heun", cfg.noise), ("ddim", cfg.noise), ("ddpm", "iid"))
    }

    with staged_run(cfg.out_dir) as out:  # out_dir is replaced whole, only if all of this works
        plot_all(out, schedule, fresh, samples, ddpm_path[-1], ddpm_path, losses, w2_table, cfg)
        np.save(out / "samples.npy", samples.astype(np.float32))
        metrics = {
            "task": "diffusion",
            "seed": cfg.seed,
            "preset": getattr(cfg, "preset", "cpu"),
            "w2": w2,
            "w2_floor": floor,
            "w2_ratio": w2 / floor,
            "w2_ratio_target": 1.2,
            "sampler": cfg.sampler,
            "noise": cfg.noise,
            "nfe": nfe(cfg.sampler, cfg.sample_steps),
            "w2_ratio_ddpm_ancestral": w2_ddpm / floor,
            "w2_ratio_perfect_iid_sampler": float(w2_perfect_iid / floor),
            "alpha_bar_T": float(schedule["alpha_bars"][-1]),
            "num_timesteps": cfg.num_timesteps,
            "train_steps": cfg.train_steps,
            "batch_size": cfg.batch_size,
            "train_examples_seen": cfg.train_steps * cfg.batch_size,
            "final_loss": float(losses[-len(losses) // 20 :].mean()),
            **{f"w2_ratio_{s}_{n}": v for s, row in w2_table.items() for n, v in row.items()},
            **device_info(),
            "throughput": float(steps_per_s),
            "throughput_unit": "steps/s",
            "wall_time_s": time.perf_counter() - start,
        }
        write_metrics(out, cfg, metrics)  # config.json, then metrics.json last
    print(
        " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k.count("_") < 3
        )
    )
    return metrics


if __name__ == "__main__":
    run_cli()
