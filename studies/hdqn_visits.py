"""Where do the two agents of tasks/hdqn.py go? The paper's Fig. 4: average visits to s3..s6 per
episode, per 1000 episodes, for h-DQN and the flat DQN (the task's own runs: same seeds, same
numbers), counted from the trajectory that the task's `train` returns. h-DQN learns to go out to
s6 and back; the flat DQN does not. The visits to s6 per episode were metrics of the task before;
they come from here now (`{agent}_s6_visits_per_episode`, same names, same values).

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


def episode_visits(steps: hdqn.Trajectory) -> np.ndarray:
    """Per seed and finished episode, in order, the visits to each state: (seeds, steps, 6),
    zero-padded. An episode's steps are those after the previous end, up to its own."""
    visits = np.zeros(steps.pos.shape + (hdqn.NUM_STATES,), np.int32)
    for row, pos, done in zip(visits, steps.pos, steps.done):
        episode = np.cumsum(done) - done  # the episode each step belongs to
        finished = episode < done.sum()
        np.add.at(row, (episode[finished], pos[finished]), 1)
    return visits


def per_bin(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Averages per 1000 episodes, over the bins all seeds finished: (seeds, bins, ...)."""
    bins = int(counts.min()) // hdqn.LAST_EPISODES
    shape = (values.shape[0], bins, hdqn.LAST_EPISODES) + values.shape[2:]
    return values[:, : bins * hdqn.LAST_EPISODES].reshape(shape).mean(2)


def plot_visits(visits: dict, counts: dict, path: pathlib.Path) -> None:
    """Paper Fig. 4: average visits to s3..s6 per episode, per 1000 episodes."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    for agent, (label, color) in AGENTS.items():
        binned = per_bin(visits[agent].astype(float), counts[agent])  # (seeds, bins, 6)
        x = np.arange(1, binned.shape[1] + 1)
        for state, ax in zip(range(2, hdqn.NUM_STATES), axes):
            v = binned[:, :, state]
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
    runs = {agent: hdqn.train(cfg, agent) for agent in AGENTS}
    visits = {agent: episode_visits(run.trajectory) for agent, run in runs.items()}
    counts = {agent: run.log.count for agent, run in runs.items()}
    metrics = {"study": "hdqn_visits", "seed": cfg.seed, "num_seeds": cfg.num_seeds,
               "num_steps": cfg.num_steps}  # fmt: skip
    for agent in AGENTS:  # visits per episode, last 1000 episodes, mean over seeds
        mean = hdqn.last_episodes_mean(visits[agent], counts[agent]).mean(0)
        metrics |= {f"{agent}_s{s + 1}_visits_per_episode": float(mean[s]) for s in range(2, 6)}
    with hdqn.staged_run(cfg.out_dir) as out:
        plot_visits(visits, counts, out / "visits.png")
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
