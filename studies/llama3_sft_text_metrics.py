"""ROUGE-L and distinct-n of the finetuned model's generations (llama3_sft study).

The task (tasks/llama3_sft.py) judges the continuations of the held-out sonnets' first lines by
MiniLM similarity and a copy check. This study runs the task exactly (same config, same seed, so
the same generations) and scores the same generations, before and after finetuning, on words:

- ROUGE-L F1 (Lin 2004) against the real continuation: with LCS the longest common subsequence of
  the two word sequences, P = LCS / |gen|, R = LCS / |ref| and F1 = 2PR / (P + R);
- distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, pooled over the generations
  (low: repetitive text), n = 1 and 2; and the mean length of a generation in words.

    python studies/llama3_sft_text_metrics.py          # writes runs/llama3_sft/study/text_metrics/
    python studies/llama3_sft_text_metrics.py --help   # the task's options

The task's own run goes into run/ under --out-dir; metrics.json (last, atomically) holds rouge_l,
distinct_1, distinct_2 and mean_words before and after, beside the task's perplexities.
"""

import dataclasses
import pathlib
import sys

import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import llama3_sft as task  # noqa: E402

OUT_DIR = "runs/llama3_sft/study/text_metrics"


def rouge_l(gen: list[str], ref: list[str]) -> float:
    """ROUGE-L F1 from the longest common subsequence of words (dynamic programming)."""
    if not gen or not ref:
        return 0.0
    row = [0] * (len(ref) + 1)
    for g in gen:
        prev_diag = 0
        for j, r in enumerate(ref, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if g == r else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(gen), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the generations."""
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def text_metrics(gens: list[str], real: list[str]) -> dict:
    """ROUGE-L against the real continuations, distinct-1 and -2, and the mean length in words."""
    gen_words = [task.words(g) for g in gens]
    return {
        "rouge_l": float(np.mean([rouge_l(w, task.words(r)) for w, r in zip(gen_words, real)])),
        "distinct_1": distinct_n(gen_words, 1),
        "distinct_2": distinct_n(gen_words, 2),
        "mean_words": float(np.mean([len(w) for w in gen_words])),
    }


def main(cfg: task.Config) -> dict:
    """The task's run, with its sampled generations recorded, then their word-overlap metrics."""
    task.validate(cfg)
    sampled, generate = [], task.generate  # the task's generations: before, then after

    def recording_generate(model, tokenizer, prompts, cfg, sample=True):
        gens = generate(model, tokenizer, prompts, cfg, sample)
        if sample:
            sampled.append(gens)
        return gens

    _, heldout = task.split_sonnets(task.load_sonnets(), cfg.num_heldout, cfg.seed)
    real = [s.split("\n", 1)[1] for s in heldout]  # what Shakespeare wrote after the first line
    task.generate = recording_generate
    try:
        with task.staged_run(cfg.out_dir) as out:
            run = task.main(dataclasses.replace(cfg, out_dir=str(out / "run")))
            m = {"study": "llama3_sft_text_metrics", "seed": cfg.seed}
            m |= {k: run[k] for k in ("model_used", "ppl_before", "ppl_after")}
            for when, gens in zip(("before", "after"), sampled, strict=True):
                m |= {f"{k}_{when}": v for k, v in text_metrics(gens, real).items()}
            task.write_metrics(out, cfg, m)
    finally:
        task.generate = generate
    print(" ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    return m


if __name__ == "__main__":
    main(tyro.cli(task.Config, default=dataclasses.replace(task.Config(), out_dir=OUT_DIR)))
