"""Flow matching on two moons: learn a vector field that carries Gaussian noise onto the data.

What it teaches: generative modelling as regression. Regress a network v(x, t) onto the velocity
of a path from noise x0 ~ N(0, I) to data x1, then sample by integrating dx/dt = v(x, t) from
t = 0 to 1 with an ODE solver (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et
al. 2023, "Flow Straight and Fast"). Metric: the exact 2-Wasserstein distance between 2000 samples
and 2000 fresh moons, over the floor between two fresh sets of moons (1: as good as fresh data).

    python tasks/flow_matching.py
    python tasks/flow_matching.py --help
    python tasks/flow_matching.py --preset paper   # 3x512 MLP, batch 4096, 10k steps

Expected at defaults: w2_ratio 1.024, 1.030, 1.005 for seeds 0, 1, 2 (bar: <= 1.2), Heun at 16
steps (32 NFE) from Sobol noise (i.i.d. noise: 1.21 to 1.36). Runtime (bar: 90 s) and results:
docs/flow_matching.md; solvers and the field: studies/flow_matching_sampling.py. Differences from
the reference: two moons, not images; a 3x128 MLP; Sobol noise; data normalised for training;
`--preset paper` (sized for a GPU) at a learning rate of 1e-3, untuned.
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

Solver = Literal["euler", "midpoint", "heun"]
Noise = Literal["sobol", "iid"]
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}
SOLVERS, NOISES = tuple(NFE_PER_STEP), ("sobol", "iid")


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
# The defaults are the 2-core CPU run; `PRESETS["paper"]` is the reference notebook's setting.
# %%
@dataclass(frozen=True)
class Config:
    preset: Literal["cpu", "paper"] = "cpu"  # cpu (2 cores) or paper (3x512 MLP, batch 4096, 10k)
    seed: int = 0  # Random seed for data, initialisation, training and sampling.
    out_dir: str = "runs/flow_matching"  # Folder for metrics.json, samples.npy and the figures.
    train_steps: int = 6000  # Optimizer steps. Each draws a fresh batch of (x0, x1, t).
    batch_size: int = 512  # Pairs (noise, data) per step.
    hidden: int = 128  # Width of each hidden layer of the MLP v(x, t).
    depth: int = 3  # Number of hidden layers.
    learning_rate: float = 5e-3  # Peak Adam learning rate; it decays to zero by a cosine schedule.
    num_train: int = 20_000  # Size of the fixed training set (evaluation uses fresh moons).
    solver: Solver = "heun"  # ODE solver for the samples: euler, midpoint or heun.
    noise: Noise = "sobol"  # Starting noise: sobol (evenly spread N(0, I) points) or iid.
    sample_steps: int = 16  # Integration steps from t=0 to 1 (NFE = steps x evaluations a step).
    num_samples: int = 2000  # Samples written to samples.npy and compared with fresh moons.


PAPER = dict(hidden=512, batch_size=4096, train_steps=10_000, learning_rate=1e-3)
PRESETS: dict[str, Config] = {"cpu": Config(), "paper": Config("paper", **PAPER)}


def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    check_number(cfg, "seed", 0, 2**32, high_open=True)  # numpy's seeds are 0 .. 2**32 - 1
    for name in ("train_steps", "batch_size", "hidden", "depth", "sample_steps"):
        check_number(cfg, name, 1)
    check_number(cfg, "num_train", 2)  # the data are normalised by their standard deviation
    check_number(cfg, "num_samples", 2, 10_000)  # the exact W2 costs n^2 memory and n^3 time
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    for name, allowed in (("noise", NOISES), ("solver", SOLVERS), ("preset", PRESETS)):
        if getattr(cfg, name) not in allowed:
            raise option_error(name, getattr(cfg, name), f"choose one of {', '.join(allowed)}")
    check_out_dir(cfg.out_dir)


# %% [markdown]
# ## Data
# `make_moons` is *stratified* (half its points on each moon, at evenly spaced angles): even a
# perfect i.i.d. sampler scores a W2 ratio of 1.3 to 1.5 against it (the study measures it). The
# ODE is deterministic, so we stratify too: $x_0 = \Phi^{-1}(u)$, with $u$ a scrambled Sobol set,
# is $\mathcal N(0, I)$ but evenly spread (quasi-Monte Carlo); the flow carries that onto the moons.
# %%
def moons(n: int, seed: int) -> np.ndarray:
    """Two moons in sklearn's original coordinates, shape (n, 2)."""
    return make_moons(n_samples=n, noise=0.1, random_state=seed)[0].astype(np.float32)


def base_noise(n: int, kind: str, seed: int) -> np.ndarray:
    """Starting points x0 ~ N(0, I), shape (n, 2): "sobol" (evenly spread) or "iid"."""
    if kind == "iid":
        return np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)
    u = qmc.Sobol(2, scramble=True, seed=seed).random_base2(int(np.ceil(np.log2(n))))[:n]
    return norm.ppf(u).astype(np.float32)


# %% [markdown]
# ## Model, loss and training
# $v_\theta(x, t)$ is an MLP on $x$ and $[\sin 2^k \pi t, \cos 2^k \pi t]_{k<4}$. The straight path
# $x_t = (1 - t)\,x_0 + t\,x_1$ moves at $dx_t/dt = x_1 - x_0$, so the conditional flow-matching
# (CFM) loss is a regression, $\mathcal L(\theta) = \mathbb E_{t \sim U[0,1],\,x_0,\,x_1}
# \| v_\theta(x_t, t) - (x_1 - x_0) \|^2$. Its minimiser, the marginal velocity
# $u(x, t) = \mathbb E[x_1 - x_0 \mid x_t = x]$, carries $\mathcal N(0, I)$ onto the data. Adam,
# cosine decay, fresh batches, in jitted `lax.scan` chunks (between them: log, stop if diverged).
# %%
class VelocityMLP(nnx.Module):
    """v(x, t): an MLP on [x, sinusoidal features of t]. Works in normalised coordinates."""

    def __init__(self, hidden: int, depth: int, rngs: nnx.Rngs, num_freqs: int = 4):
        self.freqs = 2.0 ** jnp.arange(num_freqs) * jnp.pi  # t-features at a few scales
        sizes = [2 + 2 * num_freqs] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x, t):  # x: (batch, 2), t: (batch,)
        angles = t[:, None] * self.freqs  # (batch, num_freqs)
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        for layer in self.layers:
            h = nnx.silu(layer(h))
        return self.out(h)  # (batch, 2)


def interpolant(x0, x1, t):
    """The linear path and its velocity: x_t = (1 - t) x0 + t x1, dx_t/dt = x1 - x0."""
    return (1.0 - t[:, None]) * x0 + t[:, None] * x1, x1 - x0


def train(cfg: Config, data: np.ndarray, key: jax.Array, num_chunks: int = 20):
    """Train v(x, t); returns the model, the per-step losses, and steps/s after compilation."""
    key, init_key = jax.random.split(key)
    graphdef, params = nnx.split(VelocityMLP(cfg.hidden, cfg.depth, nnx.Rngs(init_key)))
    optimizer = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.train_steps))
    data = jnp.asarray(data)  # normalised

    def loss_fn(params, key):  # the CFM loss on a fresh batch
        k_idx, k_x0, k_t = jax.random.split(key, 3)
        x1 = data[jax.random.randint(k_idx, (cfg.batch_size,), 0, data.shape[0])]  # (batch, 2)
        x0 = jax.random.normal(k_x0, x1.shape)
        t = jax.random.uniform(k_t, (cfg.batch_size,))
        x_t, target = interpolant(x0, x1, t)
        return jnp.mean(jnp.sum((nnx.merge(graphdef, params)(x_t, t) - target) ** 2, axis=-1))

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
# ## Sampling: solve the ODE
# Integrate $dx/dt = v_\theta(x, t)$ from $t = 0$ to $1$ in equal steps $h$. Euler,
# $x \leftarrow x + h\,v(x, t)$, is first order at 1 NFE a step; midpoint and Heun (the trapezoid
# $x \leftarrow x + \tfrac h2 [v(x, t) + v(x + h\,v(x, t), t + h)]$) are second order at 2 NFE.
# %%
@nnx.jit(static_argnames=("steps", "solver"))
def integrate(model: VelocityMLP, x0: jax.Array, steps: int, solver: str) -> jax.Array:
    """Solve dx/dt = v(x, t) from t = 0 to 1; returns the path, shape (steps + 1, batch, 2)."""
    dt = 1.0 / steps
    v = lambda x, t: model(x, jnp.full((x.shape[0],), t))

    def step(x, i):
        t = i * dt
        if solver == "euler":  # x + dt v(x, t): first order, 1 NFE
            x = x + dt * v(x, t)
        elif solver == "midpoint":  # x + dt v(x + dt/2 v(x, t), t + dt/2): second order, 2 NFE
            x = x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
        else:  # heun: the trapezoid of v at both ends of an Euler step; second order, 2 NFE
            k1 = v(x, t)
            x = x + 0.5 * dt * (k1 + v(x + dt * k1, t + dt))
        return x, x

    _, path = jax.lax.scan(step, x0, jnp.arange(steps))
    return jnp.concatenate([x0[None], path])


# %% [markdown]
# ## Evaluate and draw
# $W_2 = \sqrt{\min_\pi \frac1n \sum_i \|a_i - b_{\pi(i)}\|^2}$ over assignments $\pi$, exactly,
# over the floor (two fresh sets of moons); beside it, the same model from the other noise.
# `samples.png` (the README's figure) shows the samples and the particles' paths; `loss.png` the
# loss. The learned field at six times, and animated, is in `studies/flow_matching_sampling.py`.
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


def evaluate(cfg: Config, model, mu, sd):
    """The W2 ratio and its context; returns the noise x0, the samples, fresh moons, metrics."""
    x0 = base_noise(cfg.num_samples, cfg.noise, cfg.seed)
    gen = lambda z: np.asarray(integrate(model, z, cfg.sample_steps, cfg.solver)[-1]) * sd + mu
    samples = gen(x0)
    if not np.isfinite(samples).all():  # W2's assignment would fail on it, after all this work
        raise FloatingPointError(f"sampling diverged ({cfg.solver}, {cfg.sample_steps} steps)")
    fresh = moons(cfg.num_samples, 7_919 * (cfg.seed + 1))  # never seen in training
    floor, w2 = w2_floor(cfg.num_samples, cfg.seed), w2_distance(samples, fresh)
    other = "iid" if cfg.noise == "sobol" else "sobol"  # context: the same model, the other noise
    w2_other = w2_distance(gen(base_noise(cfg.num_samples, other, cfg.seed)), fresh)
    metrics = dict(w2=w2, w2_floor=floor, w2_ratio=w2 / floor, w2_ratio_ceiling=1.2)
    metrics |= {"noise": cfg.noise, f"w2_ratio_{other}_noise": w2_other / floor}
    metrics |= dict(nfe=cfg.sample_steps * NFE_PER_STEP[cfg.solver], solver=cfg.solver)
    return x0, samples, fresh, metrics


def plot_all(out, model, mu, sd, x0, data, samples, losses, cfg, n: int = 200) -> None:
    """samples.png, legible at 480 px: the samples (orange) over the data (grey), and the paths
    of n particles from the noise (black) to the samples; loss.png, the training loss."""
    path = np.asarray(integrate(model, x0, 20, "heun")) * sd + mu  # the particles over time
    with plt.rc_context({"font.size": 15}):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
        axes[0].scatter(data[:, 0], data[:, 1], s=4, color="grey", alpha=0.4)
        axes[0].scatter(samples[:, 0], samples[:, 1], s=4, color="tab:orange", alpha=0.5)
        axes[0].set(title=f"samples ({cfg.solver}, {cfg.sample_steps} steps)", xlim=(-1.6, 2.6))
        axes[0].set_ylim(-1.2, 1.7)
        axes[1].plot(path[:, :n, 0], path[:, :n, 1], color="tab:blue", lw=0.8, alpha=0.3)
        axes[1].scatter(path[0, :n, 0], path[0, :n, 1], s=10, color="black", label="noise")
        axes[1].scatter(path[-1, :n, 0], path[-1, :n, 1], s=10, color="tab:orange", label="sample")
        axes[1].set(title="noise to data along the ODE", xlim=(-2.5, 3.5), ylim=(-1.7, 2.2))
        axes[1].legend(loc="lower left", fontsize=11, markerscale=2)
        plt.setp(axes, xlabel="x1", ylabel="x2", aspect="equal")
        fig.tight_layout()
        save_figure(fig, out / "samples.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    window = max(1, len(losses) // 100)
    ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), label="moving average")
    ax.set(xlabel="step", ylabel="CFM loss (normalised units)", title="training loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "loss.png")


# %% [markdown]
# ## Main
# Train in normalised coordinates (where noise and data have the same scale), evaluate, draw.
# %%
def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data = moons(cfg.num_train, cfg.seed)
    mu, sd = data.mean(axis=0), data.std(axis=0)
    timer.lap("setup")  # the model is built, and compiled, in train's first chunk
    model, losses, steps_per_s = train(cfg, (data - mu) / sd, jax.random.key(cfg.seed))
    timer.lap("train")
    x0, samples, fresh, results = evaluate(cfg, model, mu, sd)
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:  # out_dir is replaced whole, only if all of this works
        plot_all(out, model, mu, sd, x0, fresh, samples, losses, cfg)
        np.save(out / "samples.npy", samples.astype(np.float32))
        wall_time_s = timer.lap("figures")
        metrics = {"task": "flow_matching", "seed": cfg.seed, "preset": cfg.preset, **results}
        metrics |= dict(train_steps=cfg.train_steps, batch_size=cfg.batch_size)
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
