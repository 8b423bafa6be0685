"""Scaling laws on MNIST: how a CNN's validation loss falls with model size and with data size.

The idea (Hestness et al. 2017, "Deep Learning Scaling is Predictable, Empirically"; Kaplan et al.
2020, "Scaling Laws for Neural Language Models"; Hoffmann et al. 2022, "Chinchilla"): over a wide
range, the held-out loss of a network is a power law in the resource that limits it, plus a floor,

    L(x) = E + A * x^(-alpha),            x = parameter count N, or training examples D,

and the two limits combine additively (Chinchilla's form),

    L(N, D) = E + A / N^alpha + B / D^beta.

E is the loss that no amount of x removes (the other resource, the step budget, label noise), A the
scale, alpha the exponent we want. We measure it on the real MNIST digits with a two-layer CNN:

    conv 2x2 stride 2 (c channels) -> relu -> conv 2x2 stride 2 (2c channels) -> relu -> linear(10)

- Model sweep: width multiplier w = 1, 1/2, ..., 1/16 (c = 16 w), all 55,000 training images.
- Data sweep: the full model on D = 55,000 * (1, 1/2, ..., 1/64) images (nested random subsets).
- Beyond: a small grid of the narrower models on 1/4, 1/16, 1/64 of the data, for the joint fit.

The protocol, and why. Training every run for a fixed number of EPOCHS would confound data size with
optimizer steps: 1/64 of the data would get 64 times fewer updates, and we would measure
under-training, not the value of data. So every run gets the SAME STEP BUDGET (steps x batch size
examples drawn with replacement from its own subset, Adam with a cosine-decayed learning rate), and
we evaluate the validation loss every `eval_every` steps and keep the BEST value: early stopping on
validation, which reads small-data runs at their best point, before they overfit. The y-axis is the
loss on 5,000 images held out from the 60,000 training images; the test set only gives the final
accuracy of the full model (at its best validation checkpoint). Each point is the mean of 2 seeds
(different init, subset and batch order, shared across the points of a sweep, so the curves are
paired); error bars are their std.

A lesson in compute. XLA's CPU convolution runs on one thread and is slow here (170 ms a step at
batch 128 for a 3x3 version of this net), and `vmap`ping same-shaped runs together turns it into a
grouped convolution, slower still. So both convs are 2x2 with stride 2 ("patchify" convs, as in
ViT's patch embedding): such a conv is exactly a space-to-depth reshape followed by a matmul, which
XLA hands to its multithreaded GEMM, and it cost about 3 ms of CPU a step, 3x less than 3x3 convs
written as im2col + matmul. Each run is one jitted `lax.scan` over its steps, compiled once per
width and reused for every data size and seed. The runs of one width can also be trained together,
`vmap`ped over a run axis that `shard_seeds` splits over all devices (the data size is traced, so
runs on different data sizes share one program). On an accelerator that is the default: a tiny CNN
leaves a GPU mostly idle, and batching runs fills it. On CPU the runs go one after another: vmapping
2 to 8 runs of this patch-conv net measured 0.83x to 1.3x the CPU time of running them in turn (the
widest model, which dominates the sweep, at 1.08x to 1.3x), and the batched program kept fewer of
the 2 cores busy, so batching saves nothing there. An earlier im2col version measured 3x slower
batched. `run_sweeps(..., batched=True)` forces the batched path (the tests compare the two).

The fits use scipy's curve_fit in log space: we minimise the squared error of log L, since the
losses span an order of magnitude and the plots are log-log, and report R^2 of log L.

    python tasks/scaling_laws.py
    python tasks/scaling_laws.py --help
    python tasks/scaling_laws.py --preset paper      # 256x in N, 256x in D, 4 seeds: for a GPU

Expected at defaults (46 runs of 800 steps; on an idle 2-core CPU 95 s of wall time and 164 s of CPU
time, user + sys, of which ~20 s is compiling the 5 widths): model_alpha ~ 0.43 (R^2 ~ 0.975, E
fitted at ~0: no floor visible below 18k parameters), data_alpha ~ 0.59 (R^2 ~ 0.99, E ~ 0.063: the
step budget's floor), joint alpha ~ 0.45, beta ~ 0.61 (R^2 ~ 0.96). The bar is R^2 >= 0.95 for each
1-D fit. The full model reaches ~97.0% validation and test accuracy. What the plots show beyond the
fits: the model curve bends flat at the narrow end (1 to 2 channels: the linear head does most of
the work there), and the data curve flattens at the top, where the 800-step budget, not data, is the
limit.
Outputs in runs/scaling_laws/: metrics.json, runs.json (every run), scaling.png, joint.png,
curves.png (validation loss against step, the early-stopping points starred). metrics.json also
records the device, the preset and the training throughput (optimizer steps per second, summed over
runs, compilation included).

The `paper` preset widens the sweep towards the papers' ranges: 8 widths, c = 128 down to 1 (1,005
to 257,418 parameters, 256x), 9 data sizes from all 55,000 images down to 214 (256x), 4 seeds a
point and 4,000 steps a run (176 runs). It is meant for an accelerator and has not been run to the
end here (2-core CPU); the tests validate it and smoke-run it with tiny overrides.

Differences from the papers: a tiny CNN and data set, so N spans ~20x and D 64x at defaults (256x
each with `--preset paper`), not 7 orders of magnitude; a fixed step budget rather than
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
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy.optimize import OptimizeWarning, curve_fit
from tqdm import tqdm

NUM_TRAIN_FULL = 60_000


# %% ---------------------------------------------------------------- config
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
    ),
}


# %% ---------------------------------------------------------------- helpers
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


# %% ---------------------------------------------------------------- data
def load_splits(cfg: Config) -> dict[str, jax.Array]:
    """Train / validation / test arrays on the device. The validation split is a fixed random
    `val_size` of the 60,000 training images (seed-independent: every run is scored on the same
    images); the rest is the training pool that the data sweep subsamples."""
    mnist = load_mnist()
    order = np.random.default_rng(12345).permutation(NUM_TRAIN_FULL)
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    return {
        "train_x": jnp.asarray(mnist["x_train"][train_idx]),
        "train_y": jnp.asarray(mnist["y_train"][train_idx]),
        "val_x": jnp.asarray(mnist["x_train"][val_idx]),
        "val_y": jnp.asarray(mnist["y_train"][val_idx]),
        "test_x": jnp.asarray(mnist["x_test"]),
        "test_y": jnp.asarray(mnist["y_test"]),
    }


def to_input(images_u8: jax.Array) -> jax.Array:
    """uint8 (B, 28, 28) -> standardised float (B, 28, 28, 1) with MNIST's mean and std."""
    return ((images_u8.astype(jnp.float32) / 255.0 - 0.1307) / 0.3081)[..., None]


# %% ---------------------------------------------------------------- model
def space_to_depth(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 block of pixels becomes one pixel's features.

    Feature order is (dy, dx, c), the same as a (2, 2, C, C_out) HWIO kernel reshaped to
    (4C, C_out), so a 2x2 stride-2 convolution is exactly space_to_depth(x) @ kernel + bias.
    """
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
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(h.reshape(h.shape[0], -1))


def param_count(channels: int) -> int:
    """Closed form of the CNN's parameter count: weights + biases of the three layers."""
    c1, c2 = channels, 2 * channels
    return (4 * 1 * c1 + c1) + (4 * c1 * c2 + c2) + (49 * c2 * 10 + 10)


# %% ---------------------------------------------------------------- training
@functools.cache  # a second sweep in the same process (tests, a notebook) reuses the programs
def make_train(
    steps: int,
    eval_every: int,
    batch_size: int,
    learning_rate: float,
    channels: int,
    batched: bool = False,
):
    """A jitted train(params, key, n_train, perm, data) for one width; reused for every run.

    n_train is traced, so one compilation serves all data sizes: each step draws batch indices
    uniformly from [0, n_train) and maps them through the run's permutation `perm` of the
    training split, so the subset for n_train is perm[:n_train] (nested across data sizes).
    batched=True vmaps it over a leading run axis of params, key, n_train and perm (data shared).
    """
    graphdef, _ = nnx.split(CNN(channels, nnx.Rngs(0)))
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    optimizer = optax.adam(schedule)
    num_evals = steps // eval_every

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    def evaluate(params, images, labels, eval_batch=1000):
        """Mean cross-entropy and accuracy, in chunks to bound the activation memory."""
        xs = images.reshape(-1, eval_batch, 28, 28)
        ys = labels.reshape(-1, eval_batch)

        def one(xy):
            loss, logits = loss_fn(params, to_input(xy[0]), xy[1])
            return loss, (logits.argmax(-1) == xy[1]).mean()

        losses, accs = jax.lax.map(one, (xs, ys))
        return losses.mean(), accs.mean()

    def train(params, key, n_train, perm, data):
        opt_state = optimizer.init(params)

        def step(carry, step_key):
            params, opt_state = carry
            idx = perm[jax.random.randint(step_key, (batch_size,), 0, n_train)]
            x, y = to_input(data["train_x"][idx]), data["train_y"][idx]
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def chunk(carry, chunk_key):
            params, opt_state, best = carry
            (params, opt_state), losses = jax.lax.scan(
                step, (params, opt_state), jax.random.split(chunk_key, eval_every)
            )
            val_loss, val_acc = evaluate(params, data["val_x"], data["val_y"])
            # Early stopping: keep the parameters with the lowest validation loss so far.
            better = val_loss < best["val_loss"]
            best = jax.tree.map(
                lambda new, old: jnp.where(better, new, old),
                {"params": params, "val_loss": val_loss, "val_acc": val_acc},
                best,
            )
            return (params, opt_state, best), (losses.mean(), val_loss, val_acc)

        best = {"params": params, "val_loss": jnp.inf, "val_acc": jnp.array(0.0)}
        (_, _, best), history = jax.lax.scan(
            chunk, (params, opt_state, best), jax.random.split(key, num_evals)
        )
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
    trainer = make_train(
        cfg.steps, cfg.eval_every, cfg.batch_size, cfg.learning_rate, channels, batched
    )
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


def run_sweeps(
    cfg: Config, data: dict, runs: list[tuple[int, int]], batched: bool | None = None
) -> list[dict]:
    """Train every (channels, n_train) run for every seed; one compilation per width.

    batched: vmap the runs of a width together, sharded over the devices; by default only on an
    accelerator (on CPU it measured no faster, see the module docstring). Results come back in
    the order of `runs`, then seeds, on either path.
    """
    batched = jax.default_backend() != "cpu" if batched is None else batched
    records, bar = {}, tqdm(total=len(runs) * cfg.num_seeds, desc="runs", disable=None)
    for channels in dict.fromkeys(c for c, _ in runs):  # widths in order of first appearance
        jobs = [(n, cfg.seed + s) for c, n in runs if c == channels for s in range(cfg.num_seeds)]
        for (n_train, seed), out in zip(jobs, train_width(cfg, data, channels, jobs, batched)):
            val_loss, val_acc, test_loss, test_acc, (train_l, val_l, val_a) = out
            bad = np.flatnonzero(~np.isfinite(train_l))
            if bad.size:  # checked per chunk of eval_every steps, on the host, after the scan
                raise FloatingPointError(
                    f"training diverged at step {(bad[0] + 1) * cfg.eval_every} (channels="
                    f"{channels}, n_train={n_train}, seed={seed}): loss is {train_l[bad[0]]}; "
                    "try a smaller --learning-rate"
                )
            r = records[(channels, n_train, seed)] = {
                "channels": channels,
                "params": param_count(channels),
                "n_train": n_train,
                "seed": seed,
                "val_loss": float(val_loss),
                "val_acc": float(val_acc),
                "test_loss": float(test_loss),
                "test_acc": float(test_acc),
                "best_step": int((np.argmin(val_l) + 1) * cfg.eval_every),
                "val_loss_curve": [float(v) for v in val_l],
                "train_loss_curve": [float(v) for v in train_l],
            }
            print(
                f"channels={channels} params={r['params']} n_train={n_train} seed={seed} "
                f"val_loss={r['val_loss']:.4f} val_acc={r['val_acc']:.4f} "
                f"best_step={r['best_step']}"
            )
            bar.update()
    bar.close()
    return [records[(c, n, cfg.seed + s)] for c, n in runs for s in range(cfg.num_seeds)]


# %% ---------------------------------------------------------------- power-law fits
def power_law(x: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    """L(x) = E + A x^(-alpha)."""
    return e + a * np.power(x, -alpha)


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Coefficient of determination, 1 - SS_res / SS_tot."""
    return float(1.0 - np.sum((y - y_hat) ** 2) / np.sum((y - y.mean()) ** 2))


def fit_power_law(x: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Fit L = E + A x^(-alpha) by least squares on log L; R^2 is of log L.

    A is fitted as log A and x is rescaled by its geometric mean, so all three parameters are
    of order one for the optimizer; E is kept in [0, min L] (the floor lies below every point).
    """
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    scale = np.exp(np.mean(np.log(x)))

    def log_model(xs, e, log_a, alpha):
        return np.log(e + np.exp(log_a) * np.power(xs / scale, -alpha))

    p0 = (0.5 * loss.min(), np.log(loss.mean()), 0.5)
    bounds = ([0.0, -20.0, 0.0], [loss.min(), 20.0, 5.0])
    with warnings.catch_warnings():  # no covariance when E sits on its bound; we do not use it
        warnings.simplefilter("ignore", OptimizeWarning)
        (e, log_a, alpha), _ = curve_fit(
            log_model, x, np.log(loss), p0=p0, bounds=bounds, maxfev=20000
        )
    a = float(np.exp(log_a) * scale**alpha)  # undo the rescaling: A (x/s)^-a = A s^a x^-a
    r2 = r_squared(np.log(loss), log_model(x, e, log_a, alpha))
    return {"E": float(e), "A": a, "alpha": float(alpha), "r2": r2}


def joint_law(nd: tuple[np.ndarray, np.ndarray], e, a, alpha, b, beta) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    n, d = nd
    return e + a * np.power(n, -alpha) + b * np.power(d, -beta)


def fit_joint_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta on log L, with the same rescaling as above."""
    n, d, loss = np.asarray(n, float), np.asarray(d, float), np.asarray(loss, float)
    sn, sd = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))

    def log_model(nd, e, log_a, alpha, log_b, beta):
        return np.log(
            e + np.exp(log_a) * (nd[0] / sn) ** -alpha + np.exp(log_b) * (nd[1] / sd) ** -beta
        )

    p0 = (0.5 * loss.min(), np.log(loss.mean() / 2), 0.5, np.log(loss.mean() / 2), 0.5)
    bounds = ([0.0, -20.0, 0.0, -20.0, 0.0], [loss.min(), 20.0, 5.0, 20.0, 5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, _ = curve_fit(log_model, (n, d), np.log(loss), p0=p0, bounds=bounds, maxfev=20000)
    e, log_a, alpha, log_b, beta = popt
    r2 = r_squared(np.log(loss), log_model((n, d), *popt))
    return {
        "E": float(e),
        "A": float(np.exp(log_a) * sn**alpha),
        "alpha": float(alpha),
        "B": float(np.exp(log_b) * sd**beta),
        "beta": float(beta),
        "r2": r2,
    }


def aggregate(results: list[dict], key: str) -> dict[tuple[int, int], tuple[float, float]]:
    """(channels, n_train) -> (mean, std over seeds) of results[key]."""
    groups: dict[tuple[int, int], list[float]] = {}
    for r in results:
        groups.setdefault((r["channels"], r["n_train"]), []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in groups.items()}


# %% ---------------------------------------------------------------- figures
def plot_scaling(path, model_pts, data_pts, model_fit, data_fit) -> None:
    """Validation loss (log-log, with fits) and accuracy against N and against D."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (pts, fit, xlabel, name) in enumerate(
        [
            (model_pts, model_fit, "parameters N", "model sweep (all data)"),
            (data_pts, data_fit, "training images D", "data sweep (full model)"),
        ]
    ):
        x = np.array([p["x"] for p in pts])
        ax = axes[0, col]
        ax.errorbar(x, [p["loss"] for p in pts], [p["loss_std"] for p in pts], fmt="o", capsize=3)
        grid = np.geomspace(x.min(), x.max(), 100)
        ax.plot(
            grid,
            power_law(grid, fit["E"], fit["A"], fit["alpha"]),
            "r-",
            label=(
                f"E + A x^-alpha: alpha={fit['alpha']:.3f}, E={fit['E']:.3f}, R²={fit['r2']:.3f}"
            ),
        )
        if fit["E"] > 0.01 * min(p["loss"] for p in pts):  # a floor at ~0 would squash the axis
            ax.axhline(fit["E"], color="gray", ls=":", label="fitted floor E")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="best validation loss (nats)")
        ax.set_title(f"{name}: validation loss")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        ax.errorbar(x, [p["acc"] for p in pts], [p["acc_std"] for p in pts], fmt="o-", capsize=3)
        ax.set(xscale="log", xlabel=xlabel, ylabel="validation accuracy")
        ax.set_title(f"{name}: validation accuracy")
    fig.suptitle("MNIST CNN: validation loss vs model and data size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_joint(path, loss_pts, joint_fit) -> None:
    """Every (N, D) point against D, one line per width, with the joint fit's prediction."""
    fig, ax = plt.subplots(figsize=(7, 5))
    by_channels: dict[int, list] = {}
    for (channels, n_train), (mean, std) in sorted(loss_pts.items()):
        by_channels.setdefault(channels, []).append((n_train, mean, std))
    for i, (channels, pts) in enumerate(sorted(by_channels.items())):
        d, mean, std = map(np.array, zip(*pts))
        n = param_count(channels)
        color = f"C{i}"
        ax.errorbar(d, mean, std, fmt="o", color=color, capsize=3, label=f"N={n}")
        grid = np.geomspace(d.min(), d.max(), 50)
        j = joint_fit
        ax.plot(
            grid,
            joint_law((n, grid), j["E"], j["A"], j["alpha"], j["B"], j["beta"]),
            "-",
            color=color,
            alpha=0.7,
        )
    ax.set(
        xscale="log", yscale="log", xlabel="training images D", ylabel="best validation loss (nats)"
    )
    ax.set_title(
        f"joint fit E + A/N^α + B/D^β: α={joint_fit['alpha']:.2f}, "
        f"β={joint_fit['beta']:.2f}, R²={joint_fit['r2']:.3f}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path, results, channels, eval_every) -> None:
    """Validation loss against step for the data sweep: small subsets overfit, early stopping."""
    fig, ax = plt.subplots(figsize=(7, 5))
    runs = [r for r in results if r["channels"] == channels and r["seed"] == results[0]["seed"]]
    for i, r in enumerate(sorted(runs, key=lambda r: -r["n_train"])):
        steps = eval_every * (np.arange(len(r["val_loss_curve"])) + 1)
        ax.plot(steps, r["val_loss_curve"], "o-", ms=3, color=f"C{i}", label=f"D={r['n_train']}")
        ax.plot(r["best_step"], r["val_loss"], "k*", ms=10)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="validation loss (nats)")
    ax.set_title("full model, same step budget: best point (*) is what the sweep records")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# %% ---------------------------------------------------------------- main
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
        raise option_error(
            "val_size", cfg.val_size, "must be a multiple of 1000 (it is scored in chunks of 1000)"
        )
    if cfg.base_channels < 2 ** (cfg.num_widths - 1):
        raise option_error(
            "base_channels",
            cfg.base_channels,
            f"must be >= 2^(num_widths - 1) = {2 ** (cfg.num_widths - 1)} for --num-widths "
            f"{cfg.num_widths}, so that the narrowest model keeps >= 1 channel",
        )
    if cfg.steps % cfg.eval_every:
        raise option_error("eval_every", cfg.eval_every, f"must divide --steps {cfg.steps}")
    smallest = (NUM_TRAIN_FULL - cfg.val_size) // 2 ** (cfg.num_data_sizes - 1)
    if smallest < 10:
        raise option_error(
            "num_data_sizes",
            cfg.num_data_sizes,
            f"leaves {smallest} images in the smallest subset (with --val-size {cfg.val_size}); "
            "need >= 10",
        )
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    validate(cfg)
    t0 = time.perf_counter()
    data = load_splits(cfg)
    num_train = data["train_x"].shape[0]

    widths = [cfg.base_channels // 2**k for k in range(cfg.num_widths)]  # channels, widest first
    sizes = [num_train // 2**k for k in range(cfg.num_data_sizes)]  # n_train, largest first
    full_c, full_d = widths[0], sizes[0]
    runs = [(full_c, d) for d in sizes] + [(c, full_d) for c in widths[1:]]
    if cfg.joint_grid:  # narrower models on every other smaller data size
        runs += [(c, d) for c in widths[1:] for d in sizes[2::2]]

    batched = jax.default_backend() != "cpu"  # see run_sweeps and the module docstring
    sweep_start = time.perf_counter()
    results = run_sweeps(cfg, data, runs, batched)
    sweep_seconds = time.perf_counter() - sweep_start

    losses, accs = aggregate(results, "val_loss"), aggregate(results, "val_acc")

    def points(keys, xs):
        return [
            {
                "x": x,
                "loss": losses[k][0],
                "loss_std": losses[k][1],
                "acc": accs[k][0],
                "acc_std": accs[k][1],
            }
            for k, x in zip(keys, xs)
        ]

    model_pts = points([(c, full_d) for c in widths], [param_count(c) for c in widths])
    data_pts = points([(full_c, d) for d in sizes], sizes)
    model_fit = fit_power_law([p["x"] for p in model_pts], [p["loss"] for p in model_pts])
    data_fit = fit_power_law([p["x"] for p in data_pts], [p["loss"] for p in data_pts])
    keys = sorted(losses)
    joint_fit = fit_joint_law(
        [param_count(c) for c, _ in keys], [d for _, d in keys], [losses[k][0] for k in keys]
    )

    full = [r for r in results if r["channels"] == full_c and r["n_train"] == full_d]
    metrics = {
        "task": "scaling_laws",
        "seed": cfg.seed,
        "num_seeds": cfg.num_seeds,
        "num_runs": len(results),
        **{f"model_{k}": v for k, v in model_fit.items()},
        **{f"data_{k}": v for k, v in data_fit.items()},
        **{f"joint_{k}": v for k, v in joint_fit.items()},
        "model_r2_target": 0.95,
        "data_r2_target": 0.95,
        "params_min": param_count(widths[-1]),
        "params_max": param_count(full_c),
        "n_train_min": sizes[-1],
        "n_train_max": full_d,
        "full_val_loss": float(np.mean([r["val_loss"] for r in full])),
        "full_val_accuracy": float(np.mean([r["val_acc"] for r in full])),
        "full_test_accuracy": float(np.mean([r["test_acc"] for r in full])),
        "steps_per_run": cfg.steps,
        "preset": getattr(cfg, "preset", "cpu"),
        **device_info(),
        "runs_vmapped": int(batched),
        # optimizer steps of all runs per second of the sweep, compilation included
        "throughput": len(results) * cfg.steps / sweep_seconds,
        "throughput_unit": "steps/s",
        "wall_time_s": time.perf_counter() - t0,
        "wall_time_target_s": 300.0,
    }
    metrics = {
        k: (v if isinstance(v, str) else float(v) if isinstance(v, float) else int(v))
        for k, v in metrics.items()
    }
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )
    with staged_run(cfg.out_dir) as out:
        plot_scaling(out / "scaling.png", model_pts, data_pts, model_fit, data_fit)
        plot_joint(out / "joint.png", losses, joint_fit)
        plot_curves(out / "curves.png", results, full_c, cfg.eval_every)
        (out / "runs.json").write_text(json.dumps(results, allow_nan=False))
        write_metrics(out, cfg, metrics)
    return metrics


if __name__ == "__main__":
    run_cli()
