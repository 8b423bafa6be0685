"""A causal transformer that generates random numbers in [0, 100], checked against the true floor.

What this teaches: how to train and test a generative sequence model when the right answer is
"nothing to learn". The data are i.i.d. uniform integers in [0, 100] (101 values). A causal model
sees only the past, which says nothing about the next number, so the best it can do is
p(x_t | x_<t) = 1/101, and its held-out negative log-likelihood can never go below the data's
entropy, H = ln(101) = 4.6151 nats (the floor). A held-out NLL below the floor by more than 3
standard errors proves that the model sees the token it predicts (leakage, e.g. a missing causal
mask): the run stops with a clear error, as `--no-causal` shows. The model (a one-block GPT) then
samples autoregressively, and its numbers are tested for uniformity and serial correlation.

    python tasks/rand_transformer.py          # train, sample 10,000 numbers, test, figures
    python tasks/rand_transformer.py --help   # every option
    python tasks/rand_transformer.py --no-causal --steps 300   # leakage: the run stops

Expected result (defaults, about 41 s on 2 CPU cores): held-out NLL within 0.0003 nats of the
floor, chi2_p 0.54, serial_p 0.86 (bars: |nll - floor| <= 0.01, both p >= 0.01), TV 0.040 beside
numpy's 0.044. Seeds, figures and findings: docs/rand_transformer.md.
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

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import nnx
from scipy import stats
from tqdm.auto import tqdm

NUM_VALUES = 101  # the integers 0..100 inclusive
BOS = NUM_VALUES  # token 101 starts each sequence
HELDOUT_SEQS = 1024  # held-out sequences for the NLL and its standard error
NLL_GAP_CEILING = 0.01  # bar: |nll - ln(101)| <= 0.01 nats
P_VALUE_TARGET = 0.01  # bar: chi2_p and serial_p >= 0.01


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
# ## Configuration and data
# The defaults are the 2-core CPU run (no paper preset: the assignment is the reference). Every
# batch is fresh, $x_t \sim \mathcal{U}\{0, \dots, 100\}$ i.i.d. after a BOS token, so the model
# cannot overfit, and no model can reach a held-out NLL below $H = \ln 101$.
# %%
@dataclasses.dataclass(frozen=True)
class Config:
    context_len: int = 32  # numbers per training sequence (the model's context window)
    d_model: int = 32  # width of the residual stream
    num_heads: int = 2  # attention heads
    num_layers: int = 1  # transformer blocks (few: there is only a distribution to match)
    steps: int = 1500  # optimizer steps; each draws a fresh batch of uniform sequences
    batch_size: int = 64  # sequences per step
    learning_rate: float = 3e-3  # peak Adam learning rate (warmup, then cosine decay to 0)
    num_samples: int = 10_000  # numbers to generate for the distribution tests
    temperature: float = 1.0  # sampling temperature: logits are divided by it (1: as trained)
    causal: bool = True  # the causal mask; without it positions see the future: leakage
    seed: int = 0  # random seed for data, initialisation, sampling and numpy's reference draws
    out_dir: str = "runs/rand_transformer"  # where figures, samples and metrics.json go


PRESETS: dict[str, Config] = {"cpu": Config()}


def make_batch(key: jax.Array, batch: int, length: int) -> jax.Array:
    """i.i.d. uniform integers in [0, 100], with BOS in front: (B, length + 1)."""
    x = jax.random.randint(key, (batch, length), 0, NUM_VALUES)
    return jnp.concatenate([jnp.full((batch, 1), BOS), x], axis=1)


# %% [markdown]
# ## Model
# Token and position embeddings, pre-LN blocks $x \leftarrow x + \mathrm{MHA}(\mathrm{LN}(x))$,
# $x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))$, a LayerNorm and a linear head to 101 logits.
# The causal mask lets position $t$ attend to positions $\le t$ only.
# %%
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


# %% [markdown]
# ## Loss and training
# The loss is the mean next-number NLL, $-\frac{1}{T}\sum_t \log p_\theta(x_t \mid x_{<t})$.
# Adam with warmup, cosine decay to 0 (it averages out the batch noise) and clipping; `lax.scan`
# runs chunks of steps under one `jax.jit`.
# %%
def token_nll(model: Transformer, seqs: jax.Array) -> jax.Array:
    """-log p(x_t | x_<t) for every number in seqs (B, T + 1): (B, T)."""
    logits = model(seqs[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:])


def train(cfg: Config, key: jax.Array, heldout: jax.Array):
    """Adam on fresh batches in lax.scan chunks; returns (model, curve, steps/s after compile)."""
    key_init, key_data = jax.random.split(key)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(key_init)))
    warmup = max(1, cfg.steps // 20)  # steps of linear warmup from 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    loss_fn = lambda params, seqs: token_nll(nnx.merge(graphdef, params), seqs).mean()

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
    curve = []  # per chunk: (step, mean train loss, held-out NLL)
    t_start = t_compiled = time.perf_counter()  # the first chunk includes compilation
    for start in tqdm(range(0, cfg.steps, chunk), disable=None, desc="train"):
        params, opt_state, losses, val_nll = run_chunk(
            params, opt_state, keys[start : start + chunk]
        )
        losses = np.asarray(losses)  # waits for the chunk: the timing is honest
        if not np.isfinite(losses).all():
            bad = int(np.argmin(np.isfinite(losses)))
            msg = f"training diverged at step {start + bad + 1}: loss is {losses[bad]}"
            raise FloatingPointError(msg + "; try a smaller --learning-rate")
        curve.append((start + len(losses), float(losses.mean()), float(val_nll)))
        print(f"step={curve[-1][0]} train_nll={curve[-1][1]:.5f} heldout_nll={curve[-1][2]:.5f}")
        if start == 0:
            t_compiled, first = time.perf_counter(), len(losses)
    # steps/s after compilation; a run of a single chunk can only be timed with it
    t_end, timed = time.perf_counter(), cfg.steps - first
    steps_per_s = timed / (t_end - t_compiled) if timed else first / (t_end - t_start)
    return nnx.merge(graphdef, params), np.array(curve), steps_per_s


# %% [markdown]
# ## Sampling, evaluation and figures
# Sampling feeds each drawn number back as input. Tests on the $n$ numbers, counts $n_v$:
# $\chi^2 = \sum_v (n_v - n/101)^2 / (n/101)$, 100 degrees of freedom (`chi2_p`); total variation
# $\tfrac12 \sum_v |n_v/n - 1/101|$, never 0 for finite $n$, so shown beside numpy's; and the
# correlation of consecutive numbers (`serial_p`). Figures: `histogram.png` (counts against $n/101$
# with the 95% binomial band) and `nll.png` (NLL above the floor while training).
# %%
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
        # a constant stream (temperature near 0) has no correlation (NaN): it fails, r = 0, p = 0
        serial_corr, serial_p = 0.0, 0.0
    else:
        serial = stats.pearsonr(prev, nxt)
        serial_corr, serial_p = float(serial.statistic), float(serial.pvalue)
    numpy_draws = rng.integers(0, NUM_VALUES, num_samples)
    numpy_counts = np.bincount(numpy_draws, minlength=NUM_VALUES)
    return {
        "chi2_p": float(stats.chisquare(counts).pvalue),  # expected: n / 101 in each cell
        "serial_corr": serial_corr, "serial_p": serial_p,
        "tv_uniform": tv_to_uniform(values), "tv_numpy": tv_to_uniform(numpy_draws),
        "numpy_chi2_p": float(stats.chisquare(numpy_counts).pvalue),
        "values": values, "numpy_draws": numpy_draws,
    }  # fmt: skip


def heldout_nll(model: Transformer, heldout: jax.Array, floor: float) -> tuple[float, float]:
    """Held-out NLL and its standard error; stops the run on NaN or leakage (below the floor)."""
    nll_tokens = np.asarray(token_nll(model, heldout), dtype=np.float64).reshape(-1)
    nll = float(nll_tokens.mean())
    nll_se = float(nll_tokens.std(ddof=1) / math.sqrt(nll_tokens.size))
    if not math.isfinite(nll):
        raise FloatingPointError(f"held-out NLL is {nll}; try a smaller --learning-rate")
    if nll < floor - 3 * nll_se - 1e-5:  # 1e-5: float32 rounding of a log-softmax
        raise RuntimeError(
            f"leakage: held-out NLL {nll:.4f} is below the entropy floor ln(101) = {floor:.4f} by "
            f"{(floor - nll) / max(nll_se, 1e-12):.0f} standard errors; no causal model can do "
            "that, so the model sees the number it predicts (is the causal mask missing?)"
        )
    return nll, nll_se


def plot_histogram(values: np.ndarray, numpy_draws: np.ndarray, path: pathlib.Path) -> None:
    """Counts per value against the expected n/101, with the 95% binomial band."""
    n, expected = len(values), len(values) / NUM_VALUES
    band = 1.96 * math.sqrt(n * (1 / NUM_VALUES) * (1 - 1 / NUM_VALUES))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, data, title in [(axes[0], values, "transformer"), (axes[1], numpy_draws, "numpy")]:
        counts = np.bincount(data, minlength=NUM_VALUES)
        ax.bar(np.arange(NUM_VALUES), counts, width=1.0, color="tab:blue", alpha=0.7)
        ax.axhline(expected, color="k", lw=1, label=f"n/101 = {expected:.0f}")
        ax.fill_between([-0.5, 100.5], expected - band, expected + band, color="k", alpha=0.12,
                        label="95% band")  # fmt: skip
        outside = int((np.abs(counts - expected) > band).sum())
        ax.set(xlim=(-0.5, 100.5), ylim=(expected - 2 * band, expected + 2 * band))
        ax.set_xlabel("value", fontsize=12)
        ax.set_title(f"{title}: {outside}/101 outside band", fontsize=13)
        ax.legend(loc="lower right", fontsize=10)
    axes[0].set_ylabel(f"count (n = {n})", fontsize=12)
    fig.tight_layout()
    save_figure(fig, path)


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
    save_figure(fig, path)


# %% [markdown]
# ## Main
# Validate first; train, evaluate (stopping on leakage), sample, test, draw; metrics.json last.
# %%
def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    check_number(cfg, "seed", 0, 2**32, high_open=True)  # numpy's seeds are 0 .. 2**32 - 1
    for name in ["context_len", "d_model", "num_heads", "num_layers", "steps", "batch_size"]:
        check_number(cfg, name, 1)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "temperature", 0, low_open=True)
    check_number(cfg, "num_samples", 2 * cfg.context_len)  # at least two sequences' worth
    if cfg.d_model % cfg.num_heads:
        allowed = f"must divide --d-model ({cfg.d_model}) into equal heads"
        raise option_error("num_heads", cfg.num_heads, allowed)
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    timer = PhaseTimer()  # wall_time_s counts from here
    validate(cfg)
    key_heldout, key_train, key_sample = jax.random.split(jax.random.key(cfg.seed), 3)
    floor = math.log(NUM_VALUES)
    heldout = make_batch(key_heldout, HELDOUT_SEQS, cfg.context_len)
    timer.lap("setup")
    model, curve, steps_per_s = train(cfg, key_train, heldout)
    timer.lap("train")
    nll, nll_se = heldout_nll(model, heldout, floor)
    num_seqs = -(-cfg.num_samples // cfg.context_len)  # ceil
    seqs = np.asarray(sample(model, key_sample, num_seqs, cfg))
    tests = distribution_tests(seqs, cfg.num_samples, np.random.default_rng(cfg.seed))
    scalars = {k: v for k, v in tests.items() if not isinstance(v, np.ndarray)}
    print(f"nll={nll:.6f} se={nll_se:.2e}", *(f"{k}={v:.4g}" for k, v in scalars.items()))
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:  # out_dir is replaced whole, only if all of this works
        np.save(out / "samples.npy", tests["values"].astype(np.int64))
        plot_histogram(tests["values"], tests["numpy_draws"], out / "histogram.png")
        plot_nll(curve, floor, out / "nll.png")
        wall_time_s = timer.lap("figures")
        metrics = {
            "task": "rand_transformer", "seed": cfg.seed, "preset": getattr(cfg, "preset", "cpu"),
            "nll": nll, "nll_floor": floor, "nll_se": nll_se,
            "nll_gap": abs(nll - floor), "nll_gap_ceiling": NLL_GAP_CEILING,
            "nll_tolerance": NLL_GAP_CEILING,
            **scalars,
            "chi2_p_target": P_VALUE_TARGET, "serial_p_target": P_VALUE_TARGET,
            "num_samples": int(len(tests["values"])), "temperature": cfg.temperature,
            **device_info(), "throughput": float(steps_per_s), "throughput_unit": "steps/s",
            "time_split_s": timer.split, "wall_time_s": wall_time_s,
            "wall_time_s_ceiling": 60,  # the time bar of scripts/run_all.py
        }  # fmt: skip
        write_metrics(out, cfg, metrics)  # config.json, then metrics.json last
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
