"""How spread out are the sampled answers, and does the CoT arm write its whole scratchpad?

The task (tasks/cot.py) scores the answers by validity and by TV distance to the exact target.
This study trains the same two arms (same config and seed, so the same models and the same answers
on the random split) and writes what the task wrote beside them until issue 12: per family,
split and arm, the plug-in entropy of the answers (`<family>_<split>_<arm>_entropy`), beside that
of exact samples of the same size (`..._entropy_ref`, the same draws as the task's TV floor) and
the exact target's entropy (`..._exact_entropy`); and the tokens each arm writes per answer
(`<arm>_tokens_per_answer`: 11 for the whole CoT layout, 3 for the direct one). It writes
metrics.json.

    python studies/cot_answers.py          # runs/cot/study/answers/
    python studies/cot_answers.py --steps 300 --help   # any task flag works
"""

import dataclasses
import pathlib
import sys

import jax
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import cot  # noqa: E402

DEFAULT = dataclasses.replace(cot.Config(), out_dir="runs/cot/study/answers")


def answer_entropy(answers: np.ndarray) -> float:
    """Mean over requests of the plug-in entropy of each request's answers (R, S); unparseable
    answers (-1) are one more outcome."""
    freqs = [np.bincount(a + 1, minlength=102) / len(a) for a in answers]
    return float(np.mean([cot.entropy(f) for f in freqs]))


def evaluate_counting_tokens(*args) -> tuple[dict, float]:
    """cot.evaluate, and the mean number of tokens the model wrote per answer, read off the sampled
    tokens as cot.parse_answers sees them (one call per set and seed, each the same size)."""
    counts, parse = [], cot.parse_answers

    def counting_parse(tokens):
        answers, written = parse(tokens)
        counts.append(written.mean())
        return answers, written

    cot.parse_answers = counting_parse
    try:
        return cot.evaluate(*args), float(np.mean(counts))
    finally:
        cot.parse_answers = parse


def main(cfg: cot.Config) -> dict:
    cot.validate(cfg)
    sets = cot.eval_sets(cfg.eval_requests)
    init, apply = cot.make_model_fns(cfg)
    metrics: dict = {"study": "cot_answers", "seed": cfg.seed}
    results = {}
    for is_cot, arm in zip((True, False), cot.ARMS):  # the task's training and sampling keys
        params, _ = cot.train(cfg, is_cot, init, apply)
        generate = cot.make_generate(apply, is_cot, cfg)
        key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
        args = (generate, params, sets, cfg.eval_samples, key, cfg, is_cot)
        results[arm], metrics[f"{arm}_tokens_per_answer"] = evaluate_counting_tokens(*args)
    rng = np.random.default_rng(cfg.seed)  # the task's exact samples, drawn in the task's order
    for (fam, split), reqs in sets.items():
        for arm in cot.ARMS:
            per_seed = [answer_entropy(answers) for answers in results[arm][fam, split]]
            metrics[f"{fam}_{split}_{arm}_entropy"] = float(np.mean(per_seed))
        exact = [cot.target_distribution(r) for r in reqs]
        draws = [[rng.choice(101, cfg.eval_samples, p=p) for p in exact] for _ in range(4)]
        metrics[f"{fam}_{split}_entropy_ref"] = float(np.mean([answer_entropy(d) for d in draws]))
        metrics[f"{fam}_{split}_exact_entropy"] = float(np.mean([cot.entropy(p) for p in exact]))
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith("per_answer")))
    with cot.staged_run(cfg.out_dir) as out:
        cot.write_metrics(out, cfg, metrics)
    return metrics


if __name__ == "__main__":
    main(tyro.cli(cot.Config, default=DEFAULT))
