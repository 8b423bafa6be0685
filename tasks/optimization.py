"""SGD, momentum, Nesterov and Adam written by hand, checked against optax on real MNIST.

What it teaches: an optimizer is two pure functions over pytrees, `state = init(params)` and
`updates, state = update(grads, state, params)`; four classic ones fit in a few lines of
`jax.tree.map` and, behind optax's interface, replace optax's own. One CNN, one initialisation,
one batch order: each optimizer trains two twins, one updated by our code and one by optax's, and
their gap is measured after every step. With step size eta, momentum mu and gradient g_t at step
t = 1, 2, ... (Sutskever et al. 2013; Kingma & Ba 2015, "Adam"):

    SGD        u_t = -eta g_t
    momentum   m_t = g_t + mu m_{t-1},  u_t = -eta m_t                (Polyak; heavy ball)
    Nesterov   m_t = g_t + mu m_{t-1},  u_t = -eta (g_t + mu m_t)
    Adam       m_t = b1 m_{t-1} + (1 - b1) g_t,  v_t = b2 v_{t-1} + (1 - b2) g_t^2,
               u_t = -eta m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)

    python tasks/optimization.py
    python tasks/optimization.py --help
    python studies/optimization_trajectory.py   # the gap and the time of every step, drawn

Expected at defaults: the four pairs are bit-identical along all 3,000 steps (gap 0; bar 1e-5), so
hand and optax test accuracies are equal: SGD 98.53%, momentum 98.71%, Nesterov 98.70%, Adam
98.71% (bar: Adam >= 98.5%). About 128 s on 2 CPU cores (bar 240 s). More: docs/optimization.md.
No differences from the papers (Nesterov as optax and PyTorch write it, with the gradient at the
current parameters); no preset: the question needs no scale.
"""

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
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from tqdm.auto import tqdm

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
LR = ("sgd_learning_rate", "momentum_learning_rate", "momentum_learning_rate", "adam_learning_rate")
LEARNING_RATE_OPTION = dict(zip(OPTIMIZERS, LR))


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


# %%
@dataclass(frozen=True)
class Config:  # defaults chosen on the validation split (docs/optimization.md: settings tried)
    seed: int = 0  # Random seed: initialisation, validation split and batch order.
    out_dir: str = "runs/optimization"  # Folder for metrics.json and the figures.
    num_steps: int = 3000  # Optimizer steps per run (about 3.5 epochs of 55,000 images).
    batch_size: int = 64  # Images per step.
    sgd_learning_rate: float = 0.1  # Step size of plain SGD.
    momentum_learning_rate: float = 0.01  # Step size of heavy-ball and Nesterov momentum.
    momentum: float = 0.9  # Momentum mu of the heavy-ball and Nesterov runs.
    adam_learning_rate: float = 1e-3  # Step size of Adam (b1 0.9, b2 0.999, eps 1e-8).
    val_size: int = 5000  # Training images held out to choose the settings (validation split).
    train_size: int = 0  # Training images used after the split; 0 means all (55,000).
    log_every: int = 250  # Steps between log lines and checks that the loss is finite.


PRESETS: dict[str, Config] = {"cpu": Config()}


# %% [markdown]
# ## Optimizers by hand
# Each returns optax's own `GradientTransformation` (a `NamedTuple` of two pure functions). Adam's
# bias correction matters most at $t = 1$: it turns $m_1 = (1-\beta_1) g$ back into $g$, so the
# first step is $-\eta\, g / (|g| + \epsilon)$, about $\eta\,\mathrm{sign}(g)$. **Bit for bit**:
# XLA rewrites each program on its own, and each rewrite rounds differently; computing the two
# bias-correction scalars once, outside `tree.map` as optax does, keeps the twins bit-identical.
# %%
class SgdState(NamedTuple):
    trace: Any  # the momentum buffer m_{t-1}, a pytree like params; () for plain SGD


class AdamState(NamedTuple):
    count: jax.Array  # t - 1, the number of updates done so far (int32, as in optax)
    mu: Any  # first moment m_{t-1}
    nu: Any  # second moment v_{t-1}


def sgd(learning_rate: float, momentum: float = 0.0, nesterov: bool = False):
    """SGD, optionally with heavy-ball or Nesterov momentum, as a GradientTransformation."""

    def init(params):
        return SgdState(trace=() if momentum == 0.0 else jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        if momentum == 0.0:
            return jax.tree.map(lambda g: -learning_rate * g, grads), state
        trace = jax.tree.map(lambda g, m: g + momentum * m, grads, state.trace)  # m_t
        # heavy ball steps along m_t; Nesterov looks ahead along it, g_t + mu m_t
        direction = jax.tree.map(lambda g, m: g + momentum * m, grads, trace) if nesterov else trace
        return jax.tree.map(lambda d: -learning_rate * d, direction), SgdState(trace=trace)

    return optax.GradientTransformation(init, update)


def adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam (Kingma & Ba 2015, Algorithm 1) as a GradientTransformation."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(grads, state, params=None):
        count = state.count + 1  # this is step t
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g**2 + b2 * v, grads, state.nu)
        correction1, correction2 = 1 - b1**count, 1 - b2**count  # once ("bit for bit" above)
        mu_hat = jax.tree.map(lambda m: m / correction1, mu)
        nu_hat = jax.tree.map(lambda v: v / correction2, nu)
        step = lambda m, v: -learning_rate * (m / (jnp.sqrt(v) + eps))
        return jax.tree.map(step, mu_hat, nu_hat), AdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_optimizers(cfg: Config) -> dict[str, tuple]:  # name -> (ours, optax's), same settings
    lr_m, mu = cfg.momentum_learning_rate, cfg.momentum
    return {
        "sgd": (sgd(cfg.sgd_learning_rate), optax.sgd(cfg.sgd_learning_rate)),
        "momentum": (sgd(lr_m, mu), optax.sgd(lr_m, mu)),
        "nesterov": (sgd(lr_m, mu, nesterov=True), optax.sgd(lr_m, mu, nesterov=True)),
        "adam": (adam(cfg.adam_learning_rate), optax.adam(cfg.adam_learning_rate)),
    }


# %% [markdown]
# ## Data, model, loss and jitted step
# Real MNIST, a random validation split, one batch order; a CNN split into a fixed `graphdef` and
# the parameters the optimizers see; a jitted step. The twins' gap, over parameter arrays $\ell$:
# $\max_\ell \|\theta^\text{hand}_\ell - \theta^\text{optax}_\ell\| / \|\theta^\text{optax}_\ell\|$.
# %%
def split_data(cfg: Config, mnist: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hold out `val_size` random training images; optionally keep only `train_size` of the rest."""
    order = np.random.default_rng(cfg.seed).permutation(len(mnist["y_train"]))
    val, train = order[: cfg.val_size], order[cfg.val_size :]
    parts = {"train": train[: cfg.train_size] if cfg.train_size else train, "val": val}
    split = {f"{xy}_{name}": mnist[f"{xy}_train"][i] for name, i in parts.items() for xy in "xy"}
    return split | {"x_test": mnist["x_test"], "y_test": mnist["y_test"]}


def batch_indices(cfg: Config, num_train: int) -> np.ndarray:
    """The one batch order every run shares: a fresh permutation each epoch, (num_steps, batch)."""
    rng = np.random.default_rng(cfg.seed + 1)
    epochs = -(-cfg.num_steps * cfg.batch_size // num_train)  # ceil
    order = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])
    return order[: cfg.num_steps * cfg.batch_size].reshape(cfg.num_steps, cfg.batch_size)


def to_input(images_u8: jax.Array) -> jax.Array:  # uint8 (B, 28, 28) -> standardised (B, 28, 28, 1)
    return ((images_u8.astype(jnp.float32) / 255.0 - 0.1307) / 0.3081)[..., None]


class CNN(nnx.Module):
    """Two stride-2 convolutions (28 -> 14 -> 7 px), a 128-unit hidden layer, a head: 207k params"""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (5, 5), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.hidden = nnx.Linear(7 * 7 * 32, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):  # (B, 28, 28, 1) -> (B, 10) logits
        x = jax.nn.relu(self.conv1(x))  # (B, 14, 14, 16)
        x = jax.nn.relu(self.conv2(x))  # (B, 7, 7, 32)
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))  # (B, 128)
        return self.head(x)


def relative_gap(params_a, params_b) -> jax.Array:  # 0 when the two runs are identical
    rel = lambda a, b: jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)
    return jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(rel, params_a, params_b))))


def make_train_step(graphdef, tx):
    """One jitted optimizer step: gradient on the batch `idx`, update by `tx`, apply the update."""

    def loss_fn(params, images_u8, labels):  # cross-entropy of the batch
        logits = nnx.merge(graphdef, params)(to_input(images_u8))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, x_train, y_train, idx):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss  # our updates, optax's apply

    return train_step


# %% [markdown]
# ## Train and evaluate
# The twins of each optimizer step in lockstep on the same batches. Then: test accuracy of every
# twin (validation accuracy chose the settings), the largest gap, and each bar beside its metric.
# %%
def train_pair(cfg: Config, name: str, txs, graphdef, params0, data, indices) -> dict:
    """Train the hand and the optax twin of one optimizer from params0 on the same batches. A host
    loop, not lax.scan: XLA's CPU convolutions in a while loop ran about 7x slower (measured)."""
    steps = [make_train_step(graphdef, tx) for tx in txs]
    params, states = [params0, params0], [tx.init(params0) for tx in txs]
    gap_fn = jax.jit(relative_gap)
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"], jnp.int32)
    losses, gaps = [[], []], []
    bounds = list(range(0, cfg.num_steps, cfg.log_every)) + [cfg.num_steps]
    for a, b in tqdm(list(zip(bounds[:-1], bounds[1:])), desc=name, disable=None):
        for idx in jnp.asarray(indices[a:b]):
            for k in range(2):  # 0 = by hand, 1 = optax, on the very same batch
                params[k], states[k], loss = steps[k](params[k], states[k], x_train, y_train, idx)
                losses[k].append(float(loss))
            gaps.append(float(gap_fn(params[0], params[1])))
        for impl, loss in [(i, ls[-1]) for i, ls in zip(("hand", "optax"), losses)]:
            if not math.isfinite(loss):
                option = "--" + LEARNING_RATE_OPTION[name].replace("_", "-")
                msg = f"training diverged at step {b} ({name}, {impl}): loss is {loss}"
                raise FloatingPointError(f"{msg}; try a smaller {option}")
        print(f"opt={name} step={b} loss_hand={losses[0][-1]:.4f} "
              f"loss_optax={losses[1][-1]:.4f} max_gap={max(gaps):.3g}")  # fmt: skip
    res = {f"loss_{impl}": np.asarray(losses[k]) for k, impl in enumerate(("hand", "optax"))}
    return res | {"params_hand": params[0], "params_optax": params[1], "gap": np.asarray(gaps)}


@functools.partial(jax.jit, static_argnums=0)
def predict(graphdef, params, images_u8: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(to_input(images_u8)).argmax(-1)


def accuracy(graphdef, params, images_u8: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correctly classified images, in batches of 1,000 to bound memory."""
    chunks = [images_u8[i : i + 1000] for i in range(0, len(labels), 1000)]
    predictions = np.concatenate([predict(graphdef, params, x) for x in chunks])
    return float((predictions == labels).mean())


def evaluate(cfg: Config, results: dict, graphdef, data: dict) -> dict:
    """Per-optimizer metrics and the bars; adds the test accuracies to `results` for the figure."""
    m: dict = {"task": "optimization", "seed": cfg.seed, "num_steps": cfg.num_steps}
    for name, res in results.items():
        for impl in ("hand", "optax"):
            params = res[f"params_{impl}"]
            res[f"acc_{impl}"] = accuracy(graphdef, params, data["x_test"], data["y_test"])
            m[f"test_accuracy_{name}_{impl}"] = res[f"acc_{impl}"]
            val = accuracy(graphdef, params, data["x_val"], data["y_val"])
            m[f"val_accuracy_{name}_{impl}"] = val
            m[f"final_train_loss_{name}_{impl}"] = float(res[f"loss_{impl}"][-100:].mean())
        m[f"max_rel_param_diff_{name}"] = float(res["gap"].max())
        m[f"rel_param_diff_at_200_{name}"] = float(res["gap"][:200][-1])
    acc = lambda o, impl: m[f"test_accuracy_{o}_{impl}"]
    m["max_rel_param_diff"] = max(m[f"max_rel_param_diff_{o}"] for o in OPTIMIZERS)
    m["max_accuracy_gap"] = max(abs(acc(o, "hand") - acc(o, "optax")) for o in OPTIMIZERS)
    m |= {"max_rel_param_diff_ceiling": 1e-5, "max_accuracy_gap_ceiling": 0.001}
    return m | {"test_accuracy_adam_hand_target": 0.985, "wall_time_s_ceiling": 240}


# %% [markdown]
# ## Figure and main
# The training losses of the twins: optax's dashed line lies on the hand-written one (the gap and
# the time of every step: studies/optimization_trajectory.py). `main` validates every option
# before any work, trains the four pairs, evaluates, and writes `metrics.json` last, atomically.
# %%
def plot_loss_curves(results: dict, cfg: Config, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    width = max(1, min(cfg.num_steps // 50, cfg.num_steps))
    smooth = lambda x: np.convolve(x, np.ones(width) / width, mode="valid")
    steps = np.arange(width, cfg.num_steps + 1)
    for color, (name, res) in zip(("C0", "C1", "C2", "C3"), results.items()):
        label = f"{name}: test {res['acc_hand']:.2%} (hand) / {res['acc_optax']:.2%} (optax)"
        ax.plot(steps, smooth(res["loss_hand"]), lw=4, alpha=0.45, color=color, label=label)
        ax.plot(steps, smooth(res["loss_optax"]), lw=1.3, ls="--", color="k")
    ax.plot([], [], lw=1.3, ls="--", color="k", label="optax twin (dashed)")
    ax.set(yscale="log", xlabel="step", ylabel=f"training loss (nats, mean of {width} steps)")
    ax.set_title("Optimizers by hand (thick) vs optax (dashed)\nsame CNN, init and batches")
    ax.legend(fontsize=9, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def validate(cfg: Config) -> None:
    """Raise a one-line ValueError naming the option, before any data, model or compile work."""
    check_number(cfg, "seed", 0, 2**32 - 1, high_open=True)  # batch order uses seed + 1
    check_number(cfg, "num_steps", 1, 10**7)
    check_number(cfg, "val_size", 1, 59_999)
    check_number(cfg, "train_size", 0, 60_000 - cfg.val_size)  # 0 = all after the split
    check_number(cfg, "batch_size", 1, cfg.train_size or 60_000 - cfg.val_size)  # <= one epoch
    for name in dict.fromkeys(LEARNING_RATE_OPTION.values()):
        check_number(cfg, name, 0, 1, low_open=True)
    check_number(cfg, "momentum", 0, 1, high_open=True)
    check_number(cfg, "log_every", 1, 10**7)
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data = split_data(cfg, load_mnist())
    indices = batch_indices(cfg, len(data["y_train"]))
    graphdef, params0 = nnx.split(CNN(nnx.Rngs(cfg.seed)))  # structure, and the params to train
    timer.lap("setup")  # each step compiles on its first call, inside training
    results = {
        name: train_pair(cfg, name, txs, graphdef, params0, data, indices)
        for name, txs in make_optimizers(cfg).items()
    }
    train_s = timer.lap("train") - timer.split["setup"]
    metrics = evaluate(cfg, results, graphdef, data)
    metrics["throughput"] = 8 * cfg.num_steps / train_s  # twin steps per second, compile included
    timer.lap("evaluate")
    metrics |= {"throughput_unit": "steps/s", "preset": getattr(cfg, "preset", "cpu")}
    metrics |= device_info()
    with staged_run(cfg.out_dir) as out:
        plot_loss_curves(results, cfg, out / "loss_curves.png")
        metrics["wall_time_s"], metrics["time_split_s"] = timer.lap("figures"), timer.split
        write_metrics(out, cfg, metrics)  # written last and atomically
    print(" ".join(f"{k}={metrics[k]:.4g}" for k in ("max_rel_param_diff", "max_accuracy_gap",
                    "test_accuracy_adam_hand", "throughput", "wall_time_s")))  # fmt: skip
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
