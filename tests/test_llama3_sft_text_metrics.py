"""Tests for studies/llama3_sft_text_metrics.py: ROUGE-L and distinct-n by hand, and a tiny run."""

import json
import pathlib
import sys

import llama3_sft
import pytest
from test_llama3_sft import _llama3_sft_cfg, _llama3_sft_tiny_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import llama3_sft_text_metrics as study  # noqa: E402


def test_llama3_sft_text_metrics_by_hand():
    # LCS of abcd and acde is acd: P = R = 3/4, so F1 = 3/4.
    assert study.rouge_l(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == pytest.approx(0.75)
    assert study.rouge_l([], ["a"]) == 0.0 and study.rouge_l(["a"], ["b"]) == 0.0
    assert study.distinct_n([["a", "b", "a", "b"]], 1) == 0.5
    assert study.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    m = study.text_metrics(["Shall I, shall I"], ["shall I compare thee"])
    assert m == pytest.approx(
        {"rouge_l": 2 * 2 / (4 + 4), "distinct_1": 0.5, "distinct_2": 2 / 3, "mean_words": 4}
    )


@pytest.mark.slow
def test_llama3_sft_text_metrics_tiny_run(tmp_path):
    generate = llama3_sft.generate
    model_dir = _llama3_sft_tiny_model(tmp_path / "tiny_llama")
    cfg = _llama3_sft_cfg(model_dir, tmp_path / "study", max_steps=2, max_new_tokens=8)
    m = study.main(cfg)
    run = json.loads((tmp_path / "study" / "run" / "metrics.json").read_text())
    assert (m["ppl_before"], m["ppl_after"]) == (run["ppl_before"], run["ppl_after"])
    assert json.loads((tmp_path / "study" / "metrics.json").read_text()) == m
    for when in ("before", "after"):
        assert 0 <= m[f"rouge_l_{when}"] <= 1 and 0 < m[f"distinct_2_{when}"] <= 1
        assert -1 <= m[f"embed_sim_paired_{when}"] <= 1
    assert llama3_sft.generate is generate  # the task's function is put back
