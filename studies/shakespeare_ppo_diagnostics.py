"""Diagnostics of shakespeare_ppo's policies beyond the task's bars (shakespeare_ppo study).

This study trains exactly what `tasks/shakespeare_ppo.py` trains (same config, seed and keys),
samples the same evaluation verses (`sp.sample_policies`), and measures for each policy (uniform
random, reference, PPO: mean over seeds) what no bar of the task needs: the exact KL to the
reference, the held-out trigram perplexity, distinct-1, the share of the verses' bigrams that occur
in the sonnets, the mean copied span and the verse length. The task wrote these itself until
issue 12, under the same names (`ppo_kl_to_reference`, `reference_heldout_ppl`, ...).

    python studies/shakespeare_ppo_diagnostics.py   # writes runs/shakespeare_ppo/study/diagnostics/
    python studies/shakespeare_ppo_diagnostics.py --help    # the task's options

It writes metrics.json (last, atomically) into --out-dir.
"""

import dataclasses
import pathlib
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import shakespeare_ppo as sp  # noqa: E402

OUT_DIR = "runs/shakespeare_ppo/study/diagnostics"


def kl_to_reference(graphdef, ref_params, tokens: jax.Array, policy_logits=None) -> jax.Array:
    """Exact per-token KL(pi || pi_ref) summed along each verse, averaged over verses.
    policy_logits None means the uniform random policy."""
    ref_logp = jax.nn.log_softmax(nnx.merge(graphdef, ref_params)(tokens))
    if policy_logits is None:
        policy_logits = jnp.zeros_like(ref_logp).at[..., sp.UNK].set(-1e9)
    logp = jax.nn.log_softmax(policy_logits)
    kl_t = (jnp.exp(logp) * (logp - ref_logp)).sum(-1)
    return (kl_t * sp.valid_mask(tokens)).sum(1).mean()


@partial(jax.jit, static_argnums=0)
def jax_diagnostics(graphdef, heldout_ngram, ref_params, params, tokens, temp) -> dict:
    """Held-out perplexity, KL to the reference and length of one sample of verses."""
    valid = sp.valid_mask(tokens)
    logits = None if params is None else nnx.merge(graphdef, params)(tokens) / temp
    heldout_ll = (sp.ngram_logprobs(heldout_ngram, tokens) * valid).sum() / valid.sum()
    return {
        "heldout_ppl": jnp.exp(-heldout_ll),
        "kl_to_reference": kl_to_reference(graphdef, ref_params, tokens, logits),
        "length": valid.sum(1).mean(),
    }


def corpus_statistics(data: dict) -> dict:
    """What the diagnostics compare against: a trigram model of the held-out couplets (only for
    the perplexity) and the set of bigrams of all couplets, training and held-out."""
    corpus = np.concatenate([data["train"], data["heldout"]])
    return {
        "heldout_ngram": sp.fit_ngram(data["heldout"], len(data["vocab"])),
        "corpus_bigrams": {(int(b), int(c)) for row in corpus for b, c in zip(row, row[1:])},
    }


def diagnostics(data, corpus, graphdef, ref_params, tokens, params, temp=1.0) -> dict:
    """Every diagnostic of one sample of verses from the policy `params` at `temp`."""
    out = jax_diagnostics(graphdef, corpus["heldout_ngram"], ref_params, params, tokens, temp)
    verses = [list(sp.until_end(row)) for row in np.asarray(tokens)]
    unigrams = [t for seq in verses for t in seq]
    bigrams = [b for seq in verses for b in zip(seq, seq[1:])]
    words = [[data["vocab"][t] for t in seq] for seq in verses]
    copies = [sp.longest_copy(w, data["train_ids"], data["train_index"]) for w in words]
    return {
        **{k: float(v) for k, v in out.items()},
        "distinct1": len(set(unigrams)) / max(len(unigrams), 1),
        "corpus_bigram_share": sum(b in corpus["corpus_bigrams"] for b in bigrams)
        / max(len(bigrams), 1),
        "mean_copy_words": float(np.mean(copies)),
    }


def main(cfg: sp.Config) -> dict:
    """The task's training and evaluation verses, then the diagnostics of each policy."""
    sp.validate(cfg)
    data = sp.prepare_data(cfg.vocab_size)
    corpus = corpus_statistics(data)
    _, k_ref, k_ppo, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)  # as in sp.main
    graphdef, ref_params = sp.pretrain_reference(cfg, data["mle_pairs"], k_ref)
    ppo_params, _ = sp.train_ppo(cfg, data, graphdef, ref_params, k_ppo)
    policies = sp.sample_policies(cfg, data, graphdef, ref_params, ppo_params, k_eval)
    per_seed = [jax.tree.map(lambda x, s=s: x[s], ppo_params) for s in range(cfg.num_seeds)]
    params = {"random": [None], "reference": [ref_params], "ppo": per_seed}  # None: uniform
    m = {"study": "shakespeare_ppo_diagnostics", "seed": cfg.seed, "num_seeds": cfg.num_seeds}
    for name, runs in policies.items():
        per_run = [
            diagnostics(data, corpus, graphdef, ref_params, tokens, p)
            for tokens, p in zip(runs, params[name])
        ]
        m.update({f"{name}_{k}": float(np.mean([r[k] for r in per_run])) for k in per_run[0]})
    with sp.staged_run(cfg.out_dir) as out:
        sp.write_metrics(out, cfg, m)
    print(" ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    return m


if __name__ == "__main__":
    main(tyro.cli(sp.Config, default=dataclasses.replace(sp.Config(), out_dir=OUT_DIR)))
