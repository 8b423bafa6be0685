"""Do the hand and optax twins stay together at every step, and is the hand-written code as fast?

The task (tasks/optimization.py) records the largest gap between the twins; this study retrains
the same pairs (same config and seed, so the same trajectories) and draws the gap after every
step (param_gap.png) and the median time of one training step of each twin (step_time.png).

    python studies/optimization_trajectory.py   # runs/optimization/study/trajectory/
    python studies/optimization_trajectory.py --help
"""

import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro
from flax import nnx
from tqdm.auto import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import optimization as opt  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    num_steps: int = 3000  # optimizer steps per twin (the task's default)
    train_size: int = 0  # training images after the validation split; 0 = all (the task's)
    seed: int = 0  # the task's seed
    out_dir: str = "runs/optimization/study/trajectory"  # where the figures and metrics go


def timed_pair(cfg: opt.Config, txs, graphdef, params0, data, indices) -> dict:
    """Step the two twins in lockstep, timing each step on its own; the gap after every step."""
    steps = [opt.make_train_step(graphdef, tx) for tx in txs]
    params, states = [params0, params0], [tx.init(params0) for tx in txs]
    gap_fn = jax.jit(opt.relative_gap)
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"], jnp.int32)
    seconds, gaps = [[], []], []
    for idx in tqdm(jnp.asarray(indices), disable=None):
        for k in range(2):
            start = time.perf_counter()
            params[k], states[k], loss = steps[k](params[k], states[k], x_train, y_train, idx)
            loss.block_until_ready()
            seconds[k].append(time.perf_counter() - start)
        gaps.append(float(gap_fn(params[0], params[1])))
    # the median skips the first call, which also compiles
    return {"gap": np.asarray(gaps), "step_ms": [1000 * float(np.median(s)) for s in seconds]}


def plot_param_gap(results: dict, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    floor = 1e-12  # exact zeros cannot be drawn on a log axis; they sit on this line
    for name, res in results.items():
        gap = res["gap"]
        label = f"{name} (max {gap.max():.2g})" if gap.max() > 0 else f"{name} (exactly 0)"
        ax.plot(np.arange(1, len(gap) + 1), np.maximum(gap, floor), label=label)
    ax.axhline(1e-5, color="k", ls=":", label="bar 1e-5")
    ax.set(yscale="log", ylim=(floor / 2, 1e-3), xlabel="step")
    ax.set_ylabel("max over layers ||θ_hand − θ_optax|| / ||θ_optax||")
    ax.set_title("Parameter gap between the hand and the optax twin")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    opt.save_figure(fig, path)


def plot_step_time(results: dict, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = np.arange(len(results))
    for k, (offset, impl) in enumerate(((-0.2, "hand"), (0.2, "optax"))):
        ax.bar(xs + offset, [r["step_ms"][k] for r in results.values()], width=0.4, label=impl)
    ax.set_xticks(xs, list(results))
    ax.set_ylabel("ms per training step (median)")
    ax.set_title("Time per step: gradient + update + apply_updates, batch of images")
    ax.legend()
    fig.tight_layout()
    opt.save_figure(fig, path)


def main(study: StudyConfig) -> dict:
    cfg = opt.Config(num_steps=study.num_steps, train_size=study.train_size, seed=study.seed,
                     out_dir=study.out_dir)  # fmt: skip
    opt.validate(cfg)
    data = opt.split_data(cfg, opt.load_mnist())
    indices = opt.batch_indices(cfg, len(data["y_train"]))
    graphdef, params0 = nnx.split(opt.CNN(nnx.Rngs(cfg.seed)))  # the task's initialisation
    results = {
        name: timed_pair(cfg, txs, graphdef, params0, data, indices)
        for name, txs in opt.make_optimizers(cfg).items()
    }
    metrics: dict = {
        "study": "optimization_trajectory",
        "seed": cfg.seed,
        "num_steps": cfg.num_steps,
    }
    for name, res in results.items():
        metrics[f"max_rel_param_diff_{name}"] = float(res["gap"].max())
        metrics[f"step_ms_{name}_hand"], metrics[f"step_ms_{name}_optax"] = res["step_ms"]
    step_ms = [ms for res in results.values() for ms in res["step_ms"]]
    metrics["throughput"] = 1000 / float(np.mean(step_ms))  # one twin's steps per second
    metrics["throughput_unit"] = "steps/s"
    with opt.staged_run(study.out_dir) as out:
        plot_param_gap(results, out / "param_gap.png")
        plot_step_time(results, out / "step_time.png")
        print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        opt.write_metrics(out, study, metrics)  # config.json, then metrics.json last, atomically
    return metrics


if __name__ == "__main__":
    main(tyro.cli(StudyConfig))
