"""Tests for tasks/cot.py: the model (causal, cached decoding), the scratchpad arithmetic, parsing,
validity, the splits' invariants, bad options, seed sharding and a tiny learning run."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import cot
import jax
import numpy as np
import pytest

# uniform [0, 61], range [23, 71], dice with faces 0..12
REQUESTS = np.array([[0, 0, 61, 0], [1, 23, 0, 48], [2, 0, 12, 12]])
SMALL = cot.Config(d_model=16, n_heads=2)


def test_cot_causal_mask():
    """Changing token j leaves the logits at every position before j unchanged."""
    init, apply = cot.make_model_fns(SMALL)
    params, logits = init(jax.random.key(0)), jax.jit(lambda p, t: apply(p, t)[0])
    tokens = jax.random.randint(jax.random.key(1), (2, cot.SEQ_LEN), 0, cot.VOCAB)
    base = logits(params, tokens)
    for j in (1, 6, cot.SEQ_LEN - 1):
        out = logits(params, tokens.at[:, j].set((tokens[:, j] + 1) % cot.VOCAB))
        np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6)
        assert not np.allclose(out[:, j:], base[:, j:])  # the change is visible from j on


def test_cot_cached_decoding_matches_full_forward():
    """A prefix, then one token at a time through the key-value cache: the full forward's logits."""
    init, apply = cot.make_model_fns(SMALL)
    params, apply = init(jax.random.key(0)), jax.jit(apply)
    tokens = jax.random.randint(jax.random.key(1), (3, cot.SEQ_LEN), 0, cot.VOCAB)
    caches = np.zeros((SMALL.n_layers, 2, 3, cot.SEQ_LEN, 2, 8), np.float32)
    logits, caches = apply(params, tokens[:, :4], caches, 0)
    steps = [logits]
    for t in range(4, cot.SEQ_LEN):
        logits, caches = apply(params, tokens[:, t : t + 1], caches, t)
        steps.append(logits)
    full = apply(params, tokens)[0]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_cot_scratchpads_by_hand():
    """The docstring's layout, token for token."""
    p, q = np.array([17, 0, 7]), np.array([0, 17, 9])
    A, E = cot.ANS, cot.EOS
    want = [
        [0, 0, 6, 1, 1, 7, 0, 1, 7, 0, 0, 0, 0, 0, A, 1, 7, E],  # p = 17, s = 17, x = 17
        [2, 3, 0, 0, 0, 0, 0, 2, 3, 4, 8, 1, 7, 1, A, 4, 0, E],  # s = 23, q = 17, carry, x = 40
        [0, 0, 1, 2, 0, 7, 0, 0, 7, 1, 2, 0, 9, 1, A, 1, 6, E],  # dice 12: 7 + 9, carry, 16
    ]
    np.testing.assert_array_equal(cot.build_sequences(REQUESTS, p, q, cot=True), want)
    direct = cot.build_sequences(REQUESTS, p, q, cot=False)
    np.testing.assert_array_equal(direct[1], [2, 3, 0, 0, 4, 8, A, 4, 0, E])


def test_cot_scratchpad_arithmetic_is_exact():
    """For many random requests and draws, every slot holds what the docstring says, the answer
    is valid, both arms write the same answer, and the request's tokens stand where GIVEN says."""
    rng = np.random.default_rng(0)
    reqs = np.concatenate(list(cot.split_requests().values()))
    reqs = reqs[rng.integers(0, len(reqs), 3000)]
    _, a, bound_p, bound_q = reqs.T
    rng = np.random.default_rng(1)
    draws = rng.integers(0, bound_p + 1), rng.integers(0, bound_q + 1)
    seqs = cot.build_sequences(reqs, *draws, cot=True)
    num = lambda i: 10 * seqs[:, i] + seqs[:, i + 1]
    p, s, q = num(4), num(7), num(11)
    assert (p <= bound_p).all() and (q <= bound_q).all() and (s == a + p).all()
    np.testing.assert_array_equal(seqs[:, 6], a % 10 + p % 10 >= 10)  # c1
    np.testing.assert_array_equal(seqs[:, 13], s % 10 + q % 10 >= 10)  # c2
    x, written = cot.parse_answers(seqs)
    np.testing.assert_array_equal(x, a + p + q)
    assert cot.is_valid(reqs, x).all() and (written == 11).all()
    direct = cot.build_sequences(reqs, *draws, cot=False)
    np.testing.assert_array_equal(cot.parse_answers(direct)[0], x)  # same draws, same answer
    np.testing.assert_array_equal(seqs[:, cot.GIVEN[True]], direct[:, cot.GIVEN[False]])


def test_cot_parse_answers_by_hand():
    A, E = cot.ANS, cot.EOS
    head = [2, 3, 0, 0, 0, 0, 0, 2, 3, 4, 8, 1, 7, 1]
    tokens = np.array(
        [
            head + [A, 4, 0],  # 40, 11 tokens written
            head + [5, 4, 0],  # no ANS: unparseable
            head + [4, 0, A],  # ANS with nothing after it
            [2, 3, 0, 0, 4, 8, A, 10, 0, A, 1, 2, 3, 4, 5, 6, 7],  # first ANS wins: 100
            [2, 3, 0, 0, 4, 8, A, 10, 1, E, 0, 0, 0, 0, 0, 0, 0],  # 101 is out of the domain
            [2, 3, 0, 0, 4, 8, A, 3, A, E, 0, 0, 0, 0, 0, 0, 0],  # a marker for a digit
        ]
    )
    x, written = cot.parse_answers(tokens)
    np.testing.assert_array_equal(x, [40, -1, -1, 100, -1, -1])
    assert written[0] == 11 and written[3] == 3


def test_cot_validity_and_targets_by_hand():
    reqs = np.repeat(REQUESTS, 4, axis=0)
    x = np.array([0, 61, 62, -1, 22, 23, 71, 72, 0, 12, 24, 25])
    np.testing.assert_array_equal(cot.is_valid(reqs, x), [1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0])
    for req in REQUESTS:
        p = cot.target_distribution(req)
        assert p.shape == (101,) and np.isclose(p.sum(), 1)
        np.testing.assert_array_equal(
            p > 0, cot.is_valid(np.repeat(req[None], 101, 0), np.arange(101))
        )
    np.testing.assert_allclose(cot.target_distribution(REQUESTS[1])[23:72], 1 / 49)
    dice = cot.target_distribution(np.array([2, 0, 1, 1]))  # faces 0..1: sums 0, 1, 2
    np.testing.assert_allclose(dice[:3], [0.25, 0.5, 0.25])


def test_cot_answer_stats_by_hand():
    req = np.array([[1, 0, 0, 1]])
    np.testing.assert_allclose(cot.answer_stats(req, np.array([[0, 1, 0, 1]])), [1, 0])
    valid, tv = cot.answer_stats(req, np.array([[0, 0, 5, -1]]))
    assert valid == 0.5 and np.isclose(tv, 0.5)


def all_sequences(requests: np.ndarray) -> np.ndarray:
    """The CoT sequence of every request with every value of its draws p and q."""
    rows = [
        (r, p, q) for r in requests for p in range(r[2] + 1) for q in range(r[3] + 1)
    ]  # fmt: skip
    reqs, p, q = (np.array(c) for c in zip(*rows))
    return cot.build_sequences(reqs, p, q, cot=True)


def test_cot_splits_hold_out_whole_requests():
    """No held-out request of either split is trained on; the systematic split is every dice
    request with m > 25, and no training request has both bounds above 25."""
    split = cot.split_requests()
    seen = {tuple(r) for f in cot.FAMILIES for r in split[(f, "seen")]}
    for (_, kind), reqs in split.items():
        if kind != "seen":
            assert len(reqs) and not seen & {tuple(r) for r in reqs}
    system = split[("dice", "systematic")]
    np.testing.assert_array_equal(system[:, 2], np.arange(26, 51))
    assert not any(p > 25 and q > 25 for _, _, p, q in seen)


def test_cot_every_step_of_a_systematic_request_was_trained():
    """Composition, not interpolation: everything the CoT arm writes before Q is given (the draw
    p, c1, s) is a prefix that training shows whole; after it, every step's operands were seen
    in training in the same slot: the draw q with bound Q, and the sum s + q digit by digit."""
    split = cot.split_requests()
    train = all_sequences(np.concatenate([split[(f, "seen")] for f in cot.FAMILIES]))
    held = all_sequences(split[("dice", "systematic")])

    def kinds(seqs: np.ndarray) -> dict:  # the steps, by what they read and write
        return {
            "prefix before Q": seqs[:, :9],
            "draw q given Q": seqs[:, 9:13],
            "c2 from s0, q0": seqs[:, [8, 12, 13]],
            "x1 from s1, q1, c2": seqs[:, [7, 11, 13, 15]],
            "x0 from s0, q0": seqs[:, [8, 12, 16]],
        }

    trained = {k: {tuple(r) for r in v} for k, v in kinds(train).items()}
    for kind, steps in kinds(held).items():
        missing = {tuple(r) for r in steps} - trained[kind]
        assert not missing, (kind, sorted(missing)[:5])
    # and the whole held-out distribution is new: no trained sequence has both draws above 25
    assert not (
        (10 * train[:, 4] + train[:, 5] > 25) & (10 * train[:, 11] + train[:, 12] > 25)
    ).any()


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
        ({"n_layers": 0}, "--n-layers"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**32}, "--seed"),
        ({"num_seeds": 0}, "--num-seeds"),
        ({"eval_samples": 0}, "--eval-samples"),
        ({"heldout_samples": -512}, "--heldout-samples"),
        ({"d_model": 30, "n_heads": 4}, "--d-model"),  # cross-field: width vs heads
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
    for out_dir in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match="--out-dir"):
            cot.main(cot.Config(out_dir=str(out_dir)))


def test_cot_batches_are_deterministic_and_shared_by_arms():
    seen = cot.seen_table()
    a = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=True)
    b = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=True)
    c = cot.make_batches(seen, (2, 4), np.random.default_rng(3), cot=False)
    np.testing.assert_array_equal(a, b)
    # same requests and same draws in both arms: the same answers
    np.testing.assert_array_equal(
        cot.parse_answers(a.reshape(8, -1))[0], cot.parse_answers(c.reshape(8, -1))[0]
    )


def test_cot_sampling_is_deterministic_and_keeps_the_request():
    """Same params and keys: the same tokens; the request's own tokens are never overwritten."""
    init, apply = cot.make_model_fns(SMALL)
    params = jax.vmap(init)(jax.random.split(jax.random.key(0), 2))
    generate = cot.make_generate(apply, True, SMALL)
    reqs = np.repeat(REQUESTS, 4, 0)
    request = cot.build_sequences(reqs, 0 * reqs[:, 0], 0 * reqs[:, 0], cot=True)
    keys = jax.random.split(jax.random.key(5), 2)
    a, b = np.asarray(generate(params, request, keys)), np.asarray(generate(params, request, keys))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 12, cot.SEQ_LEN - 1)
    given = cot.GIVEN[True][:-1]
    np.testing.assert_array_equal(
        a[:, :, given], np.broadcast_to(request[:, :-1][:, given], (2, 12, 6))
    )


TINY = cot.Config(
    steps=300, batch_size=64, d_model=32, num_seeds=2, eval_requests=2, eval_samples=32,
    heldout_samples=64,
)  # fmt: skip


def test_cot_tiny_config_learns(tmp_path):
    """300 steps of a small model, 2 seeds vmapped: both arms learn the format and mostly valid
    answers (untrained, validity is about 0.05). Measured over seeds 0..9 of this config: seen
    validity cot 0.78..0.88, direct 0.72..0.80; systematic held-out validity of CoT's worst seed
    0.86..0.93. At this budget the arms' systematic TV is not yet
    apart (CoT's excess 0.07..0.09, direct's 0.04..0.13): that takes the default run."""
    m = cot.main(dataclasses.replace(TINY, out_dir=str(tmp_path / "run")))
    for arm in cot.ARMS:
        seen = np.mean([m[f"{f}_seen_{arm}_validity"] for f in cot.FAMILIES])
        assert seen >= 0.6, (arm, seen)
    assert m["systematic_heldout_validity_cot_min"] >= 0.75

    def reject(name):
        raise ValueError(f"metrics.json holds {name}")

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=reject)
    assert saved["device"] and saved["num_devices"] == 1 and saved["throughput"] > 0
    assert (tmp_path / "run" / "distributions.png").exists()
    bars = sorted(k for k in saved if k.endswith(("_target", "_ceiling")))
    assert bars == [
        "num_seeds_target", "systematic_heldout_tv_excess_ratio_max_ceiling",
        "systematic_heldout_validity_cot_min_target", "wall_time_s_ceiling",
    ]  # fmt: skip
    assert all(bar[: bar.rindex("_")] in saved for bar in bars)  # each beside its metric
    assert set(saved["time_split_s"]) == {"setup", "train", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert saved["wall_time_s"] == pytest.approx(sum(saved["time_split_s"].values()), abs=0.02)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing staged is left behind


SHARD_RUN = """
import json, sys
import cot, jax
split_over, shard_seeds = [], cot.shard_seeds
def spy(tree):  # how many devices each seed-axis input of the run is split over
    out = shard_seeds(tree)
    split_over.append(len(jax.tree.leaves(out)[0].sharding.device_set))
    return out
cot.shard_seeds = spy
metrics = cot.main(cot.Config(**json.loads(sys.argv[1])))
print(json.dumps({"split_over": sorted(set(split_over)), **metrics}))
"""
SHARD_CFG = dict(
    steps=10, d_model=16, n_heads=2, num_seeds=3, eval_requests=1, eval_samples=8,
    heldout_samples=8,
)  # fmt: skip


@pytest.mark.slow  # two tiny runs, one in a subprocess: about 40 CPU-seconds
def test_cot_seeds_sharded_over_two_devices_match_one(tmp_path):
    """3 seeds on 2 forced host devices (padded to 4): the params really are split over both,
    and every metric equals the one-device run's (the same per-seed keys and batches)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = str(pathlib.Path(cot.__file__).parent)
    cfg = json.dumps({**SHARD_CFG, "out_dir": str(tmp_path / "two")})
    out = subprocess.run(
        [sys.executable, "-c", SHARD_RUN, cfg], env=env, capture_output=True, text=True, check=True
    )
    two = json.loads(out.stdout.strip().splitlines()[-1])
    assert two["split_over"] == [2] and two["num_devices"] == 2
    one = cot.main(cot.Config(**SHARD_CFG, out_dir=str(tmp_path / "one")))
    assert one["num_devices"] == 1
    for key, value in one.items():
        if isinstance(value, float) and key not in ("wall_time_s", "throughput"):
            assert np.isclose(two[key], value, rtol=1e-5, atol=1e-6), (key, two[key], value)
