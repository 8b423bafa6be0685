"""Tests for studies/cot_answers.py: the answer entropy by hand, the token count read off the
sampled tokens, and a tiny run."""

import dataclasses
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import cot_answers as study  # noqa: E402

cot = study.cot


def test_cot_answers_entropy_by_hand():
    answers = np.array([[3, 3, 3, 3], [0, 1, 0, 1], [5, -1, 5, -1]])  # -1 is one more outcome
    assert np.isclose(study.answer_entropy(answers), 2 * np.log(2) / 3)


def test_cot_answers_counts_tokens_and_restores_parse(monkeypatch):
    """The count is the mean of what parse_answers reports, and parse_answers is put back."""
    seqs = cot.build_sequences(np.array([[2, 0, 12, 12]] * 4), np.arange(4), np.arange(4), True)
    parse = cot.parse_answers

    def fake_evaluate(*args):
        return {"set": cot.parse_answers(seqs)[0]}

    monkeypatch.setattr(cot, "evaluate", fake_evaluate)
    out, tokens = study.evaluate_counting_tokens()
    np.testing.assert_array_equal(out["set"], 2 * np.arange(4))
    assert tokens == 11 and cot.parse_answers is parse


@pytest.mark.slow  # a side study's run: two arms of 300 steps, about a minute of CPU
def test_cot_answers_study_tiny_run(tmp_path):
    """The task's tiny learning config (tests/test_cot.py): the CoT arm writes its whole
    scratchpad (10.93..10.99 tokens per answer over seeds 0..9, 11 for the exact layout), and the
    plug-in entropy of exact samples sits below the exact entropy (it is biased down)."""
    cfg = dataclasses.replace(
        cot.Config(), steps=300, batch_size=64, d_model=32, num_seeds=2, eval_requests=2,
        eval_samples=32, heldout_samples=64, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    m = study.main(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == m
    assert 10.5 <= m["cot_tokens_per_answer"] <= 11.5 and 2.5 <= m["direct_tokens_per_answer"] <= 3
    for fam in cot.FAMILIES:
        for split in ("seen", "heldout"):
            assert m[f"{fam}_{split}_entropy_ref"] < m[f"{fam}_{split}_exact_entropy"]
            assert m[f"{fam}_{split}_cot_entropy"] > 0
