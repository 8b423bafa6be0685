"""Scaling laws on MNIST: how a CNN's validation loss falls with model size and with data size.

Held-out loss is a power law in the resource that limits it, plus a floor (Hestness et al. 2017;
Kaplan et al. 2020), and the two limits add up (Hoffmann et al. 2022, "Chinchilla"):

    L(x) = E + A x^(-alpha)  (x = parameters N or training images D),
    L(N, D) = E + A / N^alpha + B / D^beta.

    python tasks/scaling_laws.py
    python tasks/scaling_laws.py --help
    python tasks/scaling_laws.py --preset paper   # 8 widths (N over 256x), 9 data sizes, 4 seeds

Expected at defaults (46 runs, about 2 minutes on 2 CPU cores): model_alpha ~ 0.43 (R^2 ~ 0.98;
bars: R^2 >= 0.95 per 1-D fit), data_alpha ~ 0.59 (R^2 ~ 0.99), joint alpha ~ 0.45, beta ~ 0.61,
~97% test accuracy. Unlike the papers: N spans ~20x, D 64x (256x each with `--preset paper`), not
7 orders of magnitude; every run gets the same step budget. Results: docs/scaling_laws.md.
"""

# %%
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy.optimize import least_squares
from tqdm.auto import tqdm


# %% [markdown]
# ## Helpers
# Shared, character for character, with the other task files (a test checks it).
# %%
def data_root() -> pathlib.Path:
    """The data and model cache: $TOY_EXAMPLES_DATA, else ~/.cache/toy_examples (`make data`)."""
    return pathlib.Path(os.environ.get("TOY_EXAMPLES_DATA", "~/.cache/toy_examples")).expanduser()


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


def shard_seeds(tree):
    """Split the leading (seed) axis of every array in `tree` over the local devices (a 1-D Mesh,
    a NamedSharding), padded by repeating the last seed: keep the first num_seeds rows after."""
    devices = jax.devices()
    pad = -jax.tree.leaves(tree)[0].shape[0] % len(devices)
    if pad:
        tree = jax.tree.map(lambda x: jnp.concatenate([x] + [x[-1:]] * pad), tree)
    mesh = jax.sharding.Mesh(np.array(devices), ("seed",))
    return jax.device_put(
        tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))
    )


MNIST_SHA256 = {
    "train-images.idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels.idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images.idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels.idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """One IDX file, sha256 checked: 2 zero bytes, a type byte, ndim, big-endian dims, data."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (scripts/fetch_data.py)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST_SHA256[path.name]:
        raise OSError(f"{path} is corrupt (wrong sha256): delete it and run `make data`")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist() -> dict[str, np.ndarray]:
    """MNIST: x_train (60000, 28, 28) and x_test (10000, 28, 28) uint8, y_* int32 labels."""
    arrays = [read_idx(data_root() / "mnist" / name) for name in MNIST_SHA256]
    keys = ["x_train", "y_train", "x_test", "y_test"]
    return {key: x.astype(np.int32) if key[0] == "y" else x for key, x in zip(keys, arrays)}


# %% [markdown]
# ## Config, data and model
# The defaults (2 CPU cores): widths c = 16, 8, 4, 2, 1 on all 55,000 training images (the model
# sweep), c = 16 on 55,000 / 2^k images, k = 0..6 (the data sweep), the narrower models on 1/4,
# 1/16 and 1/64 of the data (the joint fit); 2 paired seeds a point. `--preset paper` widens both
# sweeps. A fixed validation split scores every run; the data sweep subsamples the rest. Both
# convs are 2x2, stride 2 ("patchify", as in ViT): a space-to-depth reshape, then a matmul that
# XLA's CPU GEMM runs fast, $y_{ij} = W\,[x_{2i,2j}, x_{2i,2j+1}, x_{2i+1,2j}, x_{2i+1,2j+1}] + b$.
# So $N(c) = 5c + (8c^2 + 2c) + (980c + 10)$ is known without building it.
# %%
@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # Base seed; seed i of each point uses seed + i for init, subset and batches.
    out_dir: str = "runs/scaling_laws"  # Folder for metrics.json, runs.json and the figure.
    num_widths: int = 5  # Model sweep: width multipliers 1, 1/2, ..., 1/2^(num_widths - 1).
    num_data_sizes: int = 7  # Data sweep: fractions 1, 1/2, ..., 1/2^(num_data_sizes - 1).
    base_channels: int = 16  # Channels of the first conv at width 1 (the second has twice as many).
    steps: int = 800  # Optimizer steps per run, the same for every run (the step budget).
    batch_size: int = 128  # Training images per step, drawn with replacement from the subset.
    learning_rate: float = 3e-3  # Peak Adam learning rate; cosine decay to zero over `steps`.
    eval_every: int = 50  # Steps between validation evaluations; the best is kept.
    num_seeds: int = 2  # Seeds per point; the plots show their mean and std.
    val_size: int = 5000  # Training images held out as the validation set (the y-axis).
    joint_grid: bool = True  # Also train narrower models on smaller data, for the joint fit.
    preset: Literal["cpu", "paper"] = "cpu"  # Named defaults (PRESETS); flags override them.


PRESETS: dict[str, Config] = {
    "cpu": Config(),  # the 2-core run: N over ~18x, D over 64x, 2 seeds, 800 steps
    "paper": Config(preset="paper", num_widths=8, base_channels=128, num_data_sizes=9,
                    steps=4000, eval_every=200, num_seeds=4),  # c = 128 down to 1: N over 256x
}  # fmt: skip


def validate(cfg: Config) -> None:
    """Raise a one-line ValueError naming the option, before any data, model or compile work."""
    limits = [("num_seeds", 1, 1000), ("seed", 0, 2**32 - cfg.num_seeds),  # seed + i < 2^32
              ("learning_rate", 0, 1, True), ("num_widths", 3, 12), ("num_data_sizes", 3, 16),
              ("base_channels", 1, 1024), ("steps", 1, 10**7), ("batch_size", 1, 65536),
              ("eval_every", 1, cfg.steps), ("val_size", 1000, 30_000)]  # fmt: skip
    for limit in limits:  # a fit has 3 parameters, hence >= 3 widths and data sizes
        check_number(cfg, *limit)
    least = 2 ** (cfg.num_widths - 1)  # so that the narrowest width keeps one channel
    smallest = (60_000 - cfg.val_size) // 2 ** (cfg.num_data_sizes - 1)
    checks = [  # (bad, option, what is allowed)
        (cfg.preset not in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}"),
        (cfg.val_size % 1000, "val_size", "must be a multiple of 1000 (scored in 1000s)"),
        (cfg.base_channels < least, "base_channels", f"must be >= 2^(num-widths - 1) = {least}"),
        (cfg.steps % cfg.eval_every, "eval_every", f"must divide --steps {cfg.steps}"),
        (smallest < 10, "num_data_sizes", f"leaves {smallest} images in a subset; need >= 10"),
    ]  # fmt: skip
    for bad, name, allowed in checks:
        if bad:
            raise option_error(name, getattr(cfg, name), allowed)
    check_out_dir(cfg.out_dir)


def load_splits(cfg: Config) -> dict[str, jax.Array]:  # on the device; the same for every seed
    mnist = load_mnist()
    order = np.random.default_rng(12345).permutation(len(mnist["x_train"]))
    val, train = order[: cfg.val_size], order[cfg.val_size :]
    x, y = mnist["x_train"], mnist["y_train"]
    splits = {"train_x": x[train], "train_y": y[train], "val_x": x[val], "val_y": y[val],
              "test_x": mnist["x_test"], "test_y": mnist["y_test"]}  # fmt: skip
    return {name: jnp.asarray(array) for name, array in splits.items()}


def patchify(x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H/2, W/2, 4C), rows (dy, dx, c)
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


class CNN(nnx.Module):  # uint8 (B, 28, 28) -> conv (c) -> conv (2c) -> linear -> (B, 10) logits
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Linear(4, channels, rngs=rngs)  # a 2x2 stride-2 conv, on patchify(x)
        self.conv2 = nnx.Linear(4 * channels, 2 * channels, rngs=rngs)  # the same, c -> 2c
        self.head = nnx.Linear(7 * 7 * 2 * channels, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = ((images.astype(jnp.float32) / 255.0 - 0.1307) / 0.3081)[..., None]  # MNIST mean, std
        h = jax.nn.relu(self.conv2(patchify(jax.nn.relu(self.conv1(patchify(x))))))
        return self.head(h.reshape(h.shape[0], -1))


def param_count(channels: int) -> int:  # N(c): the weights and biases of the three layers
    return 5 * channels + (8 * channels**2 + 2 * channels) + (980 * channels + 10)  # as above


# %% [markdown]
# ## Training: one step budget for every run, early stopping on validation
# A fixed number of epochs would give 1/64 of the data 64x fewer updates and measure
# under-training, not the value of data. So each run takes `steps` Adam steps (cosine decay) on
# batches drawn with replacement from its subset `perm[:n_train]` (nested: the same seed gives the
# same permutation), and keeps its lowest validation loss over checkpoints every `eval_every`
# steps, which reads small subsets before they overfit. `n_train` is traced, so one compiled
# `lax.scan` serves every data size of a width. On an accelerator the runs of a width are
# `vmap`ped together, sharded over the devices; on CPU they run in turn (batching was no faster).
# %%
@functools.cache  # a second sweep in the same process (tests, a notebook) reuses the programs
def make_train(steps, eval_every, batch_size, learning_rate, channels, batched=False):
    """A jitted train(seed, n_train, data) for one width. batched=True vmaps it over a leading run
    axis of seed and n_train (the data are shared)."""
    graphdef, _ = nnx.split(CNN(channels, nnx.Rngs(0)))
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def loss_fn(params, x, y):  # mean cross-entropy, and accuracy
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits.argmax(-1) == y).mean()

    def evaluate(params, images, labels):  # in chunks of 1000 images, to bound the memory
        xys = (images.reshape(-1, 1000, 28, 28), labels.reshape(-1, 1000))
        return jax.tree.map(jnp.mean, jax.lax.map(lambda xy: loss_fn(params, *xy), xys))

    def train(seed, n_train, data):  # a seed gives the same init, subset and batches at any point
        init_key, perm_key, key = jax.random.split(jax.random.key(seed), 3)
        params = nnx.state(CNN(channels, nnx.Rngs(init_key)), nnx.Param)
        perm = jax.random.permutation(perm_key, len(data["train_x"]))  # subset: perm[:n_train]

        def step(carry, step_key):  # one Adam step on a batch drawn from perm[:n_train]
            params, opt_state = carry
            idx = perm[jax.random.randint(step_key, (batch_size,), 0, n_train)]
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, _), grads = grad_fn(params, data["train_x"][idx], data["train_y"][idx])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def chunk(carry, chunk_key):  # eval_every steps, then a validation pass
            params, opt_state, best = carry
            keys = jax.random.split(chunk_key, eval_every)
            (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
            val_loss, val_acc = evaluate(params, data["val_x"], data["val_y"])
            better = val_loss < best["val_loss"]  # early stopping: keep the best parameters
            new = {"params": params, "val_loss": val_loss, "val_acc": val_acc}
            best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
            return (params, opt_state, best), (losses.mean(), val_loss)

        best = {"params": params, "val_loss": jnp.inf, "val_acc": jnp.array(0.0)}
        keys = jax.random.split(key, steps // eval_every)
        (_, _, best), curves = jax.lax.scan(chunk, (params, optimizer.init(params), best), keys)
        test_loss, test_acc = evaluate(best["params"], data["test_x"], data["test_y"])
        return best["val_loss"], best["val_acc"], test_loss, test_acc, curves

    return jax.jit(jax.vmap(train, in_axes=(0, 0, None)) if batched else train)


def run_sweeps(cfg: Config, data: dict, runs: list, batched: bool = False) -> list[dict]:
    """Train every (channels, n_train) run for every seed, one compilation per width, and return a
    record of each, in the order of `runs`, then seeds. batched: vmap the runs of a width together
    in one call, the run axis sharded over the devices (main does so on an accelerator)."""
    records, bar = {}, tqdm(total=len(runs) * cfg.num_seeds, desc="runs", disable=None)
    for channels in dict.fromkeys(c for c, _ in runs):  # widths in order of first appearance
        args = (cfg.steps, cfg.eval_every, cfg.batch_size, cfg.learning_rate, channels, batched)
        train = make_train(*args)  # compiles on its first call
        jobs = [(n, cfg.seed + s) for c, n in runs if c == channels for s in range(cfg.num_seeds)]
        if batched:  # padded to a multiple of the device count: keep the first len(jobs)
            n_trains, seeds = np.array(jobs, np.uint32).T  # seeds run up to 2^32 - 1
            out = jax.device_get(train(*shard_seeds((seeds, n_trains)), data))
            outs = [jax.tree.map(lambda x, i=i: x[i], out) for i in range(len(jobs))]
        else:
            outs = [jax.device_get(train(jnp.uint32(s), n, data)) for n, s in jobs]
        for (n_train, seed), out in zip(jobs, outs):
            val_loss, val_acc, test_loss, test_acc, (train_l, val_l) = out
            run = f"channels={channels} n_train={n_train} seed={seed}"
            if not np.isfinite(train_l).all():  # checked on the host, after the scan
                raise FloatingPointError(f"{run} diverged: try a smaller --learning-rate")
            r = records[(channels, n_train, seed)] = {
                "channels": channels, "params": param_count(channels), "n_train": n_train,
                "seed": seed, "val_loss": float(val_loss), "val_acc": float(val_acc),
                "test_loss": float(test_loss), "test_acc": float(test_acc),
                "best_step": int((np.argmin(val_l) + 1) * cfg.eval_every),
                "val_loss_curve": val_l.tolist(), "train_loss_curve": train_l.tolist(),
            }  # fmt: skip
            print(f"{run} val_loss={val_loss:.4f} val_acc={val_acc:.4f} best_step={r['best_step']}")
            bar.update()
    bar.close()
    return [records[(c, n, cfg.seed + s)] for c, n in runs for s in range(cfg.num_seeds)]


# %% [markdown]
# ## Power-law fits, the figure and main
# We fit $L = E + \sum_i A_i x_i^{-\alpha_i}$ by least squares on $\log L$: one term for the 1-D
# laws $L(x) = E + A x^{-\alpha}$, two for the joint law $L(N, D) = E + A/N^\alpha + B/D^\beta$.
# $E \in [0, \min L]$ (below every point); $A_i$ is fitted as $\log A_i$, each $x_i$ rescaled by its
# geometric mean (parameters of order one); $R^2$ is of $\log L$ (the plots are log-log). `main`
# trains the runs, fits the laws, draws `scaling.png` (fits and accuracies), writes metrics.json.
# %%
def fit_law(xs: list, loss) -> dict[str, float]:
    """Fit L = E + sum_i A_i x_i^(-alpha_i) for one x (a 1-D law) or two (N and D, the joint law);
    returns E, A, alpha (B, beta) and R^2 of log L."""
    xs, y, terms = np.asarray(xs, float), np.log(np.asarray(loss, float)), len(xs)
    scales = [np.exp(np.mean(np.log(x))) for x in xs]  # fit A (x / s)^-alpha, then A s^alpha

    def log_model(xs, e, *coefs):
        total = e
        for x, s, log_a, alpha in zip(xs, scales, coefs[0::2], coefs[1::2]):
            total = total + np.exp(log_a) * np.power(x / s, -alpha)
        return np.log(total)

    p0 = [0.5 * np.min(loss)] + [np.log(np.mean(loss) / terms), 0.5] * terms
    bounds = ([0.0] + [-20.0, 0.0] * terms, [np.min(loss)] + [20.0, 5.0] * terms)
    popt = least_squares(lambda p: log_model(xs, *p) - y, p0, bounds=bounds, max_nfev=20000).x
    fit, names = {"E": float(popt[0])}, [("A", "alpha"), ("B", "beta")]
    for (a, alpha), log_a, exponent, s in zip(names, popt[1::2], popt[2::2], scales):
        fit |= {a: float(np.exp(log_a) * s**exponent), alpha: float(exponent)}
    r2 = 1.0 - np.sum((y - log_model(xs, *popt)) ** 2) / np.sum((y - y.mean()) ** 2)
    return fit | {"r2": float(r2)}


def plot_scaling(path, losses, accuracies, fits, sweeps) -> None:
    """Per sweep, mean ± std over seeds: best validation loss and fit (top), its accuracy (below)"""
    fig, axes = plt.subplots(2, 2, figsize=(9, 7), sharex="col", sharey="row")
    xlabels = ["parameters N (all data)", "training images D (widest model)"]
    for (ax, ax_acc), xlabel, (name, ([x], keys)) in zip(axes.T, xlabels, sweeps.items()):
        fit, (mean, std) = fits[name], zip(*[losses[k] for k in keys])
        ax.errorbar(x, mean, std, fmt="o", ms=7, capsize=3, label="runs")
        grid = np.geomspace(min(x), max(x), 100)
        label = f"α = {fit['alpha']:.2f}, R² = {fit['r2']:.3f}"
        ax.plot(grid, fit["E"] + fit["A"] * grid ** -fit["alpha"], "r-", lw=2, label=label)
        ax.set(xscale="log", yscale="log", title=f"{name} sweep: E + A x^-α")
        ax.legend(fontsize=12)
        ax_acc.errorbar(x, *zip(*[accuracies[k] for k in keys]), fmt="s", capsize=3, color="C2")
        ax_acc.set_xlabel(xlabel, fontsize=12)
    axes[0, 0].set_ylabel("best validation loss (nats)", fontsize=12)
    axes[1, 0].set_ylabel("validation accuracy", fontsize=12)
    fig.suptitle("MNIST CNN: validation loss and accuracy vs model and data size", fontsize=13)
    fig.tight_layout()
    save_figure(fig, path)


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data = load_splits(cfg)
    widths = [cfg.base_channels // 2**k for k in range(cfg.num_widths)]  # widest first
    sizes = [len(data["train_x"]) // 2**k for k in range(cfg.num_data_sizes)]  # largest first
    runs = [(widths[0], d) for d in sizes] + [(c, sizes[0]) for c in widths[1:]]
    if cfg.joint_grid:  # the narrower models on every other smaller data size
        runs += [(c, d) for c in widths[1:] for d in sizes[2::2]]
    batched = jax.default_backend() != "cpu"  # see run_sweeps and the Training cell
    timer.lap("setup")  # each width compiles inside the sweep, on its first run
    results = run_sweeps(cfg, data, runs, batched)
    sweep_seconds = timer.lap("train") - timer.split["setup"]
    stats = {}  # key -> {(channels, n_train): (mean, std) over the seeds}
    for key in ("val_loss", "val_acc"):
        values = np.array([r[key] for r in results]).reshape(len(runs), cfg.num_seeds)
        stats[key] = dict(zip(runs, zip(values.mean(1).tolist(), values.std(1).tolist())))
    losses, accuracies = stats["val_loss"], stats["val_acc"]
    points = sorted(losses)  # every (channels, n_train) point, for the joint law
    sweeps = {  # name -> ([N], [D] or [N, D] of each point, the (channels, n_train) of each point)
        "model": ([[param_count(c) for c in widths]], [(c, sizes[0]) for c in widths]),
        "data": ([sizes], [(widths[0], d) for d in sizes]),
        "joint": ([[param_count(c) for c, _ in points], [d for _, d in points]], points),
    }
    fits = {name: fit_law(xs, [losses[k][0] for k in keys]) for name, (xs, keys) in sweeps.items()}
    full = results[: cfg.num_seeds]  # the widest model on all the data
    metrics = {
        "task": "scaling_laws", "seed": cfg.seed, "num_seeds": cfg.num_seeds,
        "num_runs": len(results), "steps_per_run": cfg.steps,
        **{f"{name}_{k}": v for name, fit in fits.items() for k, v in fit.items()},
        "model_r2_target": 0.95, "data_r2_target": 0.95,
        "params_min": param_count(widths[-1]), "params_max": param_count(widths[0]),
        "n_train_min": sizes[-1], "n_train_max": sizes[0],
        "full_val_loss": float(np.mean([r["val_loss"] for r in full])),
        "full_val_accuracy": float(np.mean([r["val_acc"] for r in full])),
        "full_test_accuracy": float(np.mean([r["test_acc"] for r in full])),
        "preset": cfg.preset, **device_info(), "runs_vmapped": int(batched),
        # optimizer steps of all runs per second of the sweep, compilation included
        "throughput": len(results) * cfg.steps / sweep_seconds, "throughput_unit": "steps/s",
        "wall_time_s_ceiling": 300.0,
    }  # fmt: skip
    timer.lap("evaluate")
    print(*(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    with staged_run(cfg.out_dir) as out:
        plot_scaling(out / "scaling.png", losses, accuracies, fits, sweeps)
        (out / "runs.json").write_text(json.dumps(results, allow_nan=False))
        metrics["wall_time_s"], metrics["time_split_s"] = timer.lap("figures"), timer.split
        write_metrics(out, cfg, metrics)
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
