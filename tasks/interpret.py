"""Deep dream, class visualisation and a measured report on how an MNIST CNN recognises digits.

What it teaches: feature visualisation by gradient ascent on the *input* of a trained network,
and how to check what those pictures suggest with measurements instead of eyeballing them.
A small CNN is trained on real MNIST to >= 99% test accuracy. Class visualisation (Simonyan et
al. 2014, "Deep Inside Convolutional Networks") grows from faint noise x* = argmax_{x in [0,1]}
z_c(jitter(x)) - lambda_2 ||x||^2 - lambda_TV TV(x); deep dream (Mordvintsev et al. 2015,
"Inceptionism") runs the same ascent from a real digit on 0.5 mean(a(jitter(x))^2), the energy of
a layer's activations. report.md holds 4 measured findings, each worded by the numbers it quotes.

    python tasks/interpret.py     # --help: every option; more probes: studies/interpret_probes.py

Expected at defaults (seed 0): 99.20% test accuracy, every class visualisation read as its digit
with confidence 1.000 (bar 0.9), 4 findings (bar 4); runtime: docs/interpret.md (bar 180 s).
Differences from the papers: a tiny network on 28x28 images, so a jitter of 1-2 pixels and no
octaves; both ascents use Adam and clip to [0, 1]; convolutions are im2col and a matrix product
(XLA's CPU convolution took about 20x more CPU time per step). No paper preset.
"""

import contextlib
import dataclasses
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

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from tqdm.auto import tqdm


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


# %% [markdown]
# ## Config and data
# The last `val_size` MNIST training images are the validation split; pixels are in $[0, 1]$.
# %%
@dataclass(frozen=True)
class Config:
    seed: int = 0  # random seed (initialisation, batch order, noise and jitter)
    out_dir: str = "runs/interpret"  # folder for metrics.json, report.md and the figures
    train_size: int = 55_000  # training images used (at most 60000 - val_size)
    val_size: int = 5_000  # images held out from the end of the training file, for every choice
    epochs: int = 3  # passes over the training images
    batch_size: int = 128  # images per Adam step
    learning_rate: float = 2e-3  # peak Adam learning rate; it decays to 0 on a cosine schedule
    width: int = 16  # channels of the first conv layer; the second has twice as many
    vis_steps: int = 256  # ascent steps of each class visualisation (deep dream: 1/4 of them)


PRESETS: dict[str, Config] = {"cpu": Config()}


def load_splits(cfg: Config) -> dict[str, np.ndarray]:
    mnist = load_mnist()
    x_all, y_all = mnist["x_train"], mnist["y_train"]
    return dict(x_train=x_all[: cfg.train_size], y_train=y_all[: cfg.train_size],
                x_val=x_all[-cfg.val_size :], y_val=y_all[-cfg.val_size :],
                x_test=mnist["x_test"], y_test=mnist["y_test"])  # fmt: skip


def to_input(x_u8: jax.Array) -> jax.Array:  # uint8 (B, 28, 28) -> float (B, 28, 28, 1)
    return (x_u8.astype(jnp.float32) / 255.0)[..., None]


# %% [markdown]
# ## Model and training
# conv5x5 - ReLU - pool - conv3x3 - ReLU - pool - dense - dense; a convolution is a matrix product
# on image patches (im2col), $\mathrm{out}[b,h,w] = W^\top \mathrm{patch}[b,h,w] + b$. Adam with a
# cosine-decayed step size on the cross-entropy, one jitted `lax.scan` per epoch.
# %%
class PatchConv(nnx.Module):  # a stride-1 'SAME' convolution: im2col, then a Linear
    def __init__(self, c_in: int, c_out: int, k: int, rngs: nnx.Rngs):
        self.k, self.linear = k, nnx.Linear(k * k * c_in, c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H, W, c_out)
        k, p, (h, w) = self.k, self.k // 2, x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        patches = [xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]
        return self.linear(jnp.concatenate(patches, -1))


def max_pool2(h: jax.Array) -> jax.Array:  # 2 x 2 max-pooling of (B, H, W, C)
    return h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, -1).max(axis=(2, 4))


class CNN(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.conv1 = PatchConv(1, width, 5, rngs)
        self.conv2 = PatchConv(width, 2 * width, 3, rngs)
        self.fc1 = nnx.Linear(7 * 7 * 2 * width, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def forward(self, x: jax.Array):
        """x (B, 28, 28, 1) in [0, 1] -> logits (B, 10), {layer: post-ReLU map (B, H, W, C)}."""
        a1 = jax.nn.relu(self.conv1((x - 0.1307) / 0.3081))  # (B, 28, 28, w)
        a2 = jax.nn.relu(self.conv2(max_pool2(a1)))  # (B, 14, 14, 2w)
        h = jax.nn.relu(self.fc1(max_pool2(a2).reshape(x.shape[0], -1)))
        return self.fc2(h), {"conv1": a1, "conv2": a2}

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x)[0]


def train(cfg: Config, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray):
    """-> (model, [(train loss, val_acc) per epoch], training steps/s after the first epoch)."""
    key, init_key = jax.random.split(jax.random.key(cfg.seed))
    graphdef, params = nnx.split(CNN(cfg.width, nnx.Rngs(init_key)))
    steps = len(x) // cfg.batch_size
    tx = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps))

    def loss_fn(params, xb, yb):  # xb uint8 (B, 28, 28), yb (B,)
        logits = nnx.merge(graphdef, params)(to_input(xb))
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, batch):
        loss, grads = jax.value_and_grad(loss_fn)(carry[0], *batch)
        updates, opt_state = tx.update(grads, carry[1], carry[0])
        return (optax.apply_updates(carry[0], updates), opt_state), loss

    @jax.jit
    def epoch_fn(params, opt_state, x_u8, y, key):  # one shuffled pass: a lax.scan of Adam steps
        idx = jax.random.permutation(key, len(x_u8))[: steps * cfg.batch_size].reshape(steps, -1)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (x_u8[idx], y[idx]))
        return params, opt_state, losses.mean()

    opt_state, history, seconds = tx.init(params), [], []
    for epoch in tqdm(range(cfg.epochs), desc="train", disable=None):
        (key, sub), start = jax.random.split(key), time.perf_counter()
        params, opt_state, loss = epoch_fn(params, opt_state, jnp.asarray(x), jnp.asarray(y), sub)
        loss = float(loss)  # waits for the epoch
        seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged by epoch {epoch + 1}: mean loss is "
                                     f"{loss}; try a smaller --learning-rate")  # fmt: skip
        history.append((loss, accuracy(nnx.merge(graphdef, params), x_val, y_val)))
        print(f"epoch={epoch + 1} train_loss={loss:.4f} val_accuracy={history[-1][1]:.4f}")
    timed = seconds[1:] or seconds  # the first epoch also compiles
    return nnx.merge(graphdef, params), history, len(timed) * steps / sum(timed)


@jax.jit
def logits_of(model: CNN, x_u8: jax.Array) -> jax.Array:
    return model(to_input(x_u8))


def accuracy(model: CNN, x_u8: np.ndarray, y: np.ndarray) -> float:  # 1,000 images at a time
    logits = [logits_of(model, x_u8[s : s + 1000]) for s in range(0, len(x_u8), 1000)]
    return float((np.concatenate(logits).argmax(1) == y).mean())


# %% [markdown]
# ## Gradient ascent on the input
# Class visualisation and deep dream are one loop: Adam steps on the *input* $x$, clipped to
# $[0, 1]$, maximising a score $s$ of the jittered (rolled 1-2 pixels) image minus regularisers:
# $$x^* = \arg\max_x\; s(\mathrm{jitter}(x)) - \lambda_2 \|x\|^2 - \lambda_{TV}\,
#   \mathrm{TV}(x), \qquad \mathrm{TV}(x) = \sum_{ij} |x_{i+1,j} - x_{ij}| + |x_{i,j+1} - x_{ij}|.$$
# Class visualisation: from faint noise, $s = z_c$, the logit of class $c$. Deep dream: from a
# real digit, $s = \tfrac12 \mathrm{mean}(a^2)$ of conv2 (or one channel), amplifying what it sees.
# %%
def ascend(score, x0, key, steps: int, learning_rate=0.05, l2=0.05, tv=0.05, jitter=2):
    """Maximise score(jitter(x)) (B,) - l2 ||x||^2 - tv TV(x) over x (B, 28, 28, 1) by Adam."""
    tx = optax.adam(learning_rate)

    def objective(x, key):
        dy, dx = jax.random.randint(key, (2,), -jitter, jitter + 1)  # jitter: a wrapping roll
        tv_x = sum(jnp.abs(jnp.diff(x, axis=a)).sum((1, 2, 3)) for a in (1, 2))
        return (score(jnp.roll(x, (dy, dx), (1, 2))) - l2 * (x**2).sum((1, 2, 3)) - tv * tv_x).sum()

    def step(carry, key):
        x, opt_state = carry
        updates, opt_state = tx.update(-jax.grad(objective)(x, key), opt_state)
        return (jnp.clip(x + updates, 0.0, 1.0), opt_state), None

    run = jax.jit(lambda x, keys: jax.lax.scan(step, (x, tx.init(x)), keys)[0][0])
    return run(x0, jax.random.split(key, steps))


def class_visualisations(model: CNN, key: jax.Array, steps: int = 256) -> jax.Array:
    """One image per digit (10, 28, 28, 1) in [0, 1], from noise, maximising its class logit."""
    x0 = jax.random.uniform(jax.random.fold_in(key, 1), (10, 28, 28, 1), maxval=0.2)
    return ascend(lambda x: jnp.diagonal(model(x)), x0, key, steps)


def deep_dream(model: CNN, images, key, channels, steps: int = 64, learning_rate=0.02):
    """Amplify in image b conv2's channel channels[b] (-1: all of conv2): 0.5 mean(a^2)."""
    weights = jnp.where(channels[:, None] < 0, 1 / model.conv2.linear.out_features,
                        jax.nn.one_hot(channels, model.conv2.linear.out_features))  # fmt: skip
    score = lambda x: (0.5 * (model.forward(x)[1]["conv2"] ** 2).mean((1, 2)) * weights).sum(1)
    return ascend(score, images, key, steps, learning_rate, l2=0.0, tv=0.0, jitter=1)


# %% [markdown]
# ## Measurements
# Class visualisations against each class's mean training digit (pixel correlation $r$); one test
# digit per class dreamt with conv2: how much does its energy grow, is it still read as itself?
# %%
def measure(cfg: Config, model: CNN, data: dict) -> tuple[dict, dict]:
    key, sub = jax.random.split(jax.random.key(cfg.seed + 1))  # train uses cfg.seed
    vis = class_visualisations(model, sub, steps=cfg.vis_steps)  # (10, 28, 28, 1)
    i, probs = np.arange(10), np.asarray(jax.nn.softmax(model(vis)))
    means = np.stack([data["x_train"][data["y_train"] == c].mean(0) / 255 for c in range(10)])
    corr = np.corrcoef(np.concatenate([np.asarray(vis).reshape(10, -1), means.reshape(10, -1)]))
    corr = corr[:10, 10:]  # (vis c, mean d)
    x0 = to_input(jnp.asarray(data["x_test"][[np.argmax(data["y_test"] == c) for c in i]]))
    dreams = deep_dream(model, x0, jax.random.split(key)[1], -jnp.ones(10, int),
                        max(cfg.vis_steps // 4, 1))  # fmt: skip
    energy = lambda x: np.asarray((model.forward(x)[1]["conv2"] ** 2).mean((1, 2, 3)))
    p_dream, hits = np.asarray(jax.nn.softmax(model(dreams))), lambda p: int(sum(p.argmax(1) == i))
    m = {"min_classvis_confidence": probs[i, i].min(), "min_classvis_confidence_target": 0.9,
         "mean_classvis_confidence": probs[i, i].mean(), "classvis_correct": hits(probs),
         "classvis_corr_own_mean": np.diag(corr).mean(), "classvis_best_match": hits(corr),
         "classvis_corr_other_mean": corr[~np.eye(10, dtype=bool)].mean(),
         "dream_energy_gain": (energy(dreams) / energy(x0)).mean(),
         "dream_pixel_change": np.abs(dreams - x0).mean(), "dream_layer_kept": hits(p_dream),
         "dream_layer_confidence": p_dream[i, i].mean()}  # fmt: skip
    images = [np.asarray(a[..., 0]) for a in (vis, x0, dreams)]
    return m, dict(images=images, p_vis=probs[i, i], means=means, r=np.diag(corr), p=p_dream[i, i])


# %% [markdown]
# ## The report
# Each finding's wording follows a threshold on this run's numbers, so it never claims more.
# %%
def report(m: dict) -> tuple[list[str], list[str]]:
    prototype = m["classvis_best_match"] >= 7 and (
        m["classvis_corr_own_mean"] > m["classvis_corr_other_mean"])  # fmt: skip
    gain, kept = m["dream_energy_gain"] >= 2, m["dream_layer_kept"] >= 8
    findings = [  # each quotes its numbers, worded by the thresholds above
        f"**Class visualisations {'are' if m['min_classvis_confidence'] >= 0.9 else 'are not all'}"
        f" confidently read as their digit.** Images grown from noise to maximise each logit are "
        f"read as their digit in {m['classvis_correct']}/10 cases; the lowest confidence is "
        f"{m['min_classvis_confidence']:.3f} (mean {m['mean_classvis_confidence']:.3f}, bar 0.9).",
        f"**Class visualisations {'resemble' if prototype else 'do not clearly resemble'} the "
        f"average digit.** Pixel correlation with their own class's mean training digit: "
        f"{m['classvis_corr_own_mean']:.2f} on average, against {m['classvis_corr_other_mean']:.2f}"
        f" with the other classes' means; the best match for {m['classvis_best_match']}/10.",
        f"**Deep dream {'amplifies' if gain else 'barely amplifies'} what conv2 sees.** Ascent on"
        f" conv2's energy 0.5 mean(a^2) from a real digit multiplies it by "
        f"{m['dream_energy_gain']:.1f} on average, changing the pixels by "
        f"{m['dream_pixel_change']:.3f} on average (in [0, 1]).",
        f"**Dreaming all of conv2 {'keeps' if kept else 'does not keep'} the digit** (it keeps its"
        f" label in {m['dream_layer_kept']}/10, mean p(label) {m['dream_layer_confidence']:.3f}):"
        f" amplifying all a layer sees {'reinforces' if kept else 'blurs'} the evidence there.",
    ]
    return findings, ["# What the MNIST CNN looks at: measured findings", "",
        f"A CNN of width {m['width']} trained for {m['epochs']} epochs reaches "
        f"{100 * m['test_accuracy']:.2f}% test accuracy (validation {100 * m['val_accuracy']:.2f}%"
        f", seed {m['seed']}). More probes: studies/interpret_probes.py.", "",
        *[f"{n + 1}. {f}" for n, f in enumerate(findings)]]  # fmt: skip


# %% [markdown]
# ## Figures
# 2 x 5 mosaics: the class visualisations beside the class means (the README figure); the dreams.
# %%
def mosaics(panels: list[tuple], path: pathlib.Path) -> None:
    """panels: (images (10, 28, 28), a note per image, title) -> one 2 x 5 mosaic per panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.1))
    for ax, (images, notes, title) in zip(axes, panels):
        tiles = np.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=0.5)
        ax.imshow(tiles.reshape(2, 5, 30, 30).transpose(0, 2, 1, 3).reshape(60, 150),
                  cmap="gray", vmin=0, vmax=1)  # fmt: skip
        for c in range(10):
            x, y = 30 * (c % 5) + 2, 30 * (c // 5) + 2
            ax.text(x, y, str(c), color="yellow", fontsize=11, va="top", weight="bold")
            ax.text(x + 26, y + 26, notes[c], color="cyan", fontsize=7, ha="right")
        ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


# %% [markdown]
# ## Main
# Validate, load, train, measure, then write the report, the figures and `metrics.json` (last).
# %%
def validate(cfg: Config) -> None:
    """Raise a one-line ValueError naming the option, before any data, model or compile work."""
    check_number(cfg, "seed", 0, 2**32 - 1, high_open=True)  # the dream key uses seed + 1
    check_number(cfg, "val_size", 1000, 59_999)  # >= 1000: every digit in it, for selectivity
    for name, high in (("train_size", 60_000 - cfg.val_size), ("epochs", 1000), ("width", 256),
                       ("vis_steps", 100_000), ("batch_size", cfg.train_size)):  # fmt: skip
        check_number(cfg, name, 1, high)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data = load_splits(cfg)
    timer.lap("setup")  # the model is built and compiled inside train
    model, history, rate = train(cfg, *(data[n] for n in ("x_train", "y_train", "x_val", "y_val")))
    timer.lap("train")
    m = {"task": "interpret", "seed": cfg.seed, "epochs": cfg.epochs, "width": cfg.width,
         "test_accuracy": accuracy(model, data["x_test"], data["y_test"]),
         "test_accuracy_target": 0.99, "val_accuracy": history[-1][1],
         "final_train_loss": history[-1][0], "throughput": rate,
         "throughput_unit": "steps/s"}  # fmt: skip
    print(f"test_accuracy={m['test_accuracy']:.4f}")
    measured, arrays = measure(cfg, model, data)
    findings, lines = report(m := m | measured)
    m |= {"num_findings": len(findings), "num_findings_target": 4, "wall_time_s_ceiling": 180,
          "preset": getattr(cfg, "preset", "cpu"), **device_info()}  # fmt: skip
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:
        (out / "report.md").write_text("\n".join(lines) + "\n")
        (vis, original, dream), ps = arrays["images"], lambda v: [f"p={p:.2f}" for p in v]
        means, r = arrays["means"] / arrays["means"].max((1, 2), keepdims=True), arrays["r"]
        mosaics([(vis, ps(arrays["p_vis"]), f"input maximising each logit\n(min p = "
                  f"{m['min_classvis_confidence']:.3f})"), (means, [f"r={x:.2f}" for x in r],
                  f"mean training digit\n(r with the input: {r.mean():.2f})")],
                out / "class_visualisations.png")  # fmt: skip
        mosaics([(original, [""] * 10, "real test digit"), (dream, ps(arrays["p"]),
                 "conv2 dream (p = p(label))")], out / "deep_dream.png")  # fmt: skip
        m |= {"wall_time_s": timer.lap("figures"), "time_split_s": timer.split}
        m = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in m.items()}
        write_metrics(out, cfg, m)
    return m


# %%
if __name__ == "__main__":
    run_cli()
