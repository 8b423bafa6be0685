"""Chain-of-thought in a random-number generator: does a scratchpad help a small transformer?

Task 1 trained a causal transformer to emit uniform numbers in [0, 100]. Here the same kind of model
is asked for numbers from *request families*, some of whose requests it never saw in training:

    uniform          a uniform number in [0, 100]              (the base case, no held-out requests)
    range a b        a uniform number in [a, b]                (10% of the 5050 pairs held out)
    dice m           the sum of two dice with faces 0..m       (6 of m = 1..50 held out)
    even b           a uniform even number in [0, b]           (10 of b = 1..100 held out)

Two arms share everything: the architecture and parameter count, the initial weights, the training
steps, the batches of requests. They differ only in the target sequence. The *direct* arm answers at
once; the *chain-of-thought* (CoT) arm first writes a scratchpad, sampled token by token from its
own distribution, that composes one simple random draw with exact digit arithmetic:

    range 23 71:  R 2 3 7 1 | 1 4 8 | 1 7 | 1 | = 4 0    borrow=[3<1], n=71-23=48,
                                                       u~U[0,48] -> 17, carry=[3+7>=10], x=23+17
    dice 12:      D 1 2 | 0 7 | 1 2 | 0 9 | 1 | = 1 6    u~U[0,12] -> 7, copy m, v -> 9, x=u+v
    even 57:      E 5 7 | 2 8 | 1 3 | 0 | = 2 6          m=57//2=28, u~U[0,28] -> 13, x=2u
    uniform:      U | 10 0 | 6 1 | = 6 1                 n=100, u~U[0,100] -> 61, x=u

Numbers are two tokens, tens then units; the tens token runs 0..10 so that 100 is "10 0". Every
scratchpad token is either the one random step -- draw u ~ U[0, n] tens digit first,
P(u1 = t) = |{u <= n : u // 10 = t}| / (n + 1) -- or a deterministic function of at most three
earlier digits (a borrow, a digit of a difference or sum, a carry). That is the design choice that
makes held-out requests reachable: a held-out pair (a, b) is new as a whole, but every digit
combination that each scratchpad step depends on, and every bound n of the draw, was seen in
training. The direct arm must instead map the whole request to a whole distribution at once,
P(x1 | a, b) and P(x0 | a, b, x1), which for a held-out request is an unseen input.

Metrics, per family and split (seen / held-out requests), per arm, averaged over seeds: validity
(the answer parses and satisfies the request), TV distance between each request's empirical answer
distribution and its exact target (averaged over requests; unparseable answers count as mass off
the target), and the plug-in entropy of the answers (nats). Both are estimated from `eval_samples`
answers per request, so `..._tv_floor` and `..._entropy_ref` give the same statistic for exact
samples from the target: what a perfect model would score. The training loss is reported beside its
floor (the entropy of the random tokens per loss token): 0.445 nats for CoT, 0.899 for direct.

    python tasks/cot.py
    python tasks/cot.py --help

It writes distributions.png (each family's answers with and without reasoning, against the target),
tv_curve.png (held-out TV against training steps, both arms), comparison.md and metrics.json.

What the ablation found (defaults: 3 seeds per arm, 1500 steps, 59k parameters; 268 CPU-seconds,
user+sys, so roughly 150 s wall on an idle 2-core CPU): the scratchpad wins on held-out requests,
but narrowly, not clearly. Held-out TV, mean over the range, dice and even families: CoT 0.238 +-
0.007, direct 0.247 +- 0.004 (std over seeds), where exact samples score 0.197 at 128 answers per
request, so CoT's excess over that floor is 0.041 against 0.050. Held-out validity: 0.972 vs 0.962
(range 0.970 vs 0.951, dice 0.987 vs 0.977, even 0.958 vs 0.957). The clearest gap is on seen range
requests (validity 0.937 vs 0.831, TV 0.215 vs 0.310). The price is 8.7 generated tokens per answer
against 3. Why the held-out gap is small: both arms fit their training data to within 0.02 nats of
the loss floor, and a held-out request here is a random point in a smooth parameter space: range [a,
b] looks almost like the seen [a, b + 1], so the direct arm can interpolate and does not need
composition. The CoT arm's arithmetic is not exact at this budget either (range validity 0.97, not
1.0); both arms share some errors (e.g. both put too little mass on 12 and 14 for "even in [0,
14]").

Reference: Nye et al. 2021, "Show Your Work: Scratchpads for Intermediate Computation with Language
Models"; Wei et al. 2022, "Chain-of-Thought Prompting". Differences: a tiny model trained from
scratch on synthetic scratchpads (no prompting of a pretrained model), and a random task, so the
reasoning is sampled, not decoded greedily.
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
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# %% ---------------------------------------------------------------- helpers
# fmt: off
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
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").exists():
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
# fmt: on


# %% ---------------------------------------------------------------- Config
@dataclass(frozen=True)
class Config:
    steps: int = 1500
    """training steps for each arm (both arms train for exactly this many)"""
    batch_size: int = 128
    """requests per training batch, drawn from the seen requests of all families"""
    d_model: int = 48
    """transformer width"""
    n_layers: int = 2
    """transformer blocks"""
    n_heads: int = 4
    """attention heads per block"""
    learning_rate: float = 3e-3
    """peak AdamW learning rate (linear warm-up, cosine decay)"""
    num_seeds: int = 3
    """independent models per arm, trained together with jax.vmap"""
    eval_requests: int = 6
    """requests per family and split in the final evaluation"""
    eval_samples: int = 128
    """answers sampled per request in the final evaluation"""
    curve_points: int = 5
    """evaluations of held-out TV during training (for the TV-vs-steps figure)"""
    seed: int = 0
    """seed for initial weights, batches and sampling (the request split is fixed)"""
    out_dir: str = "runs/cot"
    """where figures and metrics.json are written"""


PRESETS: dict[str, Config] = {"cpu": Config()}


# %% ---------------------------------------------------------------- Tokens and requests
# Tokens 0..10 are digits (10 only ever as the tens digit of 100), then the markers.
UNIF, RANGE, DICE, EVEN, ANS, EOS, PAD = 11, 12, 13, 14, 15, 16, 17
VOCAB = 18
FAMILIES = ("uniform", "range", "dice", "even")
PROMPT_LEN = (1, 5, 3, 3)  # family token + the request's digits
SCRATCH_LEN = (4, 6, 7, 5)
ANSWER_LEN = 4  # ANS x1 x0 EOS
SEQ_LEN = max(p + s for p, s in zip(PROMPT_LEN, SCRATCH_LEN)) + ANSWER_LEN  # 15
DIRECT_LEN = max(PROMPT_LEN) + ANSWER_LEN  # 9
SPLIT_SEED = 2024  # the held-out requests are the same for every run


def all_requests(family: int) -> np.ndarray:
    """Every request of a family as rows (family, a, b); unused parameters are 0."""
    if family == 0:
        return np.array([[0, 0, 100]])
    if family == 1:
        return np.array([[1, a, b] for a in range(101) for b in range(a + 1, 101)])
    if family == 2:
        return np.array([[2, m, 0] for m in range(1, 51)])
    return np.array([[3, b, 0] for b in range(1, 101)])


def split_requests() -> dict[tuple[str, str], np.ndarray]:
    """Fixed seen/held-out split: 10% of range pairs, 6 dice sizes and 10 even bounds held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    out = {("uniform", "seen"): all_requests(0)}
    for fam, num_held in ((1, 505), (2, 6), (3, 10)):
        reqs = all_requests(fam)
        held = np.zeros(len(reqs), bool)
        held[rng.choice(len(reqs), num_held, replace=False)] = True
        out[(FAMILIES[fam], "seen")] = reqs[~held]
        out[(FAMILIES[fam], "heldout")] = reqs[held]
    return out


def draw_bound(requests: np.ndarray) -> np.ndarray:
    """n such that the scratchpad draws u ~ U[0, n]: 100, b - a, m, or b // 2."""
    fam, a, b = np.asarray(requests).T
    return np.select([fam == 0, fam == 1, fam == 2], [100, b - a, a], a // 2)


def build_sequences(requests: np.ndarray, u: np.ndarray, v: np.ndarray, cot: bool) -> np.ndarray:
    """Token sequences: prompt, [scratchpad], ANS x1 x0 EOS, padded with PAD.  (N, T)

    u and v are the random draws in [0, draw_bound]; v is used by dice only."""
    fam, a, b = np.asarray(requests).T
    out = np.full((len(fam), SEQ_LEN if cot else DIRECT_LEN), PAD)
    d = lambda x: [x // 10, x % 10]  # a number is two tokens, tens first
    for f in range(4):
        i = fam == f
        a_, b_, u_, v_, count = a[i], b[i], u[i], v[i], i.sum()
        tok = lambda t, count=count: np.full(count, t)
        if f == 0:  # uniform: n = 100, x = u
            prompt, scratch, x = [tok(UNIF)], [tok(10), tok(0), *d(u_)], u_
        elif f == 1:  # range: borrow = [b0 < a0], n = b - a, u, carry = [a0 + u0 >= 10], x = a + u
            borrow, carry = b_ % 10 < a_ % 10, a_ % 10 + u_ % 10 >= 10
            prompt = [tok(RANGE), *d(a_), *d(b_)]
            scratch, x = [borrow, *d(b_ - a_), *d(u_), carry], a_ + u_
        elif f == 2:  # dice: u, copy m, v, carry = [u0 + v0 >= 10], x = u + v
            carry = u_ % 10 + v_ % 10 >= 10
            prompt, scratch, x = [tok(DICE), *d(a_)], [*d(u_), *d(a_), *d(v_), carry], u_ + v_
        else:  # even: m = b // 2, u, carry = [2 u0 >= 10], x = 2u
            carry = 2 * (u_ % 10) >= 10
            prompt, scratch, x = [tok(EVEN), *d(a_)], [*d(a_ // 2), *d(u_), carry], 2 * u_
        cols = prompt + (scratch if cot else []) + [tok(ANS), *d(x), tok(EOS)]
        out[i, : len(cols)] = np.stack(cols, axis=1)
    return out


def sample_sequences(requests: np.ndarray, rng: np.random.Generator, cot: bool) -> np.ndarray:
    """Draw the scratchpad's random numbers exactly, then write the sequences.  (N, T)"""
    n = draw_bound(requests)
    u, v = rng.integers(0, n + 1), rng.integers(0, n + 1)
    return build_sequences(requests, u, v, cot)


def prompts(requests: np.ndarray, length: int) -> np.ndarray:
    """Only the requests' prompts, padded with PAD to `length`.  (N, T)"""
    zeros = np.zeros(len(requests), int)
    seqs = build_sequences(requests, zeros, zeros, cot=False)[:, :length]
    keep = np.arange(seqs.shape[1]) < np.asarray(PROMPT_LEN)[np.asarray(requests)[:, 0], None]
    out = np.full((len(requests), length), PAD)
    out[:, : seqs.shape[1]] = np.where(keep, seqs, PAD)
    return out


# %% ---------------------------------------------------------------- Parsing and targets
def parse_answers(tokens: np.ndarray, prompt_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answer after the first ANS the model wrote (-1 if none parses), and tokens generated."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    pos = np.arange(length)
    is_ans = (tokens == ANS) & (pos[None] >= np.asarray(prompt_len)[:, None])
    first = np.where(is_ans.any(1), is_ans.argmax(1), length)
    x1 = tokens[np.arange(batch), np.minimum(first + 1, length - 1)]
    x0 = tokens[np.arange(batch), np.minimum(first + 2, length - 1)]
    ok = (first + 2 < length) & (x1 <= 10) & (x0 <= 9) & (10 * x1 + x0 <= 100)
    value = np.where(ok, 10 * x1 + x0, -1)
    generated = np.minimum(first + 3, length) - np.asarray(prompt_len)
    return value, generated


def is_valid(requests: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Does answer x satisfy request (family, a, b)? x = -1 (unparseable) never does."""
    fam, a, b = np.asarray(requests).T
    in_range = [(x >= 0) & (x <= 100), (x >= a) & (x <= b), (x >= 0) & (x <= 2 * a)]
    even = (x >= 0) & (x <= a) & (x % 2 == 0)
    return np.select([fam == 0, fam == 1, fam == 2], in_range, even)


def target_distribution(request: np.ndarray) -> np.ndarray:
    """Exact answer distribution over 0..100 for one request (family, a, b).  (101,)"""
    fam, a, b = request
    x = np.arange(101)
    if fam == 2:  # sum of two U[0, m]: triangular on [0, 2m]
        p = np.maximum(a + 1 - np.abs(x - a), 0).astype(float)
    else:
        p = is_valid(np.repeat(np.asarray(request)[None], 101, 0), x).astype(float)
    return p / p.sum()


# %% ---------------------------------------------------------------- Model
class Block(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(n_heads, d_model, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x, mask):  # (B, T, D)
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x))))


class Transformer(nnx.Module):
    """Pre-LN causal transformer with learned positions; both arms use SEQ_LEN positions."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(VOCAB, d_model, rngs=rngs)
        self.pos = nnx.Embed(SEQ_LEN, d_model, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, n_heads, rngs=rngs) for _ in range(n_layers)])
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, VOCAB, rngs=rngs)

    def __call__(self, tokens):  # (B, T) -> (B, T, VOCAB)
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        # Position i may attend to j <= i only: without this the model reads the answer it predicts.
        mask = nnx.make_causal_mask(tokens)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def make_model_fns(cfg: Config):
    """Pure init/apply over the model's state, so that seeds can be vmapped."""
    build = lambda key: Transformer(cfg.d_model, cfg.n_layers, cfg.n_heads, rngs=nnx.Rngs(key))
    graphdef, _ = nnx.split(build(jax.random.key(0)))
    init = lambda key: nnx.split(build(key))[1]
    apply = lambda params, tokens: nnx.merge(graphdef, params)(tokens)
    return init, apply


# %% ---------------------------------------------------------------- Loss and training
def make_batches(seen: tuple, shape: tuple, rng: np.random.Generator, cot: bool):
    """Batches of shape (..., batch): a uniform family, a uniform seen request of it, one sampled
    sequence. Returns tokens (..., T) and the loss mask (..., T - 1)."""
    table, counts = seen  # (4, R_max, 3), (4,)
    fam = rng.integers(0, 4, shape).reshape(-1)
    requests = table[fam, rng.integers(0, counts[fam])]
    seqs = sample_sequences(requests, rng, cot)
    # Loss on every token after the prompt, up to EOS (the scratchpad counts in the CoT arm).
    t = np.arange(seqs.shape[1] - 1)
    mask = (t[None] >= np.asarray(PROMPT_LEN)[fam][:, None] - 1) & (seqs[:, 1:] != PAD)
    return seqs.reshape(*shape, -1), mask.reshape(*shape, -1)


def make_train_chunk(apply, tx):
    def loss_fn(params, seqs, mask):
        logits = apply(params, seqs[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:])
        return (nll * mask).sum() / mask.sum()

    def step(carry, batch):
        params, opt_state = carry
        seqs, mask = batch
        loss, grads = jax.value_and_grad(loss_fn)(params, seqs, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def run(params, opt_state, seqs, mask):  # seqs (steps, batch, T)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (seqs, mask))
        return params, opt_state, losses.mean()

    return jax.jit(jax.vmap(run))  # over seeds


# %% ---------------------------------------------------------------- Sampling and evaluation
def make_generate(apply, length: int):
    """Autoregressive sampling: each position after the prompt is drawn from the model's own
    next-token distribution (temperature 1) and fed back in."""

    def generate(params, prompts, prompt_len, key):  # (N, T), (N,) -> (N, T)
        def step(tokens, t_key):
            t, k = t_key
            logits = apply(params, tokens)[:, t]  # predicts position t + 1
            nxt = jax.random.categorical(k, logits)
            write = t + 1 >= prompt_len
            return tokens.at[:, t + 1].set(jnp.where(write, nxt, tokens[:, t + 1])), None

        steps = jnp.arange(length - 1)
        tokens, _ = jax.lax.scan(step, prompts, (steps, jax.random.split(key, length - 1)))
        return tokens

    return jax.jit(jax.vmap(generate, in_axes=(0, None, None, 0)))  # over seeds


def eval_sets(num_requests: int, heldout_only: bool = False) -> dict:
    """Fixed evaluation requests per (family, split)."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    sets = {}
    for (fam, split), reqs in split_requests().items():
        if heldout_only and split != "heldout":
            continue
        pick = rng.choice(len(reqs), min(num_requests, len(reqs)), replace=False)
        sets[(fam, split)] = reqs[np.sort(pick)]
    return sets


def answer_stats(requests: np.ndarray, answers: np.ndarray) -> tuple[float, float, float]:
    """validity, mean TV to target, mean plug-in entropy; answers (R, S), -1 = unparseable."""
    tvs, ents = [], []
    for req, ans in zip(requests, answers):
        counts = np.bincount(ans + 1, minlength=102)  # bin 0 holds the unparseable answers
        p_hat = counts / counts.sum()
        target = np.concatenate([[0.0], target_distribution(req)])
        tvs.append(0.5 * np.abs(p_hat - target).sum())
        nz = p_hat[p_hat > 0]
        ents.append(-(nz * np.log(nz)).sum())
    valid = is_valid(np.repeat(requests, answers.shape[1], 0), answers.reshape(-1)).mean()
    return float(valid), float(np.mean(tvs)), float(np.mean(ents))


GEN_BATCH = 768  # sequences per generate call: one compiled shape serves every evaluation


def evaluate(generate, params, sets: dict, samples: int, key, length: int, num_seeds: int) -> dict:
    """Sample `samples` answers per request with every seed's model. Returns, per (family, split),
    the parsed answers (seeds, R, S) and the mean number of tokens generated per answer."""
    flat = np.repeat(np.concatenate(list(sets.values())), samples, 0)
    padded = np.resize(flat, (-(-len(flat) // GEN_BATCH) * GEN_BATCH, 3))  # whole blocks
    all_prompts, plen = prompts(padded, length), np.asarray(PROMPT_LEN)[padded[:, 0]]
    tokens = []
    for i in range(0, len(padded), GEN_BATCH):
        block = slice(i, i + GEN_BATCH)
        keys = shard_seeds(jax.random.split(jax.random.fold_in(key, i), num_seeds))
        out = generate(params, all_prompts[block], plen[block], keys)
        tokens.append(np.asarray(out)[:num_seeds])
    tokens = np.concatenate(tokens, axis=1)  # (seeds, N, T)
    out, start = {}, 0
    for name, reqs in sets.items():
        stop = start + len(reqs) * samples
        parsed = [parse_answers(tok[start:stop], plen[start:stop]) for tok in tokens]
        answers = np.stack([p[0] for p in parsed]).reshape(num_seeds, len(reqs), samples)
        out[name] = (answers, float(np.mean([p[1] for p in parsed])))
        start = stop
    return out


def loss_floor(cot: bool) -> float:
    """The lowest training loss possible: the entropy of the random tokens per loss token, for the
    uniform mix of families and their seen requests. The CoT arm's random tokens are its draws
    (u, and v for dice); the direct arm's are its answer."""
    table, counts = seen_table()
    ent, tokens = [], []
    for f in range(4):
        reqs = table[f, : counts[f]]
        if cot:
            h = (1 + (f == 2)) * np.log(draw_bound(reqs) + 1.0)
        else:
            h = np.array(
                [-(p[p > 0] * np.log(p[p > 0])).sum() for p in map(target_distribution, reqs)]
            )
        ent.append(h.mean())
        tokens.append((SCRATCH_LEN[f] if cot else 0) + ANSWER_LEN)
    return float(np.sum(ent) / np.sum(tokens))


def reference_stats(requests: np.ndarray, samples: int, rng) -> tuple[float, float]:
    """TV and entropy that exact samples from the target score with the same sample size."""
    draws = np.stack([rng.choice(101, samples, p=target_distribution(r)) for r in requests])
    _, tv, ent = answer_stats(requests, draws)
    return tv, ent


# %% ---------------------------------------------------------------- Training loop
def seen_table() -> tuple[np.ndarray, np.ndarray]:
    """Seen requests of each family stacked to one (4, R_max, 3) array, and their counts."""
    sets = split_requests()
    reqs = [sets[(f, "seen")] for f in FAMILIES]
    r_max = max(len(r) for r in reqs)
    return np.stack([np.resize(r, (r_max, 3)) for r in reqs]), np.array([len(r) for r in reqs])


def train(cfg: Config, cot: bool, init, apply, pbar) -> tuple:
    """Train num_seeds models of one arm together; returns params and the held-out TV curve."""
    arm = "cot" if cot else "direct"
    length = SEQ_LEN if cot else DIRECT_LEN
    warmup = max(1, min(200, cfg.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps)
    tx = optax.adamw(schedule, weight_decay=0.01)
    # Both arms start from the same weights and see the same requests and draws (same seeds).
    k_init, k_eval = jax.random.split(jax.random.key(cfg.seed))
    # The seed axis is split over every local device (padded to a multiple of the device count).
    params = shard_seeds(jax.vmap(init)(jax.random.split(k_init, cfg.num_seeds)))
    opt_state = jax.vmap(tx.init)(params)
    rng = np.random.default_rng(cfg.seed)
    seen = seen_table()
    run_chunk, generate = make_train_chunk(apply, tx), make_generate(apply, length)
    curve_sets = eval_sets(4, heldout_only=True)
    chunk = cfg.steps // cfg.curve_points
    curve = []  # (step, held-out TV per seed, averaged over families)

    def curve_point(step: int) -> None:
        key = jax.random.fold_in(k_eval, step)
        res = evaluate(generate, params, curve_sets, 64, key, length, cfg.num_seeds)
        tv = [
            [answer_stats(curve_sets[n], ans[s])[1] for n, (ans, _) in res.items()]
            for s in range(cfg.num_seeds)
        ]
        curve.append((step, np.mean(tv, axis=1)))

    curve_point(0)
    train_time = 0.0  # seconds in the training chunks only (not the curve's evaluations)
    for i in range(cfg.curve_points):
        tic = time.perf_counter()
        batch = make_batches(seen, (cfg.num_seeds, chunk, cfg.batch_size), rng, cot)
        params, opt_state, loss = run_chunk(params, opt_state, *shard_seeds(batch))
        loss = np.asarray(loss)[: cfg.num_seeds]  # each seed's mean loss over the chunk
        train_time += time.perf_counter() - tic
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"training diverged at step {(i + 1) * chunk}: loss is {loss}; "
                "try a smaller --learning-rate"
            )
        curve_point((i + 1) * chunk)
        pbar.update(1)
        tqdm.write(
            f"arm={arm} step={(i + 1) * chunk} loss={float(loss.mean()):.4f} "
            f"heldout_tv={float(curve[-1][1].mean()):.3f}"
        )
    return params, generate, curve, float(loss.mean()), train_time


# %% ---------------------------------------------------------------- Figures
def plot_distributions(sets: dict, results: dict, path: str) -> None:
    """One panel per family: answers with and without reasoning on one request, vs the target."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for ax, fam in zip(axes.flat, FAMILIES):
        split = "seen" if fam == "uniform" else "heldout"
        req = sets[(fam, split)][0]
        x = np.arange(101)
        ax.step(x, target_distribution(req), where="mid", color="k", lw=2, label="target")
        for arm, color in (("cot", "tab:blue"), ("direct", "tab:orange")):
            answers = results[arm][(fam, split)][0][:, 0].reshape(-1)  # all seeds, request 0
            freq = np.bincount(answers + 1, minlength=102)[1:] / len(answers)
            bad = np.mean(answers < 0)
            label = f"{arm} (unparseable {bad:.0%})" if bad > 0 else arm
            ax.step(x, freq, where="mid", color=color, alpha=0.8, label=label)
        what = {
            "uniform": "uniform 0..100",
            "range": f"range [{req[1]}, {req[2]}]",
            "dice": f"dice, faces 0..{req[1]}",
            "even": f"even in [0, {req[1]}]",
        }[fam]
        ax.set_title(f"{what} ({'held-out' if split == 'heldout' else 'seen'} request)")
        ax.set_xlabel("answer")
        ax.set_ylabel("probability")
        ax.legend(fontsize=8)
    fig.suptitle("Answer distributions with (cot) and without (direct) a scratchpad, all seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tv_curve(curves: dict, floor: float, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, color in (("cot", "tab:blue"), ("direct", "tab:orange")):
        steps = np.array([s for s, _ in curves[arm]])
        tv = np.stack([t for _, t in curves[arm]])  # (points, seeds)
        ax.plot(steps, tv, color=color, alpha=0.3, lw=1)
        ax.plot(steps, tv.mean(1), color=color, lw=2.5, label=f"{arm} (mean of seeds)")
    ax.axhline(floor, color="k", ls="--", lw=1, label="exact samples (estimator floor)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out TV distance (mean over families)")
    ax.set_title("Held-out requests: TV to the target during training (64 answers/request)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_table(metrics: dict) -> str:
    """The ablation as a markdown table: one row per family and split, both arms side by side."""
    rows = [
        "| family | split | validity cot / direct | TV cot / direct (floor) "
        "| entropy cot / direct (ref) |",
        "|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        for split in ("seen", "heldout"):
            k = f"{fam}_{split}"
            if f"{k}_cot_tv" not in metrics:
                continue
            v = lambda name, k=k: (
                f"{metrics[f'{k}_cot_{name}']:.3f} / {metrics[f'{k}_direct_{name}']:.3f}"
            )
            rows.append(
                f"| {fam} | {split} | {v('validity')} | {v('tv')} ({metrics[f'{k}_tv_floor']:.3f}) "
                f"| {v('entropy')} ({metrics[f'{k}_entropy_ref']:.2f}) |"
            )
    return "\n".join(rows) + "\n"


# %% ---------------------------------------------------------------- Main
def validate(cfg: Config) -> None:
    """Every option finite and in range, and the cross-field constraints, before any work."""
    for name in ("steps", "batch_size", "d_model", "n_layers", "n_heads", "num_seeds"):
        check_number(cfg, name, 1)
    for name in ("eval_requests", "eval_samples", "curve_points"):
        check_number(cfg, name, 1)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    if cfg.d_model % cfg.n_heads:
        raise option_error("d_model", cfg.d_model, f"must be divisible by --n-heads {cfg.n_heads}")
    if cfg.steps % cfg.curve_points:
        raise option_error(
            "steps", cfg.steps, f"must be a multiple of --curve-points {cfg.curve_points}"
        )
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    start_time = time.perf_counter()
    validate(cfg)
    init, apply = make_model_fns(cfg)
    sets = eval_sets(cfg.eval_requests)
    results, curves, tokens, losses, train_time = {}, {}, {}, {}, 0.0
    pbar = tqdm(total=2 * cfg.curve_points, desc="chunks", disable=None)
    for cot in (True, False):
        arm = "cot" if cot else "direct"
        params, generate, curves[arm], losses[arm], secs = train(cfg, cot, init, apply, pbar)
        train_time += secs
        key, length = jax.random.fold_in(jax.random.key(cfg.seed), 7), (DIRECT_LEN, SEQ_LEN)[cot]
        results[arm] = evaluate(
            generate, params, sets, cfg.eval_samples, key, length, cfg.num_seeds
        )
        tokens[arm] = float(np.mean([t for _, t in results[arm].values()]))
    pbar.close()
    num_params = sum(x.size for x in jax.tree.leaves(init(jax.random.key(0))))

    metrics: dict = {
        "task": "cot",
        "seed": cfg.seed,
        "num_seeds": cfg.num_seeds,
        "num_params": int(num_params),
        "steps": cfg.steps,
        "preset": getattr(cfg, "preset", "cpu"),
        **device_info(),
        # training steps per second, counting every seed of both arms (compilation included)
        "throughput": 2 * cfg.steps * cfg.num_seeds / train_time,
        "throughput_unit": "model-steps/s",
    }
    rng = np.random.default_rng(cfg.seed)
    agg: dict = {}
    for (fam, split), reqs in sets.items():
        tv_ref, ent_ref = reference_stats(reqs, cfg.eval_samples, rng)
        for arm in ("cot", "direct"):
            answers = results[arm][(fam, split)][0]
            stats = np.array([answer_stats(reqs, a) for a in answers])  # (seeds, 3)
            for name, value in zip(("validity", "tv", "entropy"), stats.mean(0)):
                metrics[f"{fam}_{split}_{arm}_{name}"] = float(value)
            metrics[f"{fam}_{split}_{arm}_tv_std"] = float(stats[:, 1].std())
            if split == "heldout":
                agg.setdefault(f"tv_{arm}", []).append(stats[:, 1])
                agg.setdefault(f"validity_{arm}", []).append(stats[:, 0])
        metrics[f"{fam}_{split}_tv_floor"] = tv_ref
        metrics[f"{fam}_{split}_entropy_ref"] = ent_ref
        metrics[f"{fam}_{split}_entropy_target"] = float(
            np.mean([-(p[p > 0] * np.log(p[p > 0])).sum() for p in map(target_distribution, reqs)])
        )
    for name, per_family in agg.items():
        per_seed = np.mean(per_family, axis=0)  # mean over families, per seed
        metrics[f"heldout_{name}"] = float(per_seed.mean())
        metrics[f"heldout_{name}_std"] = float(per_seed.std())
    metrics["heldout_tv_floor"] = float(
        np.mean([metrics[f"{f}_heldout_tv_floor"] for f in FAMILIES[1:]])
    )
    for arm in ("cot", "direct"):  # training loss (last chunk's mean) against its floor
        metrics[f"{arm}_train_loss"] = losses[arm]
        metrics[f"{arm}_train_loss_floor"] = loss_floor(arm == "cot")
    metrics["cot_tokens_per_answer"] = tokens["cot"]
    metrics["direct_tokens_per_answer"] = tokens["direct"]

    curve_floor = float(
        np.mean([reference_stats(r, 64, rng)[0] for r in eval_sets(4, heldout_only=True).values()])
    )
    table = comparison_table(metrics)
    tqdm.write(table)
    with staged_run(cfg.out_dir) as out:
        plot_distributions(sets, results, out / "distributions.png")
        plot_tv_curve(curves, curve_floor, out / "tv_curve.png")
        (out / "comparison.md").write_text(table)
        metrics["wall_time_s"] = float(time.perf_counter() - start_time)
        write_metrics(out, cfg, metrics)
    print(
        " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k.startswith(("heldout", "cot_", "wall"))
        )
    )
    return metrics


if __name__ == "__main__":
    run_cli()
