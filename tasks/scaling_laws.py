"""Scaling laws on MNIST: how a CNN's validation loss falls with model size and with data size.

Over a wide range, the held-out loss of a network is a power law in the resource that limits it,
plus a floor (Hestness et al. 2017, "Deep Learning Scaling is Predictable, Empirically"; Kaplan et
al. 2020, "Scaling Laws for Neural Language Models"), and the two limits add up (Hoffmann et al.
2022, "Chinchilla"):

    L(x) = E + A x^(-alpha)  (x = parameters N or training images D),
    L(N, D) = E + A / N^alpha + B / D^beta.

We measure alpha on the real MNIST digits with a two-layer CNN of width c,
conv 2x2/2 (c) -> relu -> conv 2x2/2 (2c) -> relu -> linear(10):

- model sweep: c = 16, 8, 4, 2, 1 on all 55,000 training images;
- data sweep: c = 16 on D = 55,000 / 2^k images, k = 0..6 (nested random subsets);
- a grid of the narrower models on 1/4, 1/16 and 1/64 of the data, for the joint fit.

The protocol is the lesson. A fixed number of EPOCHS would give 1/64 of the data 64x fewer
updates and measure under-training, not the value of data. So every run gets the SAME STEP
BUDGET (800 Adam steps of 128 images drawn with replacement from its subset, cosine-decayed
learning rate), and we keep its BEST validation loss over checkpoints every 50 steps (early
stopping), which reads small-data runs before they overfit. Validation is 5,000 images held out of
the 60,000; each point is the mean of 2 paired seeds. The fits minimise the squared error of
log L (the plots are log-log) and report R^2 of log L; the bars are R^2 >= 0.95 for each 1-D fit.

Both convs are 2x2 with stride 2 ("patchify", as in ViT): a reshape and a matmul, which XLA's CPU
GEMM runs fast. Each run is one jitted `lax.scan`, compiled once per width. On an accelerator the
runs of a width are `vmap`ped together, their run axis sharded over every device (`shard_seeds`);
on CPU they run one after another (batching measured no faster there).

    python tasks/scaling_laws.py
    python tasks/scaling_laws.py --help
    python tasks/scaling_laws.py --preset paper   # 8 widths (N over 256x), 9 data sizes, 4 seeds

Expected at defaults (46 runs; about 95 s on 2 CPU cores, see docs/scaling_laws.md):
model_alpha ~ 0.43 (R^2 ~ 0.98), data_alpha ~ 0.59 (R^2 ~ 0.99), joint alpha ~ 0.45 and
beta ~ 0.61; the full model reaches ~97% validation and test accuracy.

Differences from the papers: a tiny CNN and data set, so N spans ~20x and D 64x at defaults
(256x each with `--preset paper`), not 7 orders of magnitude; a fixed step budget rather than
compute-optimal training; 2 seeds a point.
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
import warnings
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy.optimize import OptimizeWarning, curve_fit
from tqdm.auto import tqdm

NUM_TRAIN_FULL = 60_000


# %% [markdown]
# ## Helpers
# Shared, character for character, with the other task files (a test checks it): option checks,
# the staged output folder, metrics.json, figures, the phase timer, the command line, MNIST.


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


def save_figure(fig, path) -> None:
    """Save a figure into the run's folder and close it; in a notebook, also show it inline."""
    fig.savefig(path, dpi=120)
    if "ipykernel" in sys.modules:
        from IPython.display import display

        display(fig)
    plt.close(fig)


class PhaseTimer:
    """Wall time of each phase of a run, for metrics.json's `time_split_s`. Call `lap(phase)` at
    the end of each phase: "setup" (data, model, compilation where it happens before training),
    "train", "evaluate", "figures"; a phase lapped twice adds up. `lap` returns the total so far."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.split: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        self.split[phase] = round(self.split.get(phase, 0.0) + now - self.last, 3)
        self.last = now
        return now - self.start


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


def shard_seeds(tree):
    """Split the leading (seed) axis of every array in `tree` over all local devices, with a 1-D
    Mesh and a NamedSharding: jit then runs each device's seeds on that device, so 8 accelerators
    train 8x the seeds in about the same time. A seed count that the device count does not divide
    is padded by repeating the last seed; keep the first num_seeds rows of every result."""
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
    folder = data_root() / "mnist"
    x_train, y_train, x_test, y_test = (read_idx(folder / name) for name in MNIST_SHA256)
    return {
        "x_train": x_train,
        "y_train": y_train.astype(np.int32),
        "x_test": x_test,
        "y_test": y_test.astype(np.int32),
    }


# %% [markdown]
# ## Config
# The defaults are the 2-core CPU run; `--preset paper` widens both sweeps for an accelerator.


# %%
@dataclass(frozen=True)
class Config:
    seed: int = 0
    """Base random seed; seed i of each point uses seed + i for init, subset and batch order."""
    out_dir: str = "runs/scaling_laws"
    """Folder for metrics.json, runs.json and the figures."""
    num_widths: int = 5
    """Points in the model sweep: width multipliers 1, 1/2, ..., 1/2^(num_widths - 1)."""
    num_data_sizes: int = 7
    """Points in the data sweep: data fractions 1, 1/2, ..., 1/2^(num_data_sizes - 1)."""
    base_channels: int = 16
    """Channels of the first conv at width 1 (the second has twice as many)."""
    steps: int = 800
    """Optimizer steps per run, the same for every run (the step budget)."""
    batch_size: int = 128
    """Training images per step, drawn with replacement from the run's subset."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate; cosine decay to zero over `steps`."""
    eval_every: int = 50
    """Steps between validation evaluations; the best one is kept (early stopping)."""
    num_seeds: int = 2
    """Seeds per point; the plots show their mean and std."""
    val_size: int = 5000
    """Training images held out as the validation set (the y-axis)."""
    joint_grid: bool = True
    """Also train the narrower models on every other data size, for the joint L(N, D) fit."""
    preset: Literal["cpu", "paper"] = "cpu"
    """Named defaults: `cpu` is the 2-core run above (N over ~18x, D over 64x, 2 seeds, 800 steps);
    `paper` widens the sweep for an accelerator: 8 widths (c = 128 down to 1, N over 256x), 9 data
    sizes (55,000 down to 214 images), 4 seeds, 4,000 steps a run. Flags given on the command line
    override the preset's values."""


PRESETS: dict[str, Config] = {
    "cpu": Config(),
    "paper": Config(
        preset="paper",
        num_widths=8,
        base_channels=128,
        num_data_sizes=9,
        steps=4000,
        eval_every=200,
        num_seeds=4,
    ),  # fmt: skip
}


def validate(cfg: Config) -> None:
    """Raise a one-line ValueError naming the option, before any data, model or compile work."""
    if cfg.preset not in PRESETS:
        raise option_error("preset", cfg.preset, f"must be one of {', '.join(PRESETS)}")
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    check_number(cfg, "num_widths", 3, 12)  # a fit has 3 parameters
    check_number(cfg, "num_data_sizes", 3, 16)
    check_number(cfg, "base_channels", 1, 1024)
    check_number(cfg, "steps", 1, 10**7)
    check_number(cfg, "batch_size", 1, 65536)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "eval_every", 1, cfg.steps)
    check_number(cfg, "num_seeds", 1, 1000)
    check_number(cfg, "val_size", 1000, 30_000)
    if cfg.seed + cfg.num_seeds > 2**32:
        raise option_error("seed", cfg.seed, f"+ --num-seeds {cfg.num_seeds} must be <= 2^32")
    if cfg.val_size % 1000:
        raise option_error("val_size", cfg.val_size, "must be a multiple of 1000 (scored in 1000s)")
    if cfg.base_channels < 2 ** (cfg.num_widths - 1):
        need = f"must be >= 2^(num_widths - 1) = {2 ** (cfg.num_widths - 1)} for --num-widths "
        need += f"{cfg.num_widths}, so that the narrowest model keeps >= 1 channel"
        raise option_error("base_channels", cfg.base_channels, need)
    if cfg.steps % cfg.eval_every:
        raise option_error("eval_every", cfg.eval_every, f"must divide --steps {cfg.steps}")
    smallest = (NUM_TRAIN_FULL - cfg.val_size) // 2 ** (cfg.num_data_sizes - 1)
    if smallest < 10:
        need = f"leaves {smallest} images in the smallest subset (with --val-size {cfg.val_size})"
        raise option_error("num_data_sizes", cfg.num_data_sizes, need + "; need >= 10")
    check_out_dir(cfg.out_dir)


# %% [markdown]
# ## Data
# A fixed validation split (the same images score every run); the rest is the training pool that
# the data sweep subsamples. Pixels are standardised with MNIST's mean 0.1307 and std 0.3081.


# %%
def load_splits(cfg: Config) -> dict[str, jax.Array]:
    """Train / validation / test arrays on the device; the validation split is seed-independent."""
    mnist = load_mnist()
    order = np.random.default_rng(12345).permutation(NUM_TRAIN_FULL)
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    x, y = mnist["x_train"], mnist["y_train"]
    return {
        "train_x": jnp.asarray(x[train_idx]), "train_y": jnp.asarray(y[train_idx]),
        "val_x": jnp.asarray(x[val_idx]), "val_y": jnp.asarray(y[val_idx]),
        "test_x": jnp.asarray(mnist["x_test"]), "test_y": jnp.asarray(mnist["y_test"]),
    }  # fmt: skip


def to_input(images_u8: jax.Array) -> jax.Array:
    """uint8 (B, 28, 28) -> standardised float (B, 28, 28, 1)."""
    return ((images_u8.astype(jnp.float32) / 255.0 - 0.1307) / 0.3081)[..., None]


# %% [markdown]
# ## Model
# A 2x2 stride-2 convolution is exactly a space-to-depth reshape followed by a matmul:
# $y_{ij} = W\,[x_{2i,2j}, x_{2i,2j+1}, x_{2i+1,2j}, x_{2i+1,2j+1}] + b$. Its parameter count is
# closed-form, $N(c) = 5c + (8c^2 + 2c) + (980c + 10)$, so N is known without building the model.


# %%
def space_to_depth(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, 4C), features ordered (dy, dx, c) like a reshaped HWIO
    kernel, so a 2x2 stride-2 convolution is space_to_depth(x) @ kernel + bias."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


class PatchConv(nnx.Module):
    """A 2x2 stride-2 convolution written as a reshape and a matmul (XLA's fast CPU GEMM)."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4 * in_channels, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(space_to_depth(x))


class CNN(nnx.Module):
    """28x28 -> 2x2 conv s2 (c) -> 14x14 -> 2x2 conv s2 (2c) -> 7x7 -> linear -> 10 logits."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv1 = PatchConv(1, channels, rngs)
        self.conv2 = PatchConv(channels, 2 * channels, rngs)
        self.head = nnx.Linear(7 * 7 * 2 * channels, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, 28, 28, 1) -> (B, 10)
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.head(h.reshape(h.shape[0], -1))


def param_count(channels: int) -> int:
    """Closed form of the CNN's parameter count: weights + biases of the three layers."""
    c1, c2 = channels, 2 * channels
    return (4 * 1 * c1 + c1) + (4 * c1 * c2 + c2) + (49 * c2 * 10 + 10)


# %% [markdown]
# ## Training: one step budget for every run, early stopping on validation
# Each run draws `steps` batches with replacement from its subset `perm[:n_train]` (nested across
# data sizes, as the same seed gives the same permutation) and keeps the parameters with the lowest
# validation loss. `n_train` is traced, so one compiled program serves every data size of a width.


# %%
@functools.cache  # a second sweep in the same process (tests, a notebook) reuses the programs
def make_train(steps, eval_every, batch_size, learning_rate, channels, batched=False):
    """A jitted train(params, key, n_train, perm, data) for one width. batched=True vmaps it over
    a leading run axis of params, key, n_train and perm (the data are shared)."""
    graphdef, _ = nnx.split(CNN(channels, nnx.Rngs(0)))
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    def evaluate(params, images, labels, eval_batch=1000):
        """Mean cross-entropy and accuracy, in chunks of 1000 to bound the activation memory."""

        def one(xy):
            loss, logits = loss_fn(params, to_input(xy[0]), xy[1])
            return loss, (logits.argmax(-1) == xy[1]).mean()

        xys = (images.reshape(-1, eval_batch, 28, 28), labels.reshape(-1, eval_batch))
        losses, accs = jax.lax.map(one, xys)
        return losses.mean(), accs.mean()

    def train(params, key, n_train, perm, data):
        def step(carry, step_key):
            params, opt_state = carry
            idx = perm[jax.random.randint(step_key, (batch_size,), 0, n_train)]
            x, y = to_input(data["train_x"][idx]), data["train_y"][idx]
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def chunk(carry, chunk_key):
            params, opt_state, best = carry
            keys = jax.random.split(chunk_key, eval_every)
            (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
            val_loss, val_acc = evaluate(params, data["val_x"], data["val_y"])
            better = val_loss < best["val_loss"]  # early stopping: keep the best parameters
            new = {"params": params, "val_loss": val_loss, "val_acc": val_acc}
            best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
            return (params, opt_state, best), (losses.mean(), val_loss, val_acc)

        best = {"params": params, "val_loss": jnp.inf, "val_acc": jnp.array(0.0)}
        carry = (params, optimizer.init(params), best)
        keys = jax.random.split(key, steps // eval_every)
        (_, _, best), history = jax.lax.scan(chunk, carry, keys)
        test_loss, test_acc = evaluate(best["params"], data["test_x"], data["test_y"])
        return best["val_loss"], best["val_acc"], test_loss, test_acc, history

    return jax.jit(jax.vmap(train, in_axes=(0, 0, 0, 0, None)) if batched else train)


def run_inputs(channels: int, seed: int, num_train: int):
    """(initial params, batch key, permutation of the training pool) of one run. The same seed
    gives the same init key, subset order and batch keys at every point (paired sweeps)."""
    init_key, perm_key, batch_key = jax.random.split(jax.random.key(seed), 3)
    params = nnx.state(CNN(channels, nnx.Rngs(init_key)), nnx.Param)
    return params, batch_key, jax.random.permutation(perm_key, num_train)


def train_width(cfg: Config, data: dict, channels: int, jobs: list, batched: bool) -> list:
    """Train the (n_train, seed) runs of one width: one after another, or vmapped together with
    the run axis sharded over every device. Returns each run's outputs on the host."""
    args = (cfg.steps, cfg.eval_every, cfg.batch_size, cfg.learning_rate, channels, batched)
    trainer = make_train(*args)
    inputs = [run_inputs(channels, seed, data["train_x"].shape[0]) for _, seed in jobs]
    if not batched:
        return [
            jax.device_get(trainer(params, key, n_train, perm, data))
            for (n_train, _), (params, key, perm) in zip(jobs, inputs)
        ]
    params, keys, perms = jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)
    n_trains = jnp.asarray([n_train for n_train, _ in jobs], jnp.int32)
    out = jax.device_get(trainer(*shard_seeds((params, keys, n_trains, perms)), data))
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(len(jobs))]  # drops the padding


def run_record(cfg: Config, channels: int, n_train: int, seed: int, out) -> dict:
    """One run's outputs as a JSON-able record; raises if its training loss went non-finite."""
    val_loss, val_acc, test_loss, test_acc, (train_l, val_l, _) = out
    bad = np.flatnonzero(~np.isfinite(train_l))
    if bad.size:  # checked per chunk of eval_every steps, on the host, after the scan
        raise FloatingPointError(
            f"training diverged at step {(bad[0] + 1) * cfg.eval_every} (channels={channels}, "
            f"n_train={n_train}, seed={seed}): loss is {train_l[bad[0]]}; try a smaller "
            "--learning-rate"
        )
    return {
        "channels": channels, "params": param_count(channels), "n_train": n_train, "seed": seed,
        "val_loss": float(val_loss), "val_acc": float(val_acc),
        "test_loss": float(test_loss), "test_acc": float(test_acc),
        "best_step": int((np.argmin(val_l) + 1) * cfg.eval_every),
        "val_loss_curve": [float(v) for v in val_l],
        "train_loss_curve": [float(v) for v in train_l],
    }  # fmt: skip


def run_sweeps(cfg: Config, data: dict, runs: list, batched: bool | None = None) -> list[dict]:
    """Train every (channels, n_train) run for every seed; one compilation per width. batched:
    vmap a width's runs together, sharded over the devices (default: only on an accelerator).
    Results come back in the order of `runs`, then seeds, on either path."""
    batched = jax.default_backend() != "cpu" if batched is None else batched
    records, bar = {}, tqdm(total=len(runs) * cfg.num_seeds, desc="runs", disable=None)
    for channels in dict.fromkeys(c for c, _ in runs):  # widths in order of first appearance
        jobs = [(n, cfg.seed + s) for c, n in runs if c == channels for s in range(cfg.num_seeds)]
        for (n_train, seed), out in zip(jobs, train_width(cfg, data, channels, jobs, batched)):
            r = records[(channels, n_train, seed)] = run_record(cfg, channels, n_train, seed, out)
            keys = ("channels", "params", "n_train", "seed", "val_loss", "val_acc", "best_step")
            print(
                " ".join(f"{k}={r[k]:.4f}" if k.startswith("val") else f"{k}={r[k]}" for k in keys)
            )
            bar.update()
    bar.close()
    return [records[(c, n, cfg.seed + s)] for c, n in runs for s in range(cfg.num_seeds)]


# %% [markdown]
# ## Evaluate: power-law fits
# We fit $L(x) = E + A x^{-\alpha}$ by least squares on $\log L$, with $E \in [0, \min L]$ (the
# floor lies below every point), $A$ fitted as $\log A$ and $x$ rescaled by its geometric mean so
# the optimiser sees parameters of order one; $R^2$ is of $\log L$. The joint law
# $L(N, D) = E + A/N^\alpha + B/D^\beta$ is fitted the same way on every (N, D) point.


# %%
def power_law(x: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    """L(x) = E + A x^(-alpha)."""
    return e + a * np.power(x, -alpha)


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot."""
    return float(1.0 - np.sum((y - y_hat) ** 2) / np.sum((y - y.mean()) ** 2))


def fit_log_law(log_model, x, loss: np.ndarray, p0: tuple, bounds: tuple) -> tuple:
    """Least squares on log L (curve_fit); returns the parameters and R^2 of log L."""
    with warnings.catch_warnings():  # no covariance when E sits on its bound; we do not use it
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, _ = curve_fit(log_model, x, np.log(loss), p0=p0, bounds=bounds, maxfev=20000)
    return popt, r_squared(np.log(loss), log_model(x, *popt))


def fit_power_law(x: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Fit L = E + A x^(-alpha); returns E, A, alpha and R^2."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    s = np.exp(np.mean(np.log(x)))  # geometric mean: fit A (x / s)^-alpha, then A s^alpha

    def log_model(xs, e, log_a, alpha):
        return np.log(e + np.exp(log_a) * np.power(xs / s, -alpha))

    p0, bounds = (0.5 * loss.min(), np.log(loss.mean()), 0.5), ([0, -20, 0], [loss.min(), 20, 5])
    (e, log_a, alpha), r2 = fit_log_law(log_model, x, loss, p0, bounds)
    return {"E": float(e), "A": float(np.exp(log_a) * s**alpha), "alpha": float(alpha), "r2": r2}


def joint_law(nd: tuple[np.ndarray, np.ndarray], e, a, alpha, b, beta) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    n, d = nd
    return e + a * np.power(n, -alpha) + b * np.power(d, -beta)


def fit_joint_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta, with the same rescaling as above."""
    n, d, loss = np.asarray(n, float), np.asarray(d, float), np.asarray(loss, float)
    sn, sd = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))

    def log_model(nd, e, log_a, alpha, log_b, beta):
        return np.log(
            e + np.exp(log_a) * (nd[0] / sn) ** -alpha + np.exp(log_b) * (nd[1] / sd) ** -beta
        )

    p0 = (0.5 * loss.min(), np.log(loss.mean() / 2), 0.5, np.log(loss.mean() / 2), 0.5)
    bounds = ([0.0, -20.0, 0.0, -20.0, 0.0], [loss.min(), 20.0, 5.0, 20.0, 5.0])
    (e, log_a, alpha, log_b, beta), r2 = fit_log_law(log_model, (n, d), loss, p0, bounds)
    a, b = float(np.exp(log_a) * sn**alpha), float(np.exp(log_b) * sd**beta)
    return {"E": float(e), "A": a, "alpha": float(alpha), "B": b, "beta": float(beta), "r2": r2}


def aggregate(results: list[dict], key: str) -> dict[tuple[int, int], tuple[float, float]]:
    """(channels, n_train) -> (mean, std over seeds) of results[key]."""
    groups: dict[tuple[int, int], list[float]] = {}
    for r in results:
        groups.setdefault((r["channels"], r["n_train"]), []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in groups.items()}


# %% [markdown]
# ## Figures
# `scaling.png`: both sweeps on log-log axes with their fits (the README figure); `joint.png`:
# every (N, D) point with the joint law; `curves.png`: the data sweep's validation loss against
# step, with the point that early stopping keeps (small subsets overfit early).


# %%
def plot_scaling(path, model_pts, data_pts, model_fit, data_fit) -> None:
    """Best validation loss (log-log, mean ± std over seeds) against N and against D, with fits."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    sweeps = [(model_pts, model_fit, "parameters N (all data)", "model sweep")]
    sweeps += [(data_pts, data_fit, "training images D (widest model)", "data sweep")]
    for ax, (pts, fit, xlabel, name) in zip(axes, sweeps):
        x, loss = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        ax.errorbar(x, loss, [p[2] for p in pts], fmt="o", ms=7, capsize=3, label="runs")
        grid = np.geomspace(x.min(), x.max(), 100)
        label = f"α = {fit['alpha']:.2f}, R² = {fit['r2']:.3f}"
        ax.plot(grid, power_law(grid, fit["E"], fit["A"], fit["alpha"]), "r-", lw=2, label=label)
        ax.set(xscale="log", yscale="log", title=f"{name}: E + A x^-α")
        ax.set_xlabel(xlabel, fontsize=12)
        ax.legend(fontsize=12)
    axes[0].set_ylabel("best validation loss (nats)", fontsize=12)
    fig.suptitle("MNIST CNN: validation loss vs model size and data size", fontsize=13)
    fig.tight_layout()
    save_figure(fig, path)


def plot_joint(path, losses: dict, joint_fit: dict) -> None:
    """Every (N, D) point against D, one line per width, with the joint fit's prediction."""
    fig, ax = plt.subplots(figsize=(7, 5))
    by_channels: dict[int, list] = {}
    for (channels, n_train), (mean, std) in sorted(losses.items()):
        by_channels.setdefault(channels, []).append((n_train, mean, std))
    j = joint_fit
    for i, (channels, pts) in enumerate(sorted(by_channels.items())):
        d, mean, std = map(np.array, zip(*pts))
        n, grid = param_count(channels), np.geomspace(d.min(), d.max(), 50)
        ax.errorbar(d, mean, std, fmt="o", color=f"C{i}", capsize=3, label=f"N={n}")
        fit = joint_law((n, grid), j["E"], j["A"], j["alpha"], j["B"], j["beta"])
        ax.plot(grid, fit, "-", color=f"C{i}", alpha=0.7)
    ax.set(xscale="log", yscale="log", xlabel="training images D")
    ax.set(ylabel="best validation loss (nats)")
    ax.set_title(f"joint fit: α={j['alpha']:.2f}, β={j['beta']:.2f}, R²={j['r2']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(path, results: list[dict], channels: int, eval_every: int) -> None:
    """Validation loss against step for the data sweep: small subsets overfit, early stopping."""
    fig, ax = plt.subplots(figsize=(7, 5))
    runs = [r for r in results if r["channels"] == channels and r["seed"] == results[0]["seed"]]
    for i, r in enumerate(sorted(runs, key=lambda r: -r["n_train"])):
        steps = eval_every * (np.arange(len(r["val_loss_curve"])) + 1)
        ax.plot(steps, r["val_loss_curve"], "o-", ms=3, color=f"C{i}", label=f"D={r['n_train']}")
        ax.plot(r["best_step"], r["val_loss"], "k*", ms=10)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="validation loss (nats)")
    ax.set_title("widest model, same step budget: the best point (*) is what the sweep keeps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# %% [markdown]
# ## Main
# Plan the runs, train them, fit the laws, draw, and write metrics.json last (with the bars:
# `model_r2_target`, `data_r2_target`, `wall_time_s_ceiling`).


# %%
def plan_runs(cfg: Config, num_train: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Widths (channels, widest first), data sizes (largest first) and the (channels, n_train)
    runs: the data sweep, the model sweep, then the joint grid."""
    widths = [cfg.base_channels // 2**k for k in range(cfg.num_widths)]
    sizes = [num_train // 2**k for k in range(cfg.num_data_sizes)]
    runs = [(widths[0], d) for d in sizes] + [(c, sizes[0]) for c in widths[1:]]
    if cfg.joint_grid:  # narrower models on every other smaller data size
        runs += [(c, d) for c in widths[1:] for d in sizes[2::2]]
    return widths, sizes, runs


def fit_all(results: list[dict], widths: list[int], sizes: list[int]) -> tuple:
    """The 1-D fits of the two sweeps, the joint fit of every point, and the plotted points
    (x, mean loss, std over seeds)."""
    losses = aggregate(results, "val_loss")
    model_pts = [(param_count(c), *losses[(c, sizes[0])]) for c in widths]
    data_pts = [(d, *losses[(widths[0], d)]) for d in sizes]
    model_fit = fit_power_law([p[0] for p in model_pts], [p[1] for p in model_pts])
    data_fit = fit_power_law([p[0] for p in data_pts], [p[1] for p in data_pts])
    keys = sorted(losses)
    n, d = [param_count(c) for c, _ in keys], [d for _, d in keys]
    joint_fit = fit_joint_law(n, d, [losses[k][0] for k in keys])
    return model_fit, data_fit, joint_fit, model_pts, data_pts, losses


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data = load_splits(cfg)
    widths, sizes, runs = plan_runs(cfg, data["train_x"].shape[0])
    batched = jax.default_backend() != "cpu"  # see run_sweeps and the module docstring
    timer.lap("setup")  # each width compiles inside the sweep, on its first run
    results = run_sweeps(cfg, data, runs, batched)
    sweep_seconds = timer.lap("train") - timer.split["setup"]
    model_fit, data_fit, joint_fit, model_pts, data_pts, losses = fit_all(results, widths, sizes)
    full = [r for r in results if r["channels"] == widths[0] and r["n_train"] == sizes[0]]
    metrics = {
        "task": "scaling_laws", "seed": cfg.seed, "num_seeds": cfg.num_seeds,
        "num_runs": len(results),
        **{f"model_{k}": v for k, v in model_fit.items()},
        **{f"data_{k}": v for k, v in data_fit.items()},
        **{f"joint_{k}": v for k, v in joint_fit.items()},
        "model_r2_target": 0.95, "data_r2_target": 0.95,
        "params_min": param_count(widths[-1]), "params_max": param_count(widths[0]),
        "n_train_min": sizes[-1], "n_train_max": sizes[0],
        "full_val_loss": float(np.mean([r["val_loss"] for r in full])),
        "full_val_accuracy": float(np.mean([r["val_acc"] for r in full])),
        "full_test_accuracy": float(np.mean([r["test_acc"] for r in full])),
        "steps_per_run": cfg.steps, "preset": cfg.preset, **device_info(),
        "runs_vmapped": int(batched),
        # optimizer steps of all runs per second of the sweep, compilation included
        "throughput": len(results) * cfg.steps / sweep_seconds, "throughput_unit": "steps/s",
        "wall_time_s": time.perf_counter() - timer.start, "wall_time_s_ceiling": 300.0,
    }  # fmt: skip
    timer.lap("evaluate")
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )
    with staged_run(cfg.out_dir) as out:
        plot_scaling(out / "scaling.png", model_pts, data_pts, model_fit, data_fit)
        plot_joint(out / "joint.png", losses, joint_fit)
        plot_curves(out / "curves.png", results, widths[0], cfg.eval_every)
        (out / "runs.json").write_text(json.dumps(results, allow_nan=False))
        timer.lap("figures")
        metrics["time_split_s"] = timer.split
        write_metrics(out, cfg, metrics)
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
