"""The diagnostics study of shakespeare_ppo: the exact KL, and a mini run beside the task's."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import shakespeare_ppo as sp  # noqa: E402  (tasks/ is on the path: tests/conftest.py)
import shakespeare_ppo_diagnostics as diag  # noqa: E402

MINI = dict(pretrain_steps=2, ppo_iterations=1, episodes_per_iteration=4, ppo_epochs=1)
MINI.update(num_minibatches=1, num_seeds=2, eval_samples=4)


def test_shakespeare_ppo_diagnostics_kl_is_exact():
    """KL(pi_ref || pi_ref) = 0; the random policy's KL is the sum over the verse's steps of
    sum_a u(a) (log u(a) - log pi_ref(a)), u uniform over every token but <unk>."""
    vocab_size = 7
    graphdef, params = nnx.split(sp.GRUNet(vocab_size, 8, vocab_size, nnx.Rngs(0)))
    tokens = jnp.array([[3, 4, sp.END, 5], [6, 3, 4, 5]], dtype=jnp.int32)
    logits = nnx.merge(graphdef, params)(tokens)
    same = diag.kl_to_reference(graphdef, params, tokens, logits)
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    ref_logp = np.asarray(jax.nn.log_softmax(logits))
    allowed = [a for a in range(vocab_size) if a != sp.UNK]
    lengths = [3, 4]  # up to and including the first <end>
    per_verse = [
        sum(np.mean([-np.log(len(allowed)) - ref_logp[b, t, a] for a in allowed]) for t in range(n))
        for b, n in enumerate(lengths)
    ]
    random_kl = diag.kl_to_reference(graphdef, params, tokens)
    assert float(random_kl) == pytest.approx(np.mean(per_verse), rel=1e-4)


@pytest.mark.slow  # a side study's run (make test-all)
def test_shakespeare_ppo_diagnostics_mini_run(tmp_path):
    """Every diagnostic of every policy, under the names the task wrote before issue 12."""
    m = diag.main(sp.Config(**MINI, out_dir=str(tmp_path)))
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    names = ["kl_to_reference", "heldout_ppl", "distinct1", "corpus_bigram_share"]
    names += ["mean_copy_words", "length"]
    for policy in ["random", "reference", "ppo"]:
        for name in names:
            assert np.isfinite(m[f"{policy}_{name}"]), (policy, name)
    assert m["reference_kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert m["random_kl_to_reference"] > 0  # small: 2 MLE steps leave the reference near uniform
    assert 0 < m["ppo_distinct1"] <= 1 and 0 <= m["ppo_corpus_bigram_share"] <= 1
