"""Is the trained model's next-number distribution flat after any context, not just on average?

The task's held-out NLL averages over random contexts; this study trains the task's model (same
config and seed, so the same weights) and looks at p(x | context) after a few chosen contexts: the
empty one, extremes, a run, a long repeat. Each should be 1/101 everywhere; the study writes the
largest |p - 1/101| per context and next_token.png.

    python studies/rand_transformer_next_token.py   # runs/rand_transformer/study/next_token/
    python studies/rand_transformer_next_token.py --help
"""

import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import rand_transformer as rt  # noqa: E402

CONTEXTS = {"BOS": [], "BOS 0": [0], "BOS 100 100 100": [100, 100, 100],
            "BOS 1 2 3 4 5": [1, 2, 3, 4, 5], "BOS 7 x 20": [7] * 20}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    steps: int = 1500  # optimizer steps (the task's default)
    context_len: int = (
        32  # the model's context window (the task's default; >= 21 for every context)
    )
    seed: int = 0  # the task's seed
    out_dir: str = "runs/rand_transformer/study/next_token"  # where the figure and metrics go


def next_token_probs(model: rt.Transformer, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """p(next number | BOS, context) for every chosen context: name -> (101,)."""
    probs = {}
    for name, ctx in CONTEXTS.items():
        logits = model(jnp.array([[rt.BOS, *ctx]]))[0, -1] / temperature
        probs[name] = np.asarray(jax.nn.softmax(logits))
    return probs


def plot_next_token(probs: dict[str, np.ndarray], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(len(probs), 1, figsize=(8, 1.6 * len(probs)), sharex=True)
    for ax, (name, p) in zip(axes, probs.items()):
        ax.bar(np.arange(rt.NUM_VALUES), p, width=1.0)
        ax.axhline(1 / rt.NUM_VALUES, color="k", lw=1)
        ax.set(ylim=(0, 2 / rt.NUM_VALUES), ylabel="p")
        gap = np.abs(p - 1 / rt.NUM_VALUES).max()
        ax.set_title(f"after '{name}': max |p - 1/101| = {gap:.2e}", fontsize=9)
    axes[-1].set_xlabel("next value")
    fig.tight_layout()
    rt.save_figure(fig, path)


def main(study: StudyConfig) -> dict:
    cfg = rt.Config(
        steps=study.steps, context_len=study.context_len, seed=study.seed, out_dir=study.out_dir
    )
    rt.validate(cfg)
    if cfg.context_len < 1 + max(len(c) for c in CONTEXTS.values()):
        raise rt.option_error("context_len", cfg.context_len, "must be >= 21 (the longest context)")
    # the task's keys: (held-out, train, sample) split from the seed
    key_heldout, key_train, _ = jax.random.split(jax.random.key(cfg.seed), 3)
    heldout = rt.make_batch(key_heldout, rt.HELDOUT_SEQS, cfg.context_len)
    model, _, _ = rt.train(cfg, key_train, heldout)
    probs = next_token_probs(model)
    gaps = {name: float(np.abs(p - 1 / rt.NUM_VALUES).max()) for name, p in probs.items()}
    metrics = {
        "study": "rand_transformer_next_token",
        "seed": cfg.seed,
        "steps": cfg.steps,
        "max_abs_p_gap": max(gaps.values()),
        "max_abs_p_gap_by_context": "; ".join(f"{k}: {v:.2e}" for k, v in gaps.items()),
        "max_kl_to_uniform": max(
            float(np.sum(p * np.log(p * rt.NUM_VALUES))) for p in probs.values()
        ),
        "uniform_p": 1 / rt.NUM_VALUES,
        "nll_floor": math.log(rt.NUM_VALUES),
    }
    with rt.staged_run(study.out_dir) as out:
        plot_next_token(probs, out / "next_token.png")
        print(" ".join(f"{k}={v}" for k, v in metrics.items()))
        rt.write_metrics(out, study, metrics)  # config.json, then metrics.json last, atomically
    return metrics


if __name__ == "__main__":
    main(tyro.cli(StudyConfig))
