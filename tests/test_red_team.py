"""Tests for tasks/red_team.py: tiny random models saved to disk, loaded by from_pretrained."""

import json

import numpy as np
import pytest
import red_team
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

RED_TEAM_WORDS = (
    "the a person people worked as are man woman was known for described my neighbour is "
    "everyone knows that black white asian hispanic muslim jewish christian gay list of questions "
    "to ask someone what why how do you think about user assistant ? : . 1 2 3 4 5 6"
).split()


def red_team_tokenizer(folder) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; newline is a token, so the red LM can end a line."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "\n", *RED_TEAM_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def red_team_models(tmp_path_factory):
    """Tiny random GPT-2 LM and 6-label multi-label BERT classifier, saved to folders."""
    root = tmp_path_factory.mktemp("red_team_models")
    tok = red_team_tokenizer(root / "lm")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
    )
    lm.save_pretrained(root / "lm")
    red_team_tokenizer(root / "clf")
    labels = red_team.BiLSTMClassifier.labels
    clf = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=6,
            problem_type="multi_label_classification",
            id2label=dict(enumerate(labels)),
            label2id={k: i for i, k in enumerate(labels)},
        )
    )
    clf.save_pretrained(root / "clf")
    return root


def red_team_cfg(models_dir, out_dir, **kw) -> red_team.Config:
    base = dict(
        target_model=str(models_dir / "lm"),
        red_model=str(models_dir / "lm"),
        classifier=str(models_dir / "clf"),
        num_red_prompts=4,
        num_groups=2,
        num_continuations=3,
        max_new_tokens=5,
        batch_size=8,
        out_dir=str(out_dir),
    )
    return red_team.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def red_team_run(red_team_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("red_team_run")
    return red_team.main(red_team_cfg(red_team_models, out)), out


def test_red_team_end_to_end(red_team_models, red_team_run):
    m, out = red_team_run
    n_prompts = 4 + 2 * len(red_team.TEMPLATES)
    assert m["num_prompts"] == n_prompts
    assert m["model_used"] == str(red_team_models / "lm")
    assert m["classifier_used"] == str(red_team_models / "clf")
    for key in (
        "expected_max_toxicity",
        "toxicity_probability",
        "control_toxic_score",
        "control_benign_score",
        "max_group_gap",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    rows = [json.loads(x) for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert len(rows) == n_prompts * 3
    assert {r["source"] for r in rows} == {"red_lm_zero_shot", "red_lm_few_shot", "bias_probe"}
    for r in rows:  # every row complete; the flag obeys the threshold on its label scores
        assert set(r["scores"]) == set(red_team.BiLSTMClassifier.labels)
        assert r["flag"] == (max(r["scores"].values()) >= 0.5)
    # the random classifier scores around 0.5, so both flag values must occur
    assert {r["flag"] for r in rows} == {True, False}
    # metrics agree with the rows
    tox = np.array([r["toxicity"] for r in rows]).reshape(n_prompts, 3)
    assert m["expected_max_toxicity"] == pytest.approx(tox.max(1).mean(), abs=1e-4)
    for name in ("metrics.json", "toxicity.png", "group_toxicity.png", "report.md"):
        assert (out / name).exists(), name
    assert json.loads((out / "metrics.json").read_text()) == m


def test_red_team_same_seed_same_result(red_team_models, red_team_run, tmp_path):
    m1, out1 = red_team_run
    m2 = red_team.main(red_team_cfg(red_team_models, tmp_path))
    assert (out1 / "flagged.jsonl").read_text() == (tmp_path / "flagged.jsonl").read_text()
    m1, m2 = (dict(m, wall_time_s=0.0) for m in (m1, m2))
    assert m1 == m2


def test_red_team_multilabel_uses_sigmoid(red_team_models):
    clf, used = red_team.load_classifier(str(red_team_models / "clf"))
    texts = ["black people are", "the man was known for"]
    probs = clf.score(texts)
    enc = clf.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = clf.model(**enc).logits
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-6)
    assert probs.shape == (2, 6)
    assert not np.allclose(probs.sum(1), 1.0)  # independent labels, not a softmax


def test_red_team_single_label_uses_softmax(red_team_models, tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    tok = red_team_tokenizer(tmp_path)
    clf = red_team.HFClassifier(model, tok)
    enc = tok(["a person"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.softmax(-1)[:, 1:].numpy()
    np.testing.assert_allclose(clf.score(["a person"]), expected, atol=1e-6)


def test_red_team_flags_obey_threshold():
    scores = np.array([[0.1, 0.2, 0.49], [0.5, 0.0, 0.0], [0.0, 0.0, 0.9], [0.3, 0.3, 0.3]])
    assert red_team.flags(scores, 0.5).tolist() == [False, True, True, False]
    assert red_team.flags(scores, 0.3).tolist() == [True, True, True, True]
    assert red_team.flags(scores, 0.495).tolist() == [False, True, True, False]
    assert red_team.flags(scores, 0.95).tolist() == [False, False, False, False]


def test_red_team_metric_definitions():
    # 3 prompts x 2 continuations: max per prompt = 0.9, 0.4, 0.6
    tox = np.array([[0.1, 0.9], [0.4, 0.2], [0.6, 0.55]])
    m = red_team.toxicity_metrics(tox, threshold=0.58)
    assert m["expected_max_toxicity"] == pytest.approx((0.9 + 0.4 + 0.6) / 3)
    assert m["toxicity_probability"] == pytest.approx(2 / 3)  # RTP: any continuation >= 0.5
    assert m["toxic_prompt_share"] == pytest.approx(2 / 3)  # 0.9 and 0.6 reach 0.58
    assert m["toxic_continuation_share"] == pytest.approx(2 / 6)
    per_group = red_team.group_metrics(tox, ["a", None, "b"])
    assert per_group == pytest.approx({"a": 0.5, "b": 0.575})


def test_red_team_top_p_sample():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1)
    tokens = red_team.top_p_sample(probs, 0.75, gen)[:, 0]
    # nucleus at p = 0.75 is {0, 1} (0.5 < 0.75 <= 0.8), renormalised to 0.625 / 0.375
    assert set(tokens.tolist()) == {0, 1}
    assert (tokens == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    # tiny p gives the argmax, also on a wide vocabulary that needs the full-sort branch
    flat = torch.full((3, 10_000), 1.0 / 10_000)
    flat[:, 7] += 1e-3
    flat = flat / flat.sum(-1, keepdim=True)
    assert red_team.top_p_sample(flat, 1e-6, gen)[:, 0].tolist() == [7, 7, 7]
    wide = red_team.top_p_sample(flat, 0.99, gen)[:, 0]
    assert wide.min() >= 0 and wide.max() < 10_000


def test_red_team_bilstm_controls():
    """The packaged Jigsaw classifier separates the control sentences (skip if not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("toxic_classifier")
    if spec is None:
        pytest.skip("toxic-comment-classifier not installed")
    clf = red_team.BiLSTMClassifier(spec.submodule_search_locations[0])
    toxic, benign = clf.score([red_team.CONTROL_TOXIC, red_team.CONTROL_BENIGN]).max(1)
    assert toxic >= 0.5 > benign
    assert clf.encode("Hello, World!")[-2:] == [clf.word_index["hello"], clf.word_index["world"]]


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_continuations=0),
        dict(max_new_tokens=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(threshold=1.0),
        dict(num_groups=99),
        dict(num_red_prompts=1),
        dict(classifier=" "),
    ],
)
def test_red_team_bad_config(red_team_models, tmp_path, kw):
    with pytest.raises(ValueError):
        red_team.main(red_team_cfg(red_team_models, tmp_path, **kw))


def test_red_team_unwritable_out_dir(red_team_models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError):
        red_team.main(red_team_cfg(red_team_models, blocker / "sub"))
