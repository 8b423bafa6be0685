"""Reverse a sequence of digits with a decoder-only transformer written by hand in jax.numpy.

What this teaches: every part of a GPT-style decoder with no layer library (token embedding,
learned positions, causal multi-head self-attention and its mask, LayerNorm, the MLP, residuals,
the output projection, cross-entropy, greedy autoregressive decoding); only Adam comes from optax.

The task: n random digits (n uniform in 1..L, V kinds), a separator, then the digits reversed,
`3 1 4 1 5 | 5 1 4 1 3`; the loss counts only the reversed part. Prompts are left-padded to L
tokens, as decoder-only models batch prompts, so the separator sits at position L and the token
emitted at position p copies position 2L - 1 - p: a lookup by position, which a first-layer head
learns as an anti-diagonal (attention.png).

Key equations (Vaswani et al. 2017, "Attention is all you need"; GPT-2's pre-LN layout):

    x_p = E[token_p] + P[p]                      (token embedding + learned position vector)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V,  M[i, j] = -inf if j > i else 0
    LayerNorm(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b
    block: x <- x + MHA(LN(x));  x <- x + W2 relu(W1 LN(x) + b1) + b2
    loss = mean over reversed positions of -log softmax(logits)[target]

    python tasks/reverse_digits.py          # the defaults (preset `cpu`; no paper-scale preset)
    python tasks/reverse_digits.py --help

Expected result (defaults, L = 12, V = 10): exact match of greedy decoding 1.000 on 4000 held-out
sequences never seen in training (bar >= 0.99); about 38 s on 2 CPU cores (docs/reverse_digits.md).
Differences from the paper: decoder only, learned positions instead of sinusoids, pre-LN, no
dropout.
"""

# %% [markdown]
# ## Imports and shared helpers
# The helpers are identical in every task (a test compares the copies); the lesson starts below.
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


# %% [markdown]
# ## Config: the defaults are the 2-core CPU run (preset `cpu`)
# %%
@dataclasses.dataclass(frozen=True)
class Config:  # each field's comment is its `--help` text
    seq_len: int = 12  # L: the longest sequence; each length is drawn uniformly in 1..L
    vocab_size: int = 10  # V: distinct digit tokens (the separator and padding come on top)
    d_model: int = 32  # width of the residual stream
    num_heads: int = 4  # attention heads per layer
    num_layers: int = 2  # transformer blocks (the reversal itself needs one)
    num_train: int = 100_000  # size of the fixed training set
    num_heldout: int = 4000  # held-out sequences (none of them in the training set)
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # sequences per step
    learning_rate: float = 3e-3  # peak Adam learning rate (linear warmup, then cosine decay to 0)
    seed: int = 0  # random seed for data, initialisation and batches
    out_dir: str = "runs/reverse_digits"  # where figures and metrics.json are written


PRESETS: dict[str, Config] = {"cpu": Config()}
HELDOUT_DRAWS = 3  # held-out candidates drawn per sequence kept (the ones seen in training drop)


# %% [markdown]
# ## Data
# A row `[PAD.., x_0..x_{k-1}, SEP, x_{k-1}..x_0, ..PAD]` is a palindrome around the separator at
# position $L$: output slot $t$ (position $L+1+t$) copies position $L-1-t$, whatever $k$ is.
# %%
def tokens(cfg: Config) -> tuple[int, int, int]:
    """Digits are 0..V-1; then the separator and the padding token. Returns (sep, pad, n_tokens)."""
    return cfg.vocab_size, cfg.vocab_size + 1, cfg.vocab_size + 2


def make_sequences(key: jax.Array, n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """n left-padded rows (n, 2L + 1) and their lengths k (n,)."""
    sep, pad, _ = tokens(cfg)
    key_len, key_dig = jax.random.split(key)
    lengths = np.asarray(jax.random.randint(key_len, (n,), 1, cfg.seq_len + 1), dtype=np.int32)
    digits = np.asarray(jax.random.randint(key_dig, (n, cfg.seq_len), 0, cfg.vocab_size))
    prompt = np.where(np.arange(cfg.seq_len) >= cfg.seq_len - lengths[:, None], digits, pad)
    rows = np.concatenate([prompt, np.full((n, 1), sep), prompt[:, ::-1]], axis=1)  # (n, 2L + 1)
    return rows.astype(np.int32), lengths


def loss_mask(lengths: jax.Array, width: int) -> jax.Array:
    """Which next-token targets count: the k reversed tokens, at positions L+1..L+k."""
    half = (width - 1) // 2  # = L, the separator's position
    target_pos = jnp.arange(1, width)[None]  # the target of input position p is seq[p + 1]
    return (target_pos > half) & (target_pos <= half + lengths[:, None])  # (B, 2L)


def make_datasets(cfg: Config, key_train, key_heldout) -> tuple[np.ndarray, ...]:
    """The training set, and a held-out set of fresh draws minus any row seen in training."""
    train_seqs, train_lengths = make_sequences(key_train, cfg.num_train, cfg)
    seen = {s.tobytes() for s in train_seqs}
    seqs, lengths = make_sequences(key_heldout, HELDOUT_DRAWS * cfg.num_heldout, cfg)
    fresh = np.flatnonzero([s.tobytes() not in seen for s in seqs])[: cfg.num_heldout]
    if len(fresh) == 0:  # validate checked the expected count, not this draw
        raise option_error("num_heldout", cfg.num_heldout, "no drawn sequence was unseen; lower it")
    if len(fresh) < cfg.num_heldout:  # metrics.json records the number used
        print(f"note: only {len(fresh)} unseen sequences for the held-out set")
    return train_seqs, train_lengths, seqs[fresh], lengths[fresh]


# %% [markdown]
# ## The model, by hand
# One plain pytree of weights; a pre-LN block is $x \mathrel{+}= \mathrm{MHA}(\mathrm{LN}(x))$,
# $x \mathrel{+}= \mathrm{MLP}(\mathrm{LN}(x))$; attention: $\mathrm{softmax}(QK^\top/\sqrt{d}+M)V$.
# %%
def init_params(key: jax.Array, cfg: Config) -> dict:
    """N(0, 0.02) matrices (residual outputs / sqrt(2 layers), GPT-2), zero biases, unit gains."""
    d, n_tokens = cfg.d_model, tokens(cfg)[2]
    k = iter(jax.random.split(key, 3 + 6 * cfg.num_layers))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(k), shape)
    out_std, ones, zeros = 0.02 / np.sqrt(2 * cfg.num_layers), jnp.ones(d), jnp.zeros(d)
    layers = [
        {"ln1_g": ones, "ln1_b": zeros, "w_q": normal((d, d)), "w_k": normal((d, d)),
         "w_v": normal((d, d)), "w_o": normal((d, d), out_std), "ln2_g": ones, "ln2_b": zeros,
         "w_1": normal((d, 4 * d)), "b_1": jnp.zeros(4 * d),
         "w_2": normal((4 * d, d), out_std), "b_2": zeros}
        for _ in range(cfg.num_layers)
    ]  # fmt: skip
    embed, pos_embed = normal((n_tokens, d)), normal((2 * cfg.seq_len, d))  # learned positions
    return {"embed": embed, "pos_embed": pos_embed, "layers": layers, "ln_f_g": ones,
            "ln_f_b": zeros, "w_out": normal((d, n_tokens))}  # fmt: skip


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalise each vector over its channels, then scale and shift."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased variance, as in the paper
    return g * (x - mean) / jnp.sqrt(var + eps) + b


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q, k, v: (B, T, H, Dh) -> the output (B, T, H, Dh) and the weights (B, H, T, T)."""
    t, d_head = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d_head)  # (B, H, T, T)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # query i may see keys j <= i only
    scores = jnp.where(causal, scores, -jnp.inf)
    scores = scores - scores.max(-1, keepdims=True)  # stable softmax; the diagonal is never masked
    weights = jnp.exp(scores)
    weights = weights / weights.sum(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v), weights


def forward(params: dict, seq: jax.Array, num_heads: int) -> tuple[jax.Array, list]:
    """Logits (B, T, n_tokens) for input tokens seq (B, T), and each layer's attention weights."""
    b, t = seq.shape
    x = params["embed"][seq] + params["pos_embed"][:t]  # token + position: (B, T, D)
    d, attn_maps = x.shape[-1], []
    for p in params["layers"]:
        h = layer_norm(x, p["ln1_g"], p["ln1_b"])
        split = lambda w, h=h: (h @ w).reshape(b, t, num_heads, d // num_heads)  # (B, T, H, Dh)
        out, weights = causal_attention(split(p["w_q"]), split(p["w_k"]), split(p["w_v"]))
        x = x + out.reshape(b, t, d) @ p["w_o"]  # residual around attention
        h = layer_norm(x, p["ln2_g"], p["ln2_b"])
        x = x + jnp.maximum(h @ p["w_1"] + p["b_1"], 0.0) @ p["w_2"] + p["b_2"]  # residual MLP
        attn_maps.append(weights)
    x = layer_norm(x, params["ln_f_g"], params["ln_f_b"])
    return x @ params["w_out"], attn_maps  # output projection to token logits


# %% [markdown]
# ## Loss and the jitted training step
# $\mathcal{L} = -\mathrm{mean}_{(b,p) \in \text{mask}} \log \mathrm{softmax}(z_{b,p})[y_{b,p}]$
# over the reversed part only, with a stable log-sum-exp.
# %%
def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean of -log softmax(logits)[target], with a stable log-sum-exp."""
    m = logits.max(-1, keepdims=True)
    log_z = jnp.log(jnp.exp(logits - m).sum(-1)) + m[..., 0]  # (B, T)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return ((log_z - picked) * mask).sum() / mask.sum()


# %% [markdown]
# ## Train
# Adam with global-norm clipping, linear warmup and cosine decay. The steps run jitted in
# `lax.scan` chunks; between chunks the host checks that the loss is finite and logs it.
# %%
def train(cfg: Config, key: jax.Array, train_seqs, train_lengths, heldout_seqs, heldout_lengths):
    """Params, loss histories, and tokens/s of the loop (its compiling first chunk left out)."""
    key_init, key_steps = jax.random.split(key)
    params = init_params(key_init, cfg)
    warmup = max(1, cfg.steps // 20)  # 5% linear warmup, then cosine decay to 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    data = jnp.asarray(train_seqs), jnp.asarray(train_lengths)

    def loss_fn(params, seqs, lengths):
        logits, _ = forward(params, seqs[:, :-1], cfg.num_heads)
        return cross_entropy(logits, seqs[:, 1:], loss_mask(lengths, seqs.shape[1]))

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (cfg.batch_size,), 0, cfg.num_train)
        loss, grads = jax.value_and_grad(loss_fn)(params, data[0][idx], data[1][idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    chunk_fn = jax.jit(lambda p, opt_state, keys: jax.lax.scan(step, (p, opt_state), keys))
    eval_loss = jax.jit(loss_fn)
    chunk, step_keys = max(1, min(100, cfg.steps // 10)), jax.random.split(key_steps, cfg.steps)
    heldout = jnp.asarray(heldout_seqs[:1000]), jnp.asarray(heldout_lengths[:1000])
    train_losses, heldout_losses = [], []
    clock = [time.perf_counter(), 0]  # (start, first step timed): restarted after the first chunk
    for start in tqdm(range(0, cfg.steps, chunk), disable=None, desc="train"):
        (params, opt_state), losses = chunk_fn(params, opt_state, step_keys[start : start + chunk])
        losses = np.asarray(losses)
        if not np.isfinite(losses).all():  # once per chunk, on the host
            bad = int(np.argmin(np.isfinite(losses)))
            why = f"loss is {losses[bad]}; try a smaller --learning-rate"
            raise FloatingPointError(f"training diverged at step {start + bad + 1}: {why}")
        train_losses.extend(losses.tolist())
        heldout_losses.append((start + len(losses), float(eval_loss(params, *heldout))))
        if start == 0 and cfg.steps > chunk:
            clock = [time.perf_counter(), len(losses)]
        if (start // chunk) % 5 == 0 or start + chunk >= cfg.steps:
            at, heldout_loss = heldout_losses[-1]
            tqdm.write(f"step={at} train_loss={losses[-1]:.4f} heldout_loss={heldout_loss:.4f}")
    tokens = (cfg.steps - clock[1]) * cfg.batch_size * 2 * cfg.seq_len  # input tokens per step
    tokens_per_s = tokens / (time.perf_counter() - clock[0])
    return params, np.array(train_losses), np.array(heldout_losses), tokens_per_s


# %% [markdown]
# ## Evaluate: greedy decoding on unseen sequences
# Step $t$ writes position $L+1+t$ from the logits at $L+t$, the model's own previous output; the
# causal mask hides the padding after it, so a full forward pass per step is exact (no KV cache).
# %%
def greedy_decode(params: dict, seqs: jax.Array, lengths: jax.Array, cfg: Config) -> jax.Array:
    """The rows (B, 2L + 1) with their second half written by the model, token by token."""
    half, width, pad = cfg.seq_len, seqs.shape[1], tokens(cfg)[1]
    buf = jnp.where(jnp.arange(width)[None] <= half, seqs, pad)  # the prompt only: (B, 2L + 1)

    def step(buf, t):
        logits, _ = forward(params, buf[:, :-1], cfg.num_heads)  # (B, 2L, n_tokens)
        next_tok = jnp.argmax(logits[:, half + t], axis=-1)  # (B,); padding after k tokens
        return buf.at[:, half + 1 + t].set(jnp.where(t < lengths, next_tok, pad)), None

    return jax.lax.scan(step, buf, jnp.arange(cfg.seq_len))[0]


def evaluate(params: dict, seqs: np.ndarray, lengths: np.ndarray, cfg: Config) -> dict:
    """Exact match (all k output tokens right) and per-token accuracy of greedy decoding."""
    decoded = np.asarray(jax.jit(greedy_decode, static_argnums=3)(params, seqs, lengths, cfg))
    mask = np.asarray(loss_mask(jnp.asarray(lengths), seqs.shape[1]))  # output slots
    correct = (decoded[:, 1:] == seqs[:, 1:]) | ~mask
    token_accuracy = ((decoded[:, 1:] == seqs[:, 1:]) & mask).sum() / mask.sum()
    exact = correct.all(axis=1)
    return {"exact_match": float(exact.mean()), "token_accuracy": float(token_accuracy),
            "exact_rows": exact, "decoded": decoded}  # fmt: skip


# %% [markdown]
# ## Figures
# Each layer's clearest head on the longest held-out example (the loss curves, examples and exact
# match by length: `studies/reverse_digits_by_length.py`).
# %%
def plot_attention(attn_maps: list, seq: np.ndarray, cfg: Config, path: pathlib.Path) -> None:
    """Each layer's head with the most weight on the anti-diagonal, where output query L + t
    reads key L - 1 - t. Rows are queries, columns keys."""
    t, sep, pad = 2 * cfg.seq_len, *tokens(cfg)[:2]
    labels = [{sep: "|", pad: "_"}.get(int(s), str(s)) for s in seq[:t]]
    rows = np.arange(cfg.seq_len, t)  # the queries that emit outputs
    fig, axes = plt.subplots(1, cfg.num_layers, figsize=(4 * cfg.num_layers, 4.3), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        maps = np.asarray(attn_maps[layer][0])  # (H, T, T)
        head = int(np.argmax(maps[:, rows, t - 1 - rows].mean(-1)))
        ax.imshow(maps[head, :t, :t], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(t), labels, fontsize=7)
        ax.set_yticks(range(t), labels, fontsize=7)
        ax.set_xlabel("key position", fontsize=12)
        ax.set_ylabel("query position", fontsize=12)
        ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=13)
    fig.suptitle("Attention on a held-out example: reversal = anti-diagonal", fontsize=13)
    fig.tight_layout()
    save_figure(fig, path)


# %% [markdown]
# ## Main
# Validate every option before any work (enough held-out draws must be unseen in training), then
# data, train, evaluate, figures, and `metrics.json` last, atomically.
# %%
INTEGER_OPTIONS = ("seed", "seq_len", "vocab_size", "d_model", "num_heads", "num_layers",
                   "num_train", "num_heldout", "steps", "batch_size")  # fmt: skip


def validate(cfg: Config) -> None:
    """Every option finite and in range, and the rules between options; no model or data work."""
    for name in INTEGER_OPTIONS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise option_error(name, value, "must be an integer")
        check_number(cfg, name, *((0, 2**32 - 1) if name == "seed" else (1,)))
    check_number(cfg, "vocab_size", 2)  # with one digit every reversal is the input itself
    check_number(cfg, "learning_rate", 0.0, 1.0, low_open=True)
    if cfg.d_model % cfg.num_heads:
        why = f"must divide --d-model {cfg.d_model} (equal head widths)"
        raise option_error("num_heads", cfg.num_heads, why)
    # Expected unseen held-out draws: a draw of length k is one of V^k rows, each drawn with
    # probability p_k = 1 / (L V^k), so it is unseen with probability (1 - p_k)^num_train.
    p = [1 / (cfg.seq_len * cfg.vocab_size**k) for k in range(1, cfg.seq_len + 1)]
    unseen = sum(math.exp(cfg.num_train * math.log1p(-p_k)) for p_k in p) / cfg.seq_len
    if (unseen := HELDOUT_DRAWS * cfg.num_heldout * unseen) < cfg.num_heldout:
        why = (f"only about {unseen:.0f} of the {HELDOUT_DRAWS * cfg.num_heldout} sequences drawn "
               "for it would be unseen in training; lower --num-heldout or --num-train, or raise "
               "--seq-len or --vocab-size")  # fmt: skip
        raise option_error("num_heldout", cfg.num_heldout, why)
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    timer = PhaseTimer()
    validate(cfg)
    key_train, key_heldout, key_model = jax.random.split(jax.random.key(cfg.seed), 3)
    data = make_datasets(cfg, key_train, key_heldout)
    train_seqs, train_lengths, heldout_seqs, heldout_lengths = data
    timer.lap("setup")
    params, train_losses, heldout_losses, tokens_per_s = train(
        cfg, key_model, train_seqs, train_lengths, heldout_seqs, heldout_lengths
    )
    timer.lap("train")
    heldout = evaluate(params, heldout_seqs, heldout_lengths, cfg)
    n = cfg.num_heldout  # as many training rows, for train_exact_match
    train_eval = evaluate(params, train_seqs[:n], train_lengths[:n], cfg)
    example = heldout_seqs[int(np.argmax(heldout_lengths))]  # the longest: the clearest map
    _, attn_maps = forward(params, jnp.asarray(example[None, :-1]), cfg.num_heads)
    metrics = {
        "task": "reverse_digits", "seed": cfg.seed, "preset": getattr(cfg, "preset", "cpu"),
        "exact_match": heldout["exact_match"], "exact_match_target": 0.99,
        "token_accuracy": heldout["token_accuracy"], "train_exact_match": train_eval["exact_match"],
        "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size,
        "num_heldout": int(len(heldout_seqs)), "heldout_mean_length": float(heldout_lengths.mean()),
        "final_train_loss": float(train_losses[-20:].mean()),
        "final_heldout_loss": float(heldout_losses[-1, 1]),
        **device_info(), "throughput": tokens_per_s, "throughput_unit": "tokens/s",
        "wall_time_s_ceiling": 120,  # the task's time bar (scripts/run_all.py)
    }  # fmt: skip
    print(" ".join(f"{k}={metrics[k]:.4f}" for k in ("exact_match", "token_accuracy",
                                                      "train_exact_match")))  # fmt: skip
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:
        plot_attention(attn_maps, example, cfg, out / "attention.png")
        metrics["wall_time_s"], metrics["time_split_s"] = timer.lap("figures"), timer.split
        write_metrics(out, cfg, metrics)
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
