"""Does the joint law fit every (N, D) point, and where does early stopping read each run?

tasks/scaling_laws.py draws the two sweeps (scaling.png). This study runs the task (same config and
seed, so the same runs and fits) and draws the rest of its grid: every (N, D) point against the
joint law L(N, D) = E + A / N^alpha + B / D^beta, a line per width (joint.png), and the validation
loss of the data sweep's runs against step, with the point that early stopping keeps (curves.png:
small subsets overfit early, which is why every run keeps its best validation loss).

    python studies/scaling_laws_diagnostics.py     # runs/scaling_laws/study/diagnostics/
    python studies/scaling_laws_diagnostics.py --steps 100 --help   # any task flag works
"""

import dataclasses
import json
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import scaling_laws as sl  # noqa: E402

DEFAULT = dataclasses.replace(sl.Config(), out_dir="runs/scaling_laws/study/diagnostics")


def joint_law(n, d, fit: dict):
    """L(N, D) = E + A / N^alpha + B / D^beta, with the parameters `fit_law` returns."""
    return fit["E"] + fit["A"] * np.power(n, -fit["alpha"]) + fit["B"] * np.power(d, -fit["beta"])


def plot_joint(results: list[dict], fit: dict, path: pathlib.Path) -> None:
    """Mean best validation loss ± std over seeds of every (N, D) point, a line per width."""
    points: dict[tuple, list] = {}
    for r in results:
        points.setdefault((r["channels"], r["n_train"]), []).append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, c in enumerate(sorted({c for c, _ in points})):  # narrowest first
        d = sorted(n for width, n in points if width == c)
        losses = [points[(c, n)] for n in d]
        mean, std = [np.mean(v) for v in losses], [np.std(v) for v in losses]
        label = f"N={sl.param_count(c)}"
        ax.errorbar(d, mean, std, fmt="o", color=f"C{i}", capsize=3, label=label)
        grid = np.geomspace(min(d), max(d), 50)
        ax.plot(grid, joint_law(sl.param_count(c), grid, fit), "-", color=f"C{i}", alpha=0.7)
    ax.set(xscale="log", yscale="log", xlabel="training images D")
    ax.set(ylabel="best validation loss (nats)")
    ax.set_title(f"joint fit: α={fit['alpha']:.2f}, β={fit['beta']:.2f}, R²={fit['r2']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    sl.save_figure(fig, path)


def plot_curves(results: list[dict], eval_every: int, path: pathlib.Path) -> None:
    """Validation loss against step of the widest model's runs (first seed), best point starred."""
    first, widest = results[0]["seed"], max(r["channels"] for r in results)
    runs = [r for r in results if r["channels"] == widest and r["seed"] == first]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(sorted(runs, key=lambda r: -r["n_train"])):
        steps = eval_every * (np.arange(len(r["val_loss_curve"])) + 1)
        ax.plot(steps, r["val_loss_curve"], "o-", ms=3, color=f"C{i}", label=f"D={r['n_train']}")
        ax.plot(r["best_step"], r["val_loss"], "k*", ms=10)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="validation loss (nats)")
    ax.set_title("widest model, same step budget: the best point (*) is what the sweep keeps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    sl.save_figure(fig, path)


def main(cfg: sl.Config) -> dict:
    metrics = sl.main(cfg)  # the task's run: metrics.json, runs.json and scaling.png in out_dir
    out = pathlib.Path(cfg.out_dir)
    results = json.loads((out / "runs.json").read_text())
    joint = {k: metrics[f"joint_{k}"] for k in ("E", "A", "alpha", "B", "beta", "r2")}
    plot_joint(results, joint, out / "joint.png")
    plot_curves(results, cfg.eval_every, out / "curves.png")
    return metrics


if __name__ == "__main__":
    main(tyro.cli(sl.Config, default=DEFAULT))
