"""Tests for tasks/cot.py: causality, the scratchpad arithmetic, parsing, validity, learning."""

import json

import cot
import jax
import numpy as np
import pytest

REQUESTS = np.array([[0, 0, 100], [1, 23, 71], [2, 12, 0], [3, 57, 0]])


def test_cot_causal_mask():
    """Changing token j leaves the logits at every position before j unchanged."""
    init, apply = cot.make_model_fns(cot.Config(d_model=16, n_heads=2))
    params, apply = init(jax.random.key(0)), jax.jit(apply)
    tokens = jax.random.randint(jax.random.key(1), (2, cot.SEQ_LEN), 0, cot.VOCAB)
    base = apply(params, tokens)
    for j in (1, 6, cot.SEQ_LEN - 1):
        changed = tokens.at[:, j].set((tokens[:, j] + 1) % cot.VOCAB)
        out = apply(params, changed)
        np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6)
        assert not np.allclose(out[:, j:], base[:, j:])  # the change is visible from j on


def test_cot_scratchpads_by_hand():
    """The docstring's worked examples, token for token."""
    u, v = np.array([61, 17, 7, 13]), np.array([0, 0, 9, 0])
    got = cot.build_sequences(REQUESTS, u, v, cot=True)
    U, R, D, E, A, Q, P = 11, 12, 13, 14, cot.ANS, cot.EOS, cot.PAD
    want = [
        [U, 10, 0, 6, 1, A, 6, 1, Q] + [P] * 6,  # n = 100, u = 61, x = 61
        [R, 2, 3, 7, 1, 1, 4, 8, 1, 7, 1, A, 4, 0, Q],  # borrow, n = 48, u = 17, carry, 40
        [D, 1, 2, 0, 7, 1, 2, 0, 9, 1, A, 1, 6, Q, P],  # u = 7, copy 12, v = 9, carry, 16
        [E, 5, 7, 2, 8, 1, 3, 0, A, 2, 6, Q, P, P, P],  # m = 28, u = 13, no carry, 26
    ]
    np.testing.assert_array_equal(got, want)
    direct = cot.build_sequences(REQUESTS, u, v, cot=False)
    np.testing.assert_array_equal(direct[1], [R, 2, 3, 7, 1, A, 4, 0, Q])
    np.testing.assert_array_equal(cot.prompts(REQUESTS, 6)[1], [R, 2, 3, 7, 1, P])


def test_cot_scratchpad_arithmetic_is_exact():
    """For many random requests, the scratchpad's parts (borrow, difference, carry, answer) agree
    with integer arithmetic, the answer is valid, and both arms write the same answer."""
    rng = np.random.default_rng(0)
    reqs = np.concatenate([r for r in cot.split_requests().values()])
    reqs = reqs[rng.integers(0, len(reqs), 3000)]
    n = cot.draw_bound(reqs)
    u, v = rng.integers(0, n + 1), rng.integers(0, n + 1)
    seqs = cot.build_sequences(reqs, u, v, cot=True)
    plen = np.asarray(cot.PROMPT_LEN)[reqs[:, 0]]
    x, generated = cot.parse_answers(seqs, plen)
    want = np.select(
        [reqs[:, 0] == 0, reqs[:, 0] == 1, reqs[:, 0] == 2], [u, reqs[:, 1] + u, u + v]
    )
    np.testing.assert_array_equal(x, np.where(reqs[:, 0] == 3, 2 * u, want))
    assert cot.is_valid(reqs, x).all()
    rng_ = reqs[:, 0] == 1
    s = seqs[rng_]
    np.testing.assert_array_equal(s[:, 5], s[:, 4] < s[:, 2])  # borrow = [b0 < a0]
    np.testing.assert_array_equal(10 * s[:, 6] + s[:, 7], reqs[rng_, 2] - reqs[rng_, 1])
    direct_x, direct_gen = cot.parse_answers(cot.build_sequences(reqs, u, v, cot=False), plen)
    np.testing.assert_array_equal(direct_x, x)
    assert (direct_gen == 3).all()
    np.testing.assert_array_equal(generated, np.asarray(cot.SCRATCH_LEN)[reqs[:, 0]] + 3)


def test_cot_parse_answers_by_hand():
    P, A = cot.PAD, cot.ANS
    tokens = np.array(
        [
            [12, 2, 3, 7, 1, 1, 4, 8, 1, 7, 1, A, 4, 0, P],  # 40, 9 tokens generated
            [12, 2, 3, 7, 1, 1, 4, 8, 1, 7, 1, 5, 4, 0, P],  # no ANS: unparseable
            [12, 2, 3, 7, 1, 1, 4, 8, 1, 7, 1, 4, 0, P, A],  # ANS with nothing after it
            [12, 2, 3, 7, 1, A, 10, 0, A, 1, 2, 3, 4, 5, 6],  # first ANS wins: 100
            [12, 2, 3, 7, 1, A, 10, 1, P, P, P, P, P, P, P],  # 101 is out of the domain
            [12, 2, 3, 7, 1, A, 3, A, P, P, P, P, P, P, P],  # a marker where a digit should be
        ]
    )
    x, generated = cot.parse_answers(tokens, np.full(6, 5))
    np.testing.assert_array_equal(x, [40, -1, -1, 100, -1, -1])
    assert generated[0] == 9 and generated[3] == 3
    # an ANS inside the prompt is not the model's answer
    x, _ = cot.parse_answers(np.array([[A, 1, 2, A, 3, 4]]), np.array([2]))
    assert x[0] == 34


def test_cot_validity_and_targets_by_hand():
    reqs = np.array([[0, 0, 100]] * 3 + [[1, 23, 71]] * 3 + [[2, 12, 0]] * 3 + [[3, 57, 0]] * 3)
    x = np.array([0, 100, -1, 23, 71, 72, 0, 24, 25, 56, 57, 58])
    np.testing.assert_array_equal(cot.is_valid(reqs, x), [1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0])
    for req in REQUESTS:
        p = cot.target_distribution(req)
        assert p.shape == (101,) and np.isclose(p.sum(), 1)
        assert cot.is_valid(np.repeat(req[None], 101, 0), np.arange(101))[p > 0].all()
    dice = cot.target_distribution(np.array([2, 1, 0]))  # faces 0..1: sums 0, 1, 2
    np.testing.assert_allclose(dice[:3], [0.25, 0.5, 0.25])
    even = cot.target_distribution(np.array([3, 5, 0]))  # 0, 2, 4
    np.testing.assert_allclose(even[[0, 2, 4]], 1 / 3)


def test_cot_answer_stats_and_split():
    req = np.array([[1, 0, 1]])
    valid, tv, ent = cot.answer_stats(req, np.array([[0, 1, 0, 1]]))
    assert valid == 1 and np.isclose(tv, 0) and np.isclose(ent, np.log(2))
    valid, tv, ent = cot.answer_stats(req, np.array([[0, 0, 5, -1]]))
    assert valid == 0.5 and np.isclose(tv, 0.5)
    split = cot.split_requests()
    for fam in cot.FAMILIES[1:]:
        seen = {tuple(r) for r in split[(fam, "seen")]}
        held = {tuple(r) for r in split[(fam, "heldout")]}
        assert held and not seen & held
    # every draw bound n of a held-out request was seen in training (as a range width)
    widths = set(cot.draw_bound(split[("range", "seen")]))
    for fam in cot.FAMILIES[1:]:
        assert set(cot.draw_bound(split[(fam, "heldout")])) <= widths


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "bad, option",
    [
        ({"learning_rate": NAN}, "--learning-rate"),
        ({"learning_rate": INF}, "--learning-rate"),
        ({"learning_rate": -1e-3}, "--learning-rate"),
        ({"learning_rate": 0.0}, "--learning-rate"),
        ({"steps": 0}, "--steps"),
        ({"batch_size": -1}, "--batch-size"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**32}, "--seed"),
        ({"num_seeds": 0}, "--num-seeds"),
        ({"eval_samples": 0}, "--eval-samples"),
        ({"d_model": 30, "n_heads": 4}, "--d-model"),  # cross-field: width vs heads
        ({"steps": 10, "curve_points": 3}, "--steps"),  # cross-field: chunks of equal length
    ],
)
def test_cot_bad_config_raises(bad, option, tmp_path):
    """Each bad value fails in validate, before any work, naming its option."""
    with pytest.raises(ValueError, match=option):
        cot.main(cot.Config(out_dir=str(tmp_path / "run"), **bad))
    assert not (tmp_path / "run").exists()


def test_cot_unwritable_out_dir_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--out-dir"):
        cot.main(cot.Config(out_dir=str(blocker)))
    with pytest.raises(ValueError, match="--out-dir"):
        cot.main(cot.Config(out_dir=str(blocker / "sub")))


def test_cot_batches_are_deterministic_and_shared_by_arms():
    seen = cot.seen_table()
    a, _ = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=True)
    b, _ = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=True)
    c, _ = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=False)
    np.testing.assert_array_equal(a, b)
    # same requests and same draws in both arms: the same answers
    plen = np.asarray(cot.PROMPT_LEN)[a[..., 0].reshape(-1) - cot.UNIF]
    xa, _ = cot.parse_answers(a.reshape(8, -1), plen)
    xc, _ = cot.parse_answers(c.reshape(8, -1), plen)
    np.testing.assert_array_equal(xa, xc)


def test_cot_sampling_is_deterministic():
    """Same params and key: the same sampled tokens (generation threads its keys explicitly)."""
    init, apply = cot.make_model_fns(cot.Config(d_model=16, n_heads=2))
    params = jax.vmap(init)(jax.random.split(jax.random.key(0), 2))
    generate = cot.make_generate(apply, cot.SEQ_LEN)
    reqs = np.repeat(REQUESTS, 4, 0)
    args = (params, cot.prompts(reqs, cot.SEQ_LEN), np.asarray(cot.PROMPT_LEN)[reqs[:, 0]])
    keys = jax.random.split(jax.random.key(5), 2)
    a, b = generate(*args, keys), generate(*args, keys)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :, 0], np.broadcast_to(reqs[:, 0] + cot.UNIF, (2, 16)))


def test_cot_tiny_config_learns(tmp_path):
    """300 steps of a small model: both arms learn the format and mostly valid answers.
    Untrained, validity is ~0. Measured for seeds 0, 1, 2 (one model per arm each): mean seen
    validity cot 0.816 / 0.836 / 0.844, direct 0.812 / 0.828 / 0.828; held-out cot validity
    0.865 / 0.771 / 0.781; tokens per CoT answer 8.67 / 8.66 / 8.73 (8.71 for the exact format)."""
    cfg = cot.Config(
        steps=300,
        batch_size=64,
        d_model=32,
        curve_points=1,
        eval_requests=2,
        eval_samples=32,
        num_seeds=1,
        out_dir=str(tmp_path),
    )
    m = cot.main(cfg)
    for arm in ("cot", "direct"):
        seen = np.mean([m[f"{f}_seen_{arm}_validity"] for f in cot.FAMILIES])
        assert seen >= 0.6, (arm, seen)
    assert m["heldout_validity_cot"] >= 0.6
    # the model writes the whole scratchpad before answering: 7 to 10 tokens per family
    assert 8.0 <= m["cot_tokens_per_answer"] <= 9.5

    # the run's folder is written whole: strict JSON metrics, the device, the figures
    def reject(name):
        raise ValueError(f"metrics.json holds {name}")

    saved = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=reject)
    assert saved["device"] and saved["num_devices"] >= 1 and saved["throughput"] > 0
    assert (tmp_path / "distributions.png").exists() and (tmp_path / "config.json").exists()
