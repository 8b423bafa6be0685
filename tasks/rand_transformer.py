"""A causal transformer that generates random numbers in [0, 100], checked against the true floor.

What this teaches
-----------------
How to train and test a generative sequence model when the right answer is "nothing to learn".
The data are sequences of i.i.d. uniform integers in [0, 100] (101 values, both ends included). A
causal model sees only the past, and the past says nothing about the next number, so the best it
can do is p(x_t | x_<t) = 1/101 and its held-out negative log-likelihood can never go below

    H = ln(101) = 4.6151 nats  (the data's entropy: the floor).

A held-out NLL clearly below the floor (by more than 3 standard errors) is proof that the model
sees the token it predicts: leakage, e.g. a missing causal mask. This file fails the run with a
clear error when that happens; `--no-causal` trains the same model without its mask to show it.

Generation is autoregressive sampling, x_t ~ softmax(logits(x_<t) / temperature), token by token
from the model's own outputs. 10,000 generated numbers are then tested:
  * chi-square goodness of fit against uniform (101 cells, 100 degrees of freedom): chi2_p;
  * total variation to uniform, TV = 1/2 sum_v |n_v / n - 1/101|, beside the TV of as many draws
    from numpy's generator (TV is never 0 for finite n: about 0.04 at n = 10,000);
  * serial independence: the Pearson correlation of consecutive numbers and its p-value: serial_p.

Model: token + learned position embeddings, one pre-LN block (Flax NNX MultiHeadAttention with a
causal mask, then an MLP), a LayerNorm and a linear head. A BOS token starts every sequence.

Usage
-----
    python tasks/rand_transformer.py
    python tasks/rand_transformer.py --help

Expected result (defaults, seeds 0-4, measured): nll - ln(101) = 0.00016 to 0.00040 (standard
error 0.00013), chi2_p = 0.54, 0.83, 0.96, 0.23, 0.23, serial_p = 0.86, 0.95, 0.36, 0.61, 0.13,
tv_uniform 0.034-0.043 beside tv_numpy 0.036-0.044. About 50-60 s of CPU time (user + sys) on a
shared 2-core machine. With --no-causal (in a 300-step run) the held-out NLL falls to 0.34 nats,
about 470 standard errors below the floor, and the run stops with the leakage error.
Outputs in runs/rand_transformer/: metrics.json (with the device and the training throughput in
steps/s, compilation excluded), config.json, samples.npy, histogram.png, nll.png, next_token.png.
"""

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

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tyro
from flax import nnx
from scipy import stats
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NUM_VALUES = 101  # the integers 0..100 inclusive
BOS = NUM_VALUES  # token 101 starts each sequence
HELDOUT_SEQS = 1024  # held-out sequences for the NLL and its standard error


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
    context_len: int = 32
    """numbers per training sequence (the model's context window)."""
    d_model: int = 32
    """width of the residual stream."""
    num_heads: int = 2
    """attention heads."""
    num_layers: int = 1
    """transformer blocks (shallow: there is nothing to compute, only a distribution to match)."""
    steps: int = 1500
    """optimizer steps; each draws a fresh batch of uniform sequences."""
    batch_size: int = 64
    """sequences per step."""
    learning_rate: float = 3e-3
    """peak Adam learning rate (warmup, then cosine decay to 0, which averages out batch noise)."""
    num_samples: int = 10_000
    """numbers to generate for the distribution tests."""
    temperature: float = 1.0
    """sampling temperature: logits are divided by it (1.0 samples the model as trained)."""
    causal: bool = True
    """apply the causal mask; False lets positions see the future, and the leakage check fires."""
    seed: int = 0
    """random seed for data, initialisation, sampling and numpy's reference draws."""
    out_dir: str = "runs/rand_transformer"
    """where figures, samples.npy and metrics.json are written."""


PRESETS: dict[str, Config] = {"cpu": Config()}


# %% ---------------------------------------------------------------- data
def make_batch(key: jax.Array, batch: int, length: int) -> jax.Array:
    """i.i.d. uniform integers in [0, 100], with BOS in front: (B, length + 1)."""
    x = jax.random.randint(key, (batch, length), 0, NUM_VALUES)
    return jnp.concatenate([jnp.full((batch, 1), BOS), x], axis=1)


# %% ---------------------------------------------------------------- model
class Block(nnx.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, num_heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=d, qkv_features=d, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.causal = cfg.causal
        self.tok = nnx.Embed(NUM_VALUES + 1, cfg.d_model, rngs=rngs)
        self.pos = nnx.Embed(cfg.context_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List(
            [Block(cfg.d_model, cfg.num_heads, rngs) for _ in range(cfg.num_layers)]
        )
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, NUM_VALUES, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-number logits (B, T, 101) for input tokens (B, T)."""
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))  # (B, T, D)
        # the causal mask: position t attends to positions <= t only (B, 1, T, T)
        mask = nnx.make_causal_mask(tokens) if self.causal else None
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def token_nll(model: Transformer, seqs: jax.Array) -> jax.Array:
    """-log p(x_t | x_<t) for every number in seqs (B, T + 1): (B, T)."""
    logits = model(seqs[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:])


# %% ---------------------------------------------------------------- training
def train(cfg: Config, key: jax.Array, heldout: jax.Array):
    """Adam on fresh batches in lax.scan chunks; returns the model and the held-out NLL curve."""
    key_init, key_data = jax.random.split(key)
    model = Transformer(cfg, nnx.Rngs(key_init))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(1, cfg.steps // 20), cfg.steps
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)

    def loss_fn(params, seqs):
        return token_nll(nnx.merge(graphdef, params), seqs).mean()

    def step(carry, key):
        params, opt_state = carry
        seqs = make_batch(key, cfg.batch_size, cfg.context_len)
        loss, grads = jax.value_and_grad(loss_fn)(params, seqs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run_chunk(params, opt_state, keys):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, losses, loss_fn(params, heldout)

    chunk = max(1, cfg.steps // 15)
    keys = jax.random.split(key_data, cfg.steps)
    curve = []  # (step, train loss of the chunk, held-out NLL)
    t_start = t_compiled = time.perf_counter()
    for start in tqdm(range(0, cfg.steps, chunk), disable=None, desc="train"):
        params, opt_state, losses, heldout_nll = run_chunk(
            params, opt_state, keys[start : start + chunk]
        )
        losses = np.asarray(losses)  # waits for the chunk: the timing is honest
        if not np.isfinite(losses).all():
            bad = int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f"training diverged at step {start + bad + 1}: loss is {losses[bad]}; "
                "try a smaller --learning-rate"
            )
        curve.append((start + len(losses), float(losses.mean()), float(heldout_nll)))
        print(f"step={curve[-1][0]} train_nll={curve[-1][1]:.5f} heldout_nll={curve[-1][2]:.5f}")
        if start == 0:  # the first chunk includes compilation
            t_compiled, first = time.perf_counter(), len(losses)
    # steps/s after compilation; a run of a single chunk can only be timed with it
    t_end = time.perf_counter()
    timed = cfg.steps - first
    steps_per_s = timed / (t_end - t_compiled) if timed else first / (t_end - t_start)
    return nnx.merge(graphdef, params), np.array(curve), steps_per_s


# %% ---------------------------------------------------------------- sampling and evaluation
def sample(model: Transformer, key: jax.Array, num_seqs: int, cfg: Config) -> jax.Array:
    """Autoregressive sampling: x_t ~ softmax(logits_t / temperature), fed back as input."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, key):
        model = nnx.merge(graphdef, params)
        buf = jnp.full((num_seqs, cfg.context_len + 1), BOS)  # BOS, then numbers as they come

        def step(buf, inputs):
            t, key = inputs
            # positions after t hold BOS placeholders; the causal mask hides them from position t
            logits = model(buf[:, :-1])[:, t] / cfg.temperature  # (B, 101)
            return buf.at[:, t + 1].set(jax.random.categorical(key, logits)), None

        steps = (jnp.arange(cfg.context_len), jax.random.split(key, cfg.context_len))
        buf, _ = jax.lax.scan(step, buf, steps)
        return buf[:, 1:]  # (num_seqs, context_len)

    return run(params, key)


def tv_to_uniform(values: np.ndarray) -> float:
    """Total variation distance between the empirical distribution and uniform on 0..100."""
    freq = np.bincount(values, minlength=NUM_VALUES) / len(values)
    return float(0.5 * np.abs(freq - 1 / NUM_VALUES).sum())


def distribution_tests(seqs: np.ndarray, num_samples: int, rng: np.random.Generator) -> dict:
    values = seqs.reshape(-1)[:num_samples]
    counts = np.bincount(values, minlength=NUM_VALUES)
    # serial test on consecutive numbers within each generated sequence (the model's own context)
    prev, nxt = seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)
    if np.ptp(prev) == 0 or np.ptp(nxt) == 0:
        # A constant stream (e.g. at a temperature near 0) has no Pearson correlation (NaN, which
        # metrics.json cannot hold). It is not random, so record it as failing the test: r = 0,
        # p = 0.
        serial_corr, serial_p = 0.0, 0.0
    else:
        serial = stats.pearsonr(prev, nxt)
        serial_corr, serial_p = float(serial.statistic), float(serial.pvalue)
    numpy_draws = rng.integers(0, NUM_VALUES, num_samples)
    return {
        "chi2_p": float(stats.chisquare(counts).pvalue),  # expected: n / 101 in each cell
        "serial_corr": serial_corr,
        "serial_p": serial_p,
        "tv_uniform": tv_to_uniform(values),
        "tv_numpy": tv_to_uniform(numpy_draws),
        "numpy_chi2_p": float(
            stats.chisquare(np.bincount(numpy_draws, minlength=NUM_VALUES)).pvalue
        ),
        "values": values,
        "numpy_draws": numpy_draws,
    }


# %% ---------------------------------------------------------------- figures
def plot_histogram(values: np.ndarray, numpy_draws: np.ndarray, path: pathlib.Path) -> None:
    """Counts per value against the expected n/101, with the 95% binomial band."""
    n = len(values)
    expected = n / NUM_VALUES
    band = 1.96 * math.sqrt(n * (1 / NUM_VALUES) * (1 - 1 / NUM_VALUES))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, data, title in [
        (axes[0], values, "transformer samples"),
        (axes[1], numpy_draws, "numpy Generator.integers"),
    ]:
        counts = np.bincount(data, minlength=NUM_VALUES)
        ax.bar(np.arange(NUM_VALUES), counts, width=1.0, color="tab:blue", alpha=0.7)
        ax.axhline(expected, color="k", lw=1, label=f"expected n/101 = {expected:.1f}")
        ax.fill_between([-0.5, 100.5], expected - band, expected + band, color="k", alpha=0.12,
                        label="95% band per value")  # fmt: skip
        outside = int((np.abs(counts - expected) > band).sum())
        ax.set(xlabel="value", xlim=(-0.5, 100.5), ylim=(expected - 2 * band, expected + 2 * band),
               title=f"{title}\n{outside}/101 values outside the 95% band")  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel(f"count out of n = {n}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_nll(curve: np.ndarray, floor: float, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve[:, 0], curve[:, 1] - floor, "o-", ms=3, label="train batches (chunk mean)")
    ax.plot(curve[:, 0], curve[:, 2] - floor, "s-", ms=3, label="held-out")
    ax.axhline(0.0, color="k", lw=1, label="floor ln(101)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(xlabel="optimizer step", ylabel="NLL - ln(101) (nats)",
           title="Held-out NLL approaches the entropy floor, never below")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_next_token(model: Transformer, cfg: Config, path: pathlib.Path) -> None:
    """The model's next-number distribution after a few contexts: each should be flat."""
    contexts = {"BOS": [], "BOS 0": [0], "BOS 100 100 100": [100, 100, 100],
                "BOS 1 2 3 4 5": [1, 2, 3, 4, 5], "BOS 7 x 20": [7] * 20}  # fmt: skip
    fig, axes = plt.subplots(len(contexts), 1, figsize=(8, 1.6 * len(contexts)), sharex=True)
    for ax, (name, ctx) in zip(axes, contexts.items()):
        tokens = jnp.array([[BOS, *ctx]])
        probs = np.asarray(jax.nn.softmax(model(tokens)[0, -1] / cfg.temperature))
        ax.bar(np.arange(NUM_VALUES), probs, width=1.0)
        ax.axhline(1 / NUM_VALUES, color="k", lw=1)
        ax.set_ylim(0, 2 / NUM_VALUES)
        ax.set_ylabel("p")
        gap = np.abs(probs - 1 / NUM_VALUES).max()
        ax.set_title(f"after '{name}': max |p - 1/101| = {gap:.2e}", fontsize=9)
    axes[-1].set_xlabel("next value")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# %% ---------------------------------------------------------------- main
def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    check_number(cfg, "seed", 0, 2**32, high_open=True)  # numpy's seeds are 0 .. 2**32 - 1
    for name in ["context_len", "d_model", "num_heads", "num_layers", "steps", "batch_size"]:
        check_number(cfg, name, 1)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "temperature", 0, low_open=True)
    check_number(cfg, "num_samples", 2 * cfg.context_len)  # at least two sequences' worth
    if cfg.d_model % cfg.num_heads:
        raise option_error(
            "num_heads", cfg.num_heads, f"must divide --d-model ({cfg.d_model}) into equal heads"
        )
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    validate(cfg)
    key_heldout, key_train, key_sample = jax.random.split(jax.random.key(cfg.seed), 3)
    floor = math.log(NUM_VALUES)
    heldout = make_batch(key_heldout, HELDOUT_SEQS, cfg.context_len)

    model, curve, steps_per_s = train(cfg, key_train, heldout)

    # held-out NLL and its standard error over the 1024 * context_len numbers
    nll_tokens = np.asarray(token_nll(model, heldout), dtype=np.float64).reshape(-1)
    nll = float(nll_tokens.mean())
    nll_se = float(nll_tokens.std(ddof=1) / math.sqrt(nll_tokens.size))
    print(f"nll={nll:.6f} floor={floor:.6f} se={nll_se:.2e}")
    if not math.isfinite(nll):
        raise FloatingPointError(f"held-out NLL is {nll}; try a smaller --learning-rate")
    if nll < floor - 3 * nll_se - 1e-5:  # 1e-5: float32 rounding of a log-softmax
        raise RuntimeError(
            f"leakage: held-out NLL {nll:.4f} is below the entropy floor ln(101) = {floor:.4f} by "
            f"{(floor - nll) / max(nll_se, 1e-12):.0f} standard errors; no causal model can do "
            "that, so the model sees the number it predicts (is the causal mask missing?)"
        )

    num_seqs = -(-cfg.num_samples // cfg.context_len)  # ceil
    seqs = np.asarray(sample(model, key_sample, num_seqs, cfg))
    tests = distribution_tests(seqs, cfg.num_samples, np.random.default_rng(cfg.seed))
    print(" ".join(f"{k}={v:.4g}" for k, v in tests.items() if not isinstance(v, np.ndarray)))

    with staged_run(cfg.out_dir) as out:  # out_dir is replaced whole, only if all of this works
        np.save(out / "samples.npy", tests["values"].astype(np.int64))
        plot_histogram(tests["values"], tests["numpy_draws"], out / "histogram.png")
        plot_nll(curve, floor, out / "nll.png")
        plot_next_token(model, cfg, out / "next_token.png")
        metrics = {
            "task": "rand_transformer",
            "seed": cfg.seed,
            "preset": getattr(cfg, "preset", "cpu"),
            "nll": nll,
            "nll_floor": floor,
            "nll_se": nll_se,
            "nll_tolerance": 0.01,
            **{k: v for k, v in tests.items() if not isinstance(v, np.ndarray)},
            "p_value_target": 0.01,
            "num_samples": int(len(tests["values"])),
            "temperature": cfg.temperature,
            **device_info(),
            "throughput": float(steps_per_s),
            "throughput_unit": "steps/s",
            "wall_time_s": time.perf_counter() - t0,
        }
        write_metrics(out, cfg, metrics)  # config.json, then metrics.json last
    return metrics


if __name__ == "__main__":
    run_cli()
