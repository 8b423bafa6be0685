"""Tests for studies/rand_transformer_next_token.py: a tiny run writes its figure and metrics, and
training moves the next-number distribution towards flat."""

import json
import pathlib
import sys

import pytest
import rand_transformer as rt
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import rand_transformer_next_token as study  # noqa: E402


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_rand_transformer_next_token_study_tiny_run(tmp_path):
    out = tmp_path / "study"
    metrics = study.main(study.StudyConfig(steps=200, context_len=24, out_dir=str(out)))
    assert (out / "next_token.png").exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert len(metrics["max_abs_p_gap_by_context"].split(";")) == len(study.CONTEXTS)
    # an untrained model of the same size is far less flat than a trained one
    untrained = study.next_token_probs(rt.Transformer(rt.Config(context_len=24), nnx.Rngs(0)))
    before = max(abs(p - 1 / rt.NUM_VALUES).max() for p in untrained.values())
    assert metrics["max_abs_p_gap"] < before, (metrics["max_abs_p_gap"], before)
