"""Chain-of-thought in a random-number generator: does a scratchpad help where steps must compose?

A small causal transformer answers requests for random numbers, x = a + U[0, P] + U[0, Q] (two
independent uniform draws, shifted), given as the digits of a, P, Q:

    uniform m     a = 0, P = m, Q = 0    uniform on [0, m]                      m = 1..100
    range a, n    a,     P = 0, Q = n    uniform on [a, a + n]                  a + n <= 100
    dice m        a = 0, P = m, Q = m    the sum of two dice with faces 0..m    m = 1..50

Two arms share the architecture, the initial weights, the steps and the batches. The *direct* arm
answers at once; the *chain-of-thought* (CoT) arm first samples a scratchpad: draw p ~ U[0, P],
add it to a, draw q ~ U[0, Q], add it. Numbers are two tokens, tens first (100 is "10 0").

    direct:  a1 a0 P1 P0 Q1 Q0 ANS x1 x0 EOS
    CoT:     a1 a0 P1 P0 | p1 p0 | c1 | s1 s0 | Q1 Q0 | q1 q0 | c2 | ANS x1 x0 EOS
             c1 = [a0 + p0 >= 10], s = a + p, c2 = [s0 + q0 >= 10], x = s + q
    dice 12: 0 0 1 2 | 0 7 | 0 | 0 7 | 1 2 | 0 9 | 1 | ANS 1 6 EOS      (p = 7, q = 9)

Training never sees two held-out splits. *Random*: 10% of the range requests, 3 uniform and 3
dice requests with m <= 25, interior points of smooth families that the direct arm can
interpolate. *Systematic*: every dice request with m > 25. Each step of their scratchpads was
trained (uniform requests teach the draw p for every bound, range requests the draw q and every
sum s + q), but no sum of two wide draws ever was: the CoT arm can compose the steps, the direct
arm must extrapolate a triangle it has seen only up to 0..50.

    python tasks/cot.py
    python tasks/cot.py --help

At the defaults (3 seeds per arm, 1500 steps, 59k parameters; about 190 s on 2 idle cores),
systematic held-out TV in excess of the sampling floor: CoT 0.013 (every seed <= 0.015), direct
0.156 (0.106..0.184); CoT's validity 0.992. Random split, held-out TV: CoT 0.161, direct 0.236
(floor 0.147). Results, what the runs found and the layouts tried: docs/cot.md.

Reference: Nye et al. 2021, "Show Your Work: Scratchpads for Intermediate Computation with Language
Models"; Feng et al. 2023, "Towards Revealing the Mystery behind Chain of Thought". Differences: a
tiny model trained from scratch, and a random task, so the reasoning is sampled, not greedy.
"""

# %% [markdown]
# ## Imports and helpers (the helpers are the same in every task; a test compares the copies)
# The model, training and sampling are JAX (Flax NNX, optax); requests and statistics are NumPy.

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
from tqdm.auto import tqdm


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


# %%
@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 1500  # training steps for each arm (both arms train for exactly this many)
    batch_size: int = 128  # requests per training batch, from the seen requests of all families
    d_model: int = 48  # transformer width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads per block
    learning_rate: float = 3e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    num_seeds: int = 3  # models per arm, trained together with jax.vmap (split over the devices)
    eval_requests: int = 6  # random split: requests per family and split in the final evaluation
    eval_samples: int = 128  # random split: answers sampled per request
    heldout_samples: int = 512  # systematic split: answers per held-out request (all 25 of them)
    seed: int = 0  # seed for initial weights, batches and sampling (the request splits are fixed)
    out_dir: str = "runs/cot"  # where distributions.png, config.json and metrics.json are written


PRESETS: dict[str, Config] = {"cpu": Config()}  # the defaults are the 2-core CPU run
BARS = {  # issue 13, stored in metrics.json beside the results they bound (worst seeds)
    "systematic_heldout_tv_excess_ratio_max_ceiling": 0.5,  # CoT's excess / direct's
    "systematic_heldout_validity_cot_min_target": 0.95,
    "num_seeds_target": 3,
    "wall_time_s_ceiling": 240.0,  # at the defaults, on 2 idle CPU cores
}


# %% [markdown]
# ## Data: requests, scratchpads and their exact answer distributions
# A request $(a, P, Q)$ asks for $x = a + p + q$ with $p \sim U[0, P]$, $q \sim U[0, Q]$, so
# its target is a convolution of two uniforms, $\Pr(x) = \sum_p \Pr(p)\Pr(x - a - p)$
# (triangular for dice). Training sequences draw $p$ and $q$ exactly and write them out: the
# direct arm sees only the answer, the CoT arm every step, in fixed slots. The CoT sequence gives
# $Q$ only after $p$ is drawn and added, so causal attention hides $Q$ from those steps and every
# step's context is one that training shows.

# %%
ANS, EOS, VOCAB = 11, 12, 13  # tokens 0..10 are digits (10 only as the tens digit of 100)
FAMILIES, ARMS = ("uniform", "range", "dice"), ("cot", "direct")
REQUEST_LEN, SEQ_LEN = 6, 18  # the request's tokens: a1 a0 P1 P0 Q1 Q0
# Where the request's tokens stand (CoT, direct); the model writes every other token.
GIVEN = {True: np.isin(np.arange(SEQ_LEN), [0, 1, 2, 3, 9, 10]), False: np.arange(10) < 6}
SPLIT_SEED = 2024  # the held-out requests are the same for every run


def split_requests() -> dict[tuple[str, str], np.ndarray]:
    """Every request as a row (family, a, P, Q), split into seen (trained on), heldout (the random
    split: 505 range requests, 3 uniform and 3 dice with m <= 25) and systematic (dice m > 25)."""
    uniform = [[0, 0, m, 0] for m in range(1, 101)]
    ranges = [[1, a, 0, n] for a in range(100) for n in range(1, 101 - a)]
    dice = [[2, 0, m, m] for m in range(1, 51)]
    rng, out = np.random.default_rng(SPLIT_SEED), {("dice", "systematic"): np.array(dice[25:])}
    for family, reqs, num_held in zip(FAMILIES, (uniform, ranges, dice[:25]), (3, 505, 3)):
        reqs, held = np.array(reqs), np.zeros(len(reqs), bool)
        held[rng.choice(len(reqs) if family == "range" else 25, num_held, replace=False)] = True
        out[(family, "seen")], out[(family, "heldout")] = reqs[~held], reqs[held]
    return out


def build_sequences(requests: np.ndarray, p: np.ndarray, q: np.ndarray, cot: bool) -> np.ndarray:
    """Token sequences (N, SEQ_LEN or 10) for draws p ~ U[0, P] and q ~ U[0, Q]."""
    _, a, bound_p, bound_q = np.asarray(requests).T
    digits = lambda x: [x // 10, x % 10]  # a number is two tokens, tens first
    s, answer = a + p, [np.full_like(a, ANS), *digits(a + p + q), np.full_like(a, EOS)]
    cols = [*digits(a), *digits(bound_p), *digits(bound_q), *answer]
    if cot:  # see the module docstring for the layout
        cols = [*digits(a), *digits(bound_p), *digits(p), a % 10 + p % 10 >= 10, *digits(s)]
        cols += [*digits(bound_q), *digits(q), s % 10 + q % 10 >= 10, *answer]
    return np.stack(cols, axis=1).astype(np.int32)


def parse_answers(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answer after the first ANS (-1 if none parses), and how many tokens the model wrote."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    first = np.where((tokens == ANS).any(1), (tokens == ANS).argmax(1), length)
    x1 = tokens[np.arange(batch), np.minimum(first + 1, length - 1)]
    x0 = tokens[np.arange(batch), np.minimum(first + 2, length - 1)]
    ok = (first + 2 < length) & (x1 <= 10) & (x0 <= 9) & (10 * x1 + x0 <= 100)
    return np.where(ok, 10 * x1 + x0, -1), np.minimum(first + 3, length) - REQUEST_LEN


def is_valid(requests: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Does answer x satisfy request (family, a, P, Q)? x = -1 (unparseable) never does."""
    _, a, bound_p, bound_q = np.asarray(requests).T
    return (x >= a) & (x <= a + bound_p + bound_q)


def target_distribution(request: np.ndarray) -> np.ndarray:
    """Exact distribution over 0..100 of a + U[0, P] + U[0, Q]: a convolution.  (101,)"""
    _, a, bound_p, bound_q = request
    p = np.convolve(np.ones(bound_p + 1), np.ones(bound_q + 1))  # dice: triangular on [0, 2m]
    return np.concatenate([np.zeros(a), p, np.zeros(101 - a - len(p))]) / p.sum()


def entropy(p: np.ndarray) -> float:
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


# %% [markdown]
# ## Model: a small causal transformer with a key-value cache
# Pre-LN blocks, $x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x))$ then
# $x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))$, with
# $\mathrm{Attn} = \mathrm{softmax}(q k^\top / \sqrt{d_h} + \text{causal mask})\, v$. Keys and
# values are cached, so sampling a token costs one position, not the whole sequence.


# %%
class Block(nnx.Module):
    """Pre-LN block, attention written out so that sampling can cache keys and values."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d_model, rngs=rngs), nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.mlp1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)
        self.n_heads = n_heads

    def __call__(self, x, cache=None, start=0):  # x (B, T, D) at positions start..
        B, T, D = x.shape
        if cache is None:  # keys and values of all L positions: (2, B, L, heads, D / heads)
            cache = jnp.zeros((2, B, T, self.n_heads, D // self.n_heads))
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(B, T, 3 * self.n_heads, -1), 3, axis=2)
        cache = jax.lax.dynamic_update_slice(cache, jnp.stack([k, v]), (0, 0, start, 0, 0))
        # softmax(q k^T / sqrt(d_head)) v, where position i attends to positions j <= i only
        scores = jnp.einsum("bthd,blhd->bhtl", q, cache[0]) / np.sqrt(D // self.n_heads)
        causal = jnp.arange(cache.shape[2]) <= start + jnp.arange(T)[:, None]  # (T, L)
        att = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        x = x + self.proj(jnp.einsum("bhtl,blhd->bthd", att, cache[1]).reshape(B, T, D))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x)))), cache


class Transformer(nnx.Module):
    """Causal transformer with learned positions; both arms have SEQ_LEN positions."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(VOCAB, d_model, rngs=rngs)
        self.pos = nnx.Embed(SEQ_LEN, d_model, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, n_heads, rngs=rngs) for _ in range(n_layers)])
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, VOCAB, rngs=rngs)

    def __call__(self, tokens, caches=None, start=0):  # (B, T) -> (B, T, VOCAB), caches
        # Without caches: the whole sequence; with earlier calls' caches: positions start.. of it.
        caches = [None] * len(self.blocks) if caches is None else caches
        x, new = self.tok(tokens) + self.pos(start + jnp.arange(tokens.shape[1])), []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cache, start)
            new.append(cache)
        return self.head(self.ln(x)), jnp.stack(new)


def make_model_fns(cfg: Config):
    """Pure init/apply over the model's state, so that seeds can be vmapped."""
    build = lambda key: Transformer(cfg.d_model, cfg.n_layers, cfg.n_heads, rngs=nnx.Rngs(key))
    graphdef, _ = nnx.split(build(jax.random.key(0)))
    init = lambda key: nnx.split(build(key))[1]
    apply = lambda params, *args: nnx.merge(graphdef, params)(*args)
    return init, apply


# %% [markdown]
# ## Loss and training
# Next-token cross-entropy on every token the model writes (never on the request's tokens),
# $\mathcal{L} = -\frac{1}{|W|}\sum_{t \in W} \log p_\theta(x_t \mid x_{<t})$. Its floor is the
# entropy of the random draws per written token. Both arms start from the same weights and see
# the same requests and draws; the seeds train at once, `vmap` over a seed axis split over devices.
# AdamW's step size warms up, then decays as a cosine; the steps run in five jitted `lax.scan`
# chunks, a log line after each.


# %%
def seen_table() -> tuple[np.ndarray, np.ndarray]:
    """Seen requests of each family stacked to one (families, R_max, 4) array, and their counts."""
    reqs = [split_requests()[(f, "seen")] for f in FAMILIES]
    r_max = max(len(r) for r in reqs)
    return np.stack([np.resize(r, (r_max, 4)) for r in reqs]), np.array([len(r) for r in reqs])


def make_batches(seen: tuple, shape: tuple, rng: np.random.Generator, cot: bool) -> np.ndarray:
    """(*shape, T): a uniform family, a uniform seen request of it, its draws p and q exactly."""
    table, counts = seen
    fam = rng.integers(0, len(FAMILIES), shape).reshape(-1)
    reqs = table[fam, rng.integers(0, counts[fam])]
    p, q = rng.integers(0, reqs[:, 2] + 1), rng.integers(0, reqs[:, 3] + 1)
    return build_sequences(reqs, p, q, cot).reshape(*shape, -1)


def loss_floor(cot: bool) -> float:
    """The lowest training loss: the entropy of the random tokens (the CoT arm's draws p and q,
    the direct arm's answer) per token written, for the mix of families and seen requests."""
    table, counts = seen_table()
    ent = [
        np.mean([entropy(target_distribution(r)) for r in table[f, : counts[f]]])
        if not cot
        else np.mean(np.log(table[f, : counts[f], 2:] + 1.0).sum(1))
        for f in range(len(FAMILIES))
    ]
    return float(np.mean(ent) / (~GIVEN[cot]).sum())


def train(cfg: Config, cot: bool, init, apply) -> tuple:
    """Train num_seeds models of one arm together; returns their params and last chunk's loss."""
    warmup = max(1, min(200, cfg.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps)
    tx = optax.adamw(schedule, weight_decay=0.01)
    written = ~GIVEN[cot][1:]  # next-token loss on every token the model writes

    def loss_fn(params, seqs):
        logits = apply(params, seqs[:, :-1])[0]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:])
        return (nll * written).sum() / (len(seqs) * written.sum())

    def step(carry, seqs):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, seqs)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    @jax.vmap  # over seeds
    def run_chunk(params, opt_state, seqs):  # seqs (steps, batch, T)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), seqs)
        return params, opt_state, losses.mean()

    params = jax.vmap(init)(jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds))
    params, opt_state = shard_seeds((params, jax.vmap(tx.init)(params)))
    rng, seen, done = np.random.default_rng(cfg.seed), seen_table(), 0
    for chunk in tqdm(np.array_split(np.arange(cfg.steps), min(5, cfg.steps)), disable=None):
        seqs = make_batches(seen, (cfg.num_seeds, len(chunk), cfg.batch_size), rng, cot)
        params, opt_state, loss = run_chunk(params, opt_state, shard_seeds(seqs))
        loss, done = np.asarray(loss)[: cfg.num_seeds], done + len(chunk)  # per seed, chunk mean
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"training diverged at step {done}: loss is {loss}; try a smaller --learning-rate"
            )
        tqdm.write(f"arm={ARMS[not cot]} step={done} loss={loss.mean():.4f}")
    return params, float(loss.mean())


# %% [markdown]
# ## Evaluate: sample answers, compare with the exact targets
# Each request gets many sampled answers (the scratchpad too is sampled, at temperature 1). Per
# request, $\mathrm{TV}(\hat p, p) = \frac{1}{2}\sum_x |\hat p(x) - p(x)|$, with unparseable answers
# as mass off the target; validity is the share of answers that parse and satisfy the request.
# From $n$ samples TV is biased up, so exact samples of the same size give its floor
# (`..._tv_floor`), and the systematic split reports the excess over that floor, for each seed.


# %%
def make_generate(apply, cot: bool, cfg: Config):
    """Autoregressive sampling with a key-value cache: each token the model writes is drawn from
    its next-token distribution (temperature 1) and fed back in; request tokens are copied in."""
    given, length = GIVEN[cot], len(GIVEN[cot])
    start = int(np.argmin(given))  # the first token the model writes

    def generate(params, request, key):  # (N, length), request tokens in place -> (N, length - 1)
        head = (cfg.n_heads, cfg.d_model // cfg.n_heads)
        caches = jnp.zeros((cfg.n_layers, 2, len(request), length, *head))
        logits, caches = apply(params, request[:, :start], caches, 0)

        def step(carry, t_key):  # write token t, then run it to get token t + 1's logits
            (logits, caches), (t, k) = carry, t_key
            sampled = jax.random.categorical(k, logits)
            token = jnp.where(jnp.asarray(given)[t], request[:, t], sampled)
            logits, caches = apply(params, token[:, None], caches, t)
            return (logits[:, -1], caches), token

        ts = jnp.arange(start, length - 1)  # EOS is not needed to parse the answer
        keys = jax.random.split(key, len(ts))
        _, tokens = jax.lax.scan(step, (logits[:, -1], caches), (ts, keys))
        return jnp.concatenate([request[:, :start], tokens.T], axis=1)

    return jax.jit(jax.vmap(generate, in_axes=(0, None, 0)))  # over seeds


GEN_BATCH = 1024  # sequences per generate call: one compiled shape serves every evaluation


def evaluate(generate, params, sets: dict, samples: int, key, cfg: Config, cot: bool) -> dict:
    """`samples` answers per request from every seed's model: per set (seeds, requests, samples)."""
    flat = np.repeat(np.concatenate(list(sets.values())), samples, 0)
    flat = np.resize(flat, (-(-len(flat) // GEN_BATCH) * GEN_BATCH, 4))  # whole blocks
    requests = build_sequences(flat, 0 * flat[:, 0], 0 * flat[:, 0], cot)
    tokens = []
    for i in range(0, len(flat), GEN_BATCH):
        keys = shard_seeds(jax.random.split(jax.random.fold_in(key, i), cfg.num_seeds))
        out = generate(params, requests[i : i + GEN_BATCH], keys)
        tokens.append(np.asarray(out)[: cfg.num_seeds])  # drop the seeds shard_seeds padded
    tokens, out, start = np.concatenate(tokens, axis=1), {}, 0  # (seeds, N, T)
    for name, reqs in sets.items():
        stop = start + len(reqs) * samples
        answers = [parse_answers(tok[start:stop])[0] for tok in tokens]
        out[name] = np.reshape(answers, (cfg.num_seeds, len(reqs), samples))
        start = stop
    return out


def answer_stats(requests: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """(validity, mean TV to the target); answers (R, S), -1 = unparseable."""
    tvs = []
    for req, ans in zip(requests, answers):
        p_hat = np.bincount(ans + 1, minlength=102) / len(ans)  # bin 0: unparseable answers
        tvs.append(0.5 * np.abs(p_hat - np.append(0.0, target_distribution(req))).sum())
    valid = is_valid(np.repeat(requests, answers.shape[1], 0), answers.reshape(-1)).mean()
    return np.array([valid, np.mean(tvs)])


# %%
def plot_distributions(system: dict, results: dict, stats: dict, path: pathlib.Path) -> None:
    """The headline. Left: the widest systematic request (dice 0..50), all seeds pooled.
    Right: each seed's systematic TV in excess of the floor, CoT beside direct."""
    name, colors = ("dice", "systematic"), ("tab:blue", "tab:orange")  # CoT, direct
    with plt.rc_context({"font.size": 13}):
        fig, (ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
        req = system[name][-1]
        ax.step(np.arange(101), target_distribution(req), "k", where="mid", lw=2.5, label="target")
        for arm, color in zip(ARMS, colors):
            answers = results[arm][name][:, -1].reshape(-1)  # all seeds pooled
            freq = np.bincount(answers + 1, minlength=102)[1:] / len(answers)
            ax.step(np.arange(101), freq, where="mid", color=color, alpha=0.85, label=arm)
        ax.set(xlabel="answer", ylabel="probability", title=f"Held out: two dice 0..{req[2]}")
        for line in ax.legend().get_lines():
            line.set(linewidth=2.5, alpha=1.0)  # legible at README width
        floor, seeds = stats[name, "ref"][1], np.arange(len(stats[name, "cot"]))
        for i, (arm, color) in enumerate(zip(ARMS, colors)):
            excess = stats[name, arm][:, 1] - floor
            bar_ax.bar(seeds + (i - 0.5) * 0.4, excess, 0.4, color=color, label=arm)
        bar_ax.set(xlabel="seed", ylabel="TV excess over the floor", xticks=seeds)
        bar_ax.set_title(f"All {len(system[name])} systematic requests (dice m > 25)")
        bar_ax.legend()
        fig.tight_layout()
        save_figure(fig, path)


# %% [markdown]
# ## Main
# Validate, train each arm, sample both held-out splits, score them, write the figure and metrics.


# %%
def validate(cfg: Config) -> None:
    """Every option finite and in range, and the cross-field constraints, before any work."""
    sizes = ("steps", "batch_size", "d_model", "n_layers", "n_heads", "num_seeds", "eval_requests")
    for name in (*sizes, "eval_samples", "heldout_samples"):
        check_number(cfg, name, 1)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    if cfg.d_model % cfg.n_heads:
        raise option_error("d_model", cfg.d_model, f"must be divisible by --n-heads {cfg.n_heads}")
    check_out_dir(cfg.out_dir)


def eval_sets(num_requests: int) -> dict:
    """The random split's evaluation requests: a fixed pick per (family, seen or heldout)."""
    rng, sets = np.random.default_rng(SPLIT_SEED + 1), {}
    for (fam, split), reqs in split_requests().items():
        if split != "systematic":
            pick = rng.choice(len(reqs), min(num_requests, len(reqs)), replace=False)
            sets[(fam, split)] = reqs[np.sort(pick)]
    return sets


def score(sets: dict, results: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """Validity and TV per set, arm and seed, and per set the same for exact samples of the same
    size, mean of 4 draws (the TV floor). Returns them, and metrics.json's results: the random
    split per family and its held-out means over families, the systematic split per seed."""
    stats, m = {}, {}
    for name, reqs in sets.items():
        for arm in ARMS:
            stats[name, arm] = np.array([answer_stats(reqs, a) for a in results[arm][name]])
        samples, exact = results["cot"][name].shape[-1], [target_distribution(r) for r in reqs]
        draws = [[rng.choice(101, samples, p=p) for p in exact] for _ in range(4)]
        stats[name, "ref"] = np.mean([answer_stats(reqs, np.stack(d)) for d in draws], axis=0)
    for fam, split in [name for name in sets if name[1] != "systematic"]:
        for arm in ARMS:
            validity, tv = stats[(fam, split), arm].T  # per seed
            m[f"{fam}_{split}_{arm}_validity"] = validity.mean()
            m[f"{fam}_{split}_{arm}_tv"], m[f"{fam}_{split}_{arm}_tv_std"] = tv.mean(), tv.std()
        m[f"{fam}_{split}_tv_floor"] = stats[(fam, split), "ref"][1]
    for arm in ARMS:
        per_seed = np.mean([stats[(fam, "heldout"), arm] for fam in FAMILIES], axis=0)
        for col, what in enumerate(("validity", "tv")):
            m[f"heldout_{what}_{arm}"] = per_seed[:, col].mean()
            m[f"heldout_{what}_{arm}_std"] = per_seed[:, col].std()
    m["heldout_tv_floor"] = np.mean([m[f"{fam}_heldout_tv_floor"] for fam in FAMILIES])
    name = ("dice", "systematic")
    m["systematic_heldout_tv_floor"] = floor = stats[name, "ref"][1]
    excess = {arm: stats[name, arm][:, 1] - floor for arm in ARMS}
    for arm in ARMS:
        m[f"systematic_heldout_tv_{arm}"] = stats[name, arm][:, 1].mean()
        for what, per_seed in (("tv_excess", excess[arm]), ("validity", stats[name, arm][:, 0])):
            m[f"systematic_heldout_{what}_{arm}"] = per_seed.mean()
            m[f"systematic_heldout_{what}_{arm}_min"] = per_seed.min()
            m[f"systematic_heldout_{what}_{arm}_max"] = per_seed.max()
    # The bar "CoT's excess <= half the direct arm's, for every seed" as the worst seed's ratio
    # (1e-6 stands in for a direct excess <= 0, which would make the ratio infinite or negative).
    ratio = excess["cot"] / np.maximum(excess["direct"], 1e-6)
    m["systematic_heldout_tv_excess_ratio_max"] = ratio.max()
    return stats, {k: float(v) for k, v in m.items()}


def main(cfg: Config) -> dict:
    timer = PhaseTimer()
    validate(cfg)
    sets = eval_sets(cfg.eval_requests)
    system = {("dice", "systematic"): split_requests()[("dice", "systematic")]}
    init, apply = make_model_fns(cfg)
    num_params = int(sum(x.size for x in jax.tree.leaves(init(jax.random.key(0)))))
    timer.lap("setup")
    results, metrics = {}, {}
    for cot, arm in zip((True, False), ARMS):
        params, metrics[f"{arm}_train_loss"] = train(cfg, cot, init, apply)
        metrics[f"{arm}_train_loss_floor"] = loss_floor(cot)  # last chunk's mean, and its floor
        timer.lap("train")
        generate = make_generate(apply, cot, cfg)
        key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
        results[arm] = evaluate(generate, params, sets, cfg.eval_samples, key, cfg, cot)
        key = jax.random.fold_in(key, 1)
        results[arm] |= evaluate(generate, params, system, cfg.heldout_samples, key, cfg, cot)
        timer.lap("evaluate")
    stats, scores = score(sets | system, results, np.random.default_rng(cfg.seed))
    metrics |= {
        "task": "cot",
        "seed": cfg.seed,
        "num_seeds": cfg.num_seeds,
        "num_params": num_params,
        "steps": cfg.steps,
        "preset": getattr(cfg, "preset", "cpu"),
        **device_info(),
        # training steps per second, every seed of both arms counted (compilation included)
        "throughput": 2 * cfg.steps * cfg.num_seeds / timer.split["train"],
        "throughput_unit": "model-steps/s",
        **scores,
        "systematic_heldout_requests": len(system[("dice", "systematic")]),
        "systematic_heldout_samples": cfg.heldout_samples,
        **BARS,
    }
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:
        plot_distributions(system, results, stats, out / "distributions.png")
        metrics["wall_time_s"] = float(timer.lap("figures"))
        metrics["time_split_s"] = timer.split
        write_metrics(out, cfg, metrics)
    keys = ("heldout_tv", "heldout_validity", "systematic_heldout_tv_excess", "wall")
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(keys)))
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
