"""Beam search by hand must equal Hugging Face `generate(num_beams=...)`, on tiny random models."""

import dataclasses
import json

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
    mean_lp = bs.mean_log_probs(beam_search_model, seqs, mask, eos=[])  # no EOS: all tokens count
    torch.testing.assert_close(scores, torch.from_numpy(mean_lp), atol=1e-4, rtol=0)


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
    "change, option",
    [
        (dict(num_beams=0), "--num-beams"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(max_new_tokens=100_000), "--max-new-tokens"),
        (dict(num_contexts=99), "--num-contexts"),
        (dict(num_contexts=0), "--num-contexts"),
        (dict(length_penalty=float("nan")), "--length-penalty"),
        (dict(length_penalty=float("inf")), "--length-penalty"),
        (dict(length_penalty=-float("inf")), "--length-penalty"),
        (dict(timing_repeats=0), "--timing-repeats"),
        (dict(seed=-1), "--seed"),
        (dict(seed=2**32), "--seed"),
        (dict(model=" "), "--model"),
        (dict(out_dir=""), "--out-dir"),
    ],
)
def test_beam_search_bad_config_raises(change, option, tmp_path):
    change = {"out_dir": str(tmp_path / "run"), **change}
    if change["out_dir"] == "":
        (tmp_path / "file").write_text("x")
        change["out_dir"] = str(tmp_path / "file")  # a file, not a folder
    cfg = dataclasses.replace(bs.Config(), **change)
    with pytest.raises(ValueError, match=option):
        bs.validate(cfg)
    with pytest.raises(ValueError, match=option):  # main validates before any model work
        bs.main(cfg)


def test_beam_search_device_option():
    """--device cpu is always there; auto resolves to the CPU on a machine without accelerators."""
    assert bs.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert bs.pick_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="--device cuda"):
            bs.validate(bs.Config(device="cuda"))


def test_beam_search_cli_rejects_bad_value_in_one_line():
    """From the command line a bad value prints one line naming the option and exits 2."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, bs.__file__, "--length-penalty", "nan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --length-penalty nan: must be a finite number >= -10 and <= 10"
    ]


@pytest.fixture(scope="module")
def beam_search_run(tmp_path_factory):
    """A tiny main() run: a random GPT-2 with a word-level tokenizer over the built-in contexts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("beam_search_lm")
    _beam_search_tiny_model("gpt2", folder)
    words = sorted({w for c in bs.CONTEXTS[:2] for w in c.replace(",", " ,").split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(folder)
    out = tmp_path_factory.mktemp("beam_search_out") / "run"
    cfg = bs.Config(model=str(folder), num_beams=3, max_new_tokens=4, num_contexts=2,
                    timing_repeats=1, device="cpu", out_dir=str(out))  # fmt: skip
    return bs.main(cfg), out, folder


def test_beam_search_main_matches_generate(beam_search_run):
    metrics, _, folder = beam_search_run
    assert metrics["model_used"] == str(folder)  # no fallback to the packaged model
    assert metrics["matches_generate"] == 1
    assert metrics["max_score_abs_err"] <= 1e-4
    assert metrics["throughput"] > 0 and metrics["throughput_unit"] == "beam-tokens/s"


def test_beam_search_run_folder_is_whole(beam_search_run):
    """The run folder holds strict JSON metrics (no NaN/Infinity), the config and the figures,
    and no staging folder is left beside it."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    metrics, out, _ = beam_search_run
    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert on_disk == metrics
    assert on_disk["device"] == "cpu" and on_disk["preset"] == "cpu"
    bars = {k: v for k, v in metrics.items() if k.endswith(("_target", "_ceiling"))}
    assert bars == {"matches_generate_target": 1, "speed_ratio_vs_generate_target": 0.8,
                    "wall_time_s_ceiling": 120}  # fmt: skip
    assert set(metrics["time_split_s"]) == {"setup", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert metrics["wall_time_s"] == pytest.approx(sum(metrics["time_split_s"].values()), abs=0.02)
    assert json.loads((out / "config.json").read_text())["num_beams"] == 3
    assert (out / "beam_scores.png").stat().st_size > 0  # the search tree: beam_search_tree study
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_beam_search_metric_helpers():
    assert bs.repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)
    assert bs.repetition_rate([1, 2, 3, 4]) == 0.0
    assert bs.distinct_n([[1, 1, 2], [1, 2]], 1) == pytest.approx(2 / 5)
    assert bs.distinct_n([[1, 1, 2], [1, 2]], 2) == pytest.approx(2 / 3)
