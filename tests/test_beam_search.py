"""Beam search by hand must equal Hugging Face `generate(num_beams=...)`, on tiny random models."""

import dataclasses

import beam_search as bs
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

VOCAB = 48
PAD = 0


def _beam_search_tiny_model(arch: str, folder) -> torch.nn.Module:
    """A tiny random model with no EOS of its own, saved and reloaded via from_pretrained."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        # A large init spread makes the next-token distributions peaked, as in a trained model.
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.3,
                            **common)  # fmt: skip
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                             max_position_embeddings=64, **common)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def beam_search_model(request, tmp_path_factory):
    torch.set_num_threads(2)
    return _beam_search_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _beam_search_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 6, 3 and 1."""
    rows = [[5, 17, 9, 30, 2, 11], [40, 8, 21], [13]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _beam_search_frequent_token(model, ids, mask) -> int:
    """A token that greedy decoding emits often: as EOS it ends many hypotheses early."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    counts = torch.bincount(out[:, ids.shape[1] :].reshape(-1), minlength=VOCAB)
    counts[PAD] = 0
    return int(counts.argmax())


@pytest.mark.parametrize("use_eos", [False, True])
def test_beam_search_equals_generate(beam_search_model, use_eos):
    ids, mask = _beam_search_prompts()
    eos_kw = {}
    if use_eos:
        eos_kw = dict(eos_token_id=_beam_search_frequent_token(beam_search_model, ids, mask))
        eos_kw["pad_token_id"] = PAD
    max_new = 10
    saw_early_end = False
    for length_penalty in (0.0, 1.0, 2.0):
        for early_stopping in (False, True):
            kw = dict(num_beams=4, max_new_tokens=max_new, length_penalty=length_penalty,
                      early_stopping=early_stopping, num_return_sequences=3, **eos_kw)  # fmt: skip
            ref = beam_search_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                             output_scores=True, return_dict_in_generate=True,
                                             **kw)  # fmt: skip
            seqs, scores = bs.beam_search(beam_search_model, ids, mask, **kw)
            case = f"lp={length_penalty} early_stopping={early_stopping} {eos_kw}"
            assert seqs.shape == ref.sequences.shape, case
            assert torch.equal(seqs, ref.sequences), case
            torch.testing.assert_close(scores, ref.sequences_scores, atol=1e-4, rtol=0, msg=case)
            if use_eos:
                gen = seqs[:, ids.shape[1] :]
                saw_early_end |= bool((gen == eos_kw["eos_token_id"]).any())
    # The EOS cases must really exercise finished hypotheses.
    assert saw_early_end == use_eos


def test_beam_search_width_one_is_greedy(beam_search_model):
    ids, mask = _beam_search_prompts()
    greedy = beam_search_model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=8
    )
    seqs, _ = bs.beam_search(beam_search_model, ids, mask, num_beams=1, max_new_tokens=8)
    assert torch.equal(seqs, greedy)


def test_beam_search_scores_are_length_normalised_log_probs(beam_search_model):
    """Eq. (2) with length_penalty=1: the score is the mean log-prob of the generated tokens."""
    ids, mask = _beam_search_prompts()
    seqs, scores = bs.beam_search(beam_search_model, ids, mask, num_beams=3, max_new_tokens=5)
    full_mask = torch.cat([mask, torch.ones(len(ids), 5, dtype=mask.dtype)], 1)
    lps = bs.continuation_log_probs(beam_search_model, seqs, full_mask, ids.shape[1])
    torch.testing.assert_close(scores, torch.tensor([lp.mean() for lp in lps]), atol=1e-4, rtol=0)


def test_beam_search_is_deterministic(beam_search_model):
    ids, mask = _beam_search_prompts()
    first = bs.beam_search(beam_search_model, ids, mask, num_beams=3, max_new_tokens=4)
    second = bs.beam_search(beam_search_model, ids, mask, num_beams=3, max_new_tokens=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "kwargs", [dict(num_beams=0), dict(num_beams=2, num_return_sequences=3), dict(max_new_tokens=0)]
)
def test_beam_search_bad_arguments_raise(beam_search_model, kwargs):
    ids, mask = _beam_search_prompts()
    with pytest.raises(ValueError):
        bs.beam_search(beam_search_model, ids, mask, **kwargs)


@pytest.mark.parametrize(
    "change", [dict(num_beams=0), dict(max_new_tokens=0), dict(num_contexts=99), dict(out_dir="")]
)
def test_beam_search_bad_config_raises(change, tmp_path):
    change = {"out_dir": str(tmp_path / "run"), **change}
    if change["out_dir"] == "":
        (tmp_path / "file").write_text("x")
        change["out_dir"] = str(tmp_path / "file" / "sub")  # under a file: not writable
    with pytest.raises(ValueError):
        bs.main(dataclasses.replace(bs.Config(), **change))


def test_beam_search_metric_helpers():
    assert bs.repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)
    assert bs.repetition_rate([1, 2, 3, 4]) == 0.0
    assert bs.distinct_n([[1, 1, 2], [1, 2]], 1) == pytest.approx(2 / 5)
    assert bs.distinct_n([[1, 1, 2], [1, 2]], 2) == pytest.approx(2 / 3)
