"""Tests for studies/reverse_digits_by_length.py: exact match per sequence length, the loss curves
and the table of held-out examples, on a tiny config."""

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import reverse_digits_by_length as study  # noqa: E402

TINY = dict(seq_len=6, vocab_size=6, num_train=3000, num_heldout=500, steps=200, batch_size=64)


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_reverse_digits_by_length_study_writes_per_length_metrics(tmp_path):
    # The task's tiny learning config (tests/test_reverse_digits.py): exact match 1.000 on seeds
    # 0..9 at 200 steps, so every length present must be reversed almost always.
    cfg = study.rd.Config(out_dir=str(tmp_path / "run"), seed=0, **TINY)
    m = study.main(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == m
    counts = [m[f"count_length_{k}"] for k in range(1, 7)]
    assert sum(counts) == 500
    per_length = [m[f"exact_match_length_{k}"] for k in range(1, 7) if counts[k - 1]]
    # the overall exact match is the count-weighted mean of the per-length ones
    weighted = sum(c * m.get(f"exact_match_length_{k + 1}", 0) for k, c in enumerate(counts))
    assert np.isclose(weighted / 500, m["exact_match"])
    assert min(per_length) >= 0.8 and m["exact_match"] >= 0.9, m
    for name in ("loss.png", "examples.png", "config.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
