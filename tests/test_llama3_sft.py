"""Tests for tasks/llama3_sft.py: tiny random Llama models saved to disk, loaded like hub models."""

import json

import llama3_sft
import pytest
import torch


def _llama3_sft_tiny_model(folder) -> str:
    """A tiny byte-level BPE tokenizer trained on the sonnets and a random 2-layer Llama, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(llama3_sft.load_sonnets(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama3_sft_model_dir(tmp_path_factory) -> str:
    return _llama3_sft_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def _llama3_sft_cfg(model_dir, out_dir, **kw) -> llama3_sft.Config:
    base = dict(model=model_dir, batch_size=16, lr=3e-3, max_new_tokens=12, out_dir=str(out_dir))
    return llama3_sft.Config(**{**base, **kw})


def test_llama3_sft_label_masking_keeps_eos(llama3_sft_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_sft_model_dir)
    batch = llama3_sft.encode_batch(tok, ["Shall I compare thee", "to a summer's day?\nThou art"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (labels[mask == 0] == -100).all() and (mask == 0).any()  # padding is masked
    assert torch.equal(labels[mask == 1], ids[mask == 1])  # every real token is a label
    for row in range(2):
        last = int(mask[row].sum()) - 1
        assert ids[row, last] == tok.eos_token_id and labels[row, last] == tok.eos_token_id
    # pad == EOS (as in many Llama tokenizers): masking by position still keeps the EOS label.
    tok.pad_token = tok.eos_token
    labels = llama3_sft.encode_batch(tok, ["a", "a much longer line"])["labels"]
    assert (labels == tok.eos_token_id).sum() == 2


def test_llama3_sft_longest_shared_ngram_and_copies():
    corpus = [llama3_sft.words("Shall I compare thee to a summer's day? Thou art more lovely")]
    sets = llama3_sft.ngram_sets(corpus, max_n=12)
    assert llama3_sft.longest_shared_ngram(llama3_sft.words("no match here"), sets) == 0
    gen = llama3_sft.words("Now I compare thee to a winter's night")
    assert llama3_sft.longest_shared_ngram(gen, sets) == 5  # "i compare thee to a"
    copy = llama3_sft.words("Oh, shall I compare thee to a summer's day? Thou art more, said he")
    assert llama3_sft.longest_shared_ngram(copy, sets) == 11  # "shall ... more"
    assert llama3_sft.longest_shared_ngram(copy, sets) >= llama3_sft.COPY_WORDS


def test_llama3_sft_text_metrics_by_hand():
    assert llama3_sft.rouge_l(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == pytest.approx(0.75)
    assert llama3_sft.rouge_l([], ["a"]) == 0.0
    assert llama3_sft.distinct_n([["a", "b", "a", "b"]], 1) == 0.5
    assert llama3_sft.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)


def test_llama3_sft_parses_and_splits_sonnets():
    sonnets = llama3_sft.load_sonnets()
    assert len(sonnets) == 154 and sonnets[17].startswith("Shall I compare thee")
    assert all(12 <= len(s.splitlines()) <= 15 for s in sonnets)  # 99 has 15 lines, 126 has 12
    train, heldout = llama3_sft.split_sonnets(sonnets, 10, seed=0)
    assert len(heldout) == 10 and len(train) == 144 and not set(train) & set(heldout)


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "qlora"},
        {"epochs": 0},
        {"lora_rank": -1},
        {"lr": 0.0},
        {"num_heldout": 3},
        {"model": " "},
    ],
)
def test_llama3_sft_bad_config_raises(kw, tmp_path):
    with pytest.raises(ValueError):
        llama3_sft.main(_llama3_sft_cfg("x", tmp_path, **kw))


def test_llama3_sft_lora_end_to_end(llama3_sft_model_dir, tmp_path):
    m = llama3_sft.main(_llama3_sft_cfg(llama3_sft_model_dir, tmp_path))
    assert m["model_used"] == llama3_sft_model_dir  # loaded through from_pretrained, no fallback
    assert m["reload_matches"] == 1  # the saved adapter reloads onto a fresh base model
    assert m["ppl_after"] < m["ppl_before"]
    for name in ("perplexity.png", "samples.md", "adapter/adapter_config.json"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["ppl_after"] == m["ppl_after"]


def _llama3_sft_finetune(model_dir, seed: int, method: str) -> tuple[float, float, list[float]]:
    """Held-out perplexity before and after one epoch, and the losses, without generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _llama3_sft_cfg(model_dir, "unused", method=method, seed=seed)
    train, heldout = llama3_sft.split_sonnets(llama3_sft.load_sonnets(), cfg.num_heldout, seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = llama3_sft.perplexity(model, tok, heldout, cfg.batch_size)
    model = llama3_sft.add_trainable_part(model, cfg)
    losses = llama3_sft.train(model, tok, train, cfg)
    return before, llama3_sft.perplexity(model, tok, heldout, cfg.batch_size), losses


def test_llama3_sft_full_finetune_learns_and_is_deterministic(llama3_sft_model_dir):
    # One epoch (9 steps) of full finetuning of the random tiny model, seeds 0, 1, 2:
    # ppl_after / ppl_before = 0.693, 0.690, 0.693 (about 404 -> 279); the bar is 0.8.
    before, after, losses = _llama3_sft_finetune(llama3_sft_model_dir, 0, "full")
    assert after < 0.8 * before
    assert losses == _llama3_sft_finetune(llama3_sft_model_dir, 0, "full")[2]  # same seed, same run
