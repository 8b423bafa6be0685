"""Where do the two agents of tasks/hdqn.py go? The paper's Fig. 4: average visits to s3..s6 per
episode, per 1000 episodes, for h-DQN and the flat DQN (the task's own runs: same seeds, same
numbers). h-DQN learns to go out to s6 and back; the flat DQN does not.

    python studies/hdqn_visits.py            # writes runs/hdqn/study/visits/ (visits.png)
    python studies/hdqn_visits.py --help     # every option of the task's Config
"""

import dataclasses
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import hdqn  # noqa: E402

AGENTS = {"hdqn": ("h-DQN", "tab:blue"), "dqn": ("flat DQN", "tab:red")}


def plot_visits(logs: dict, path: pathlib.Path) -> None:
    """Paper Fig. 4: average visits to s3..s6 per episode, per 1000 episodes."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    for agent, (label, color) in AGENTS.items():
        visits = hdqn.per_bin(
            logs[agent].visits.astype(float), logs[agent].count
        )  # (seeds, bins, 6)
        x = np.arange(1, visits.shape[1] + 1)
        for state, ax in zip(range(2, hdqn.NUM_STATES), axes):
            v = visits[:, :, state]
            ax.plot(x, v.mean(0), color=color, label=label)
            ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.2)
            ax.set(title=f"visits to s{state + 1}", xlabel="episodes (thousands)")
    axes[0].set_ylabel("visits per episode")
    axes[0].legend()
    fig.suptitle("Visits to s3..s6 per episode (mean and min-max over seeds)")
    fig.tight_layout()
    hdqn.save_figure(fig, path)


def main(cfg: hdqn.Config) -> dict:
    hdqn.validate(cfg)
    logs = {agent: hdqn.train(cfg, agent).log for agent in AGENTS}
    metrics = {"study": "hdqn_visits", "seed": cfg.seed, "num_seeds": cfg.num_seeds,
               "num_steps": cfg.num_steps}  # fmt: skip
    for agent, log in logs.items():  # visits per episode, last 1000 episodes, mean over seeds
        visits = hdqn.last_episodes_mean(log.visits, log.count).mean(0)
        metrics |= {f"{agent}_s{s + 1}_visits_per_episode": float(visits[s]) for s in range(2, 6)}
    with hdqn.staged_run(cfg.out_dir) as out:
        plot_visits(logs, out / "visits.png")
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        )
        hdqn.write_metrics(out, cfg, metrics)  # config.json, then metrics.json last, atomically
    return metrics


if __name__ == "__main__":
    default = dataclasses.replace(hdqn.Config(), out_dir="runs/hdqn/study/visits")
    main(tyro.cli(hdqn.Config, default=default))
