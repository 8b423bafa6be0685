"""Why does the flat DQN of tasks/hdqn.py earn 0.065 where the paper's flat learner earns 0.01?

Three measurements, at the task's defaults (5 seeds, 60k steps):
  * exact: which of the 32 memoryless greedy policies the *expected* flat Q-learning update keeps
    under epsilon-greedy exploration (`expected_update_fixed_points`): only "always left" (0.01);
  * flat tabular Q-learning with the same exploration at six step sizes: small steps settle on
    "left" and earn 0.01, large steps stay in a regime that keeps going right;
  * the flat DQN's own mechanism: how often its greedy action in s2 is "left" once epsilon is
    annealed, and what share of the "left" and "right" exits from s2 in its replay buffer paid 1.

    python studies/hdqn_flat_learners.py            # writes runs/hdqn/study/flat_learners/
    python studies/hdqn_flat_learners.py --help
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import hdqn  # noqa: E402
from hdqn import LEFT, NUM_ACTIONS, NUM_STATES, RIGHT, START, TERMINAL  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    seed: int = 0
    """base random seed (the task's seeds for h-DQN and the flat DQN, a third stream for tables)"""
    num_seeds: int = 5
    """seeds of every learner"""
    num_steps: int = 60_000
    """environment steps per seed (a positive multiple of 10)"""
    step_sizes: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    """step sizes of flat tabular Q-learning"""
    out_dir: str = "runs/hdqn/study/flat_learners"
    """where flat_learners.png and metrics.json are written"""


def expected_update_fixed_points(epsilon: float, gamma: float) -> list[tuple[str, float]]:
    """Every memoryless greedy policy that the *expected* flat Q-learning update keeps (exact).

    A flat learner sees only the state, so its data mix the two histories of a state (s6 visited
    or not). Under an epsilon-greedy behaviour policy let w(s) be the share of the time in s with
    s6 visited. The reward on reaching s1 then averages to Rbar(s) = 0.01 + 0.99 * w(s), and the
    update's fixed point solves
        Q(s, a) = P(s1 | s, a) * Rbar(s) + gamma * sum_{s' != s1} P(s' | s, a) * max_a' Q(s', a').
    A greedy policy is kept when it is greedy for its own fixed point. All 2^5 policies over
    s2..s6 are checked; returns (policy as "L"/"R" for s2..s6, its episode reward) for each kept.
    No time limit here: episodes end at s1 with probability 1.
    """
    p = hdqn.transition_matrix()
    live = range(1, NUM_STATES)  # s2..s6; s1 is terminal
    end_reward = np.array([0.01, 1.0])
    kept = []
    for actions in np.ndindex(*(NUM_ACTIONS,) * len(live)):
        greedy = np.array((0, *actions))  # index 0 (s1) is never used
        behaviour = np.full((NUM_STATES, NUM_ACTIONS), epsilon / NUM_ACTIONS)
        behaviour[np.arange(NUM_STATES), greedy] += 1.0 - epsilon
        # occupancy of (state, visited) per episode: n = e_start + n @ M over the live states
        step = np.zeros((NUM_STATES, 2, NUM_STATES, 2))
        for s in live:
            for visited in (0, 1):
                moves = behaviour[s] @ p[:, s]  # P(s' | s) under the behaviour policy
                for s_next in live:
                    step[s, visited, s_next, visited | (s_next == hdqn.GOAL_STATE)] += moves[s_next]
        flat = step.reshape(2 * NUM_STATES, 2 * NUM_STATES)
        start = np.zeros(2 * NUM_STATES)
        start[2 * START] = 1.0
        occupancy = np.linalg.solve(np.eye(2 * NUM_STATES) - flat.T, start).reshape(NUM_STATES, 2)
        w = occupancy[:, 1] / np.maximum(occupancy.sum(1), 1e-300)
        rbar = end_reward[0] + (end_reward[1] - end_reward[0]) * w
        # the fixed point if the maximum picks `greedy` everywhere: a linear solve for V
        reward = p[:, :, TERMINAL].T * rbar[:, None]  # (state, action)
        rows = np.arange(NUM_STATES)
        v = np.linalg.solve(np.eye(NUM_STATES) - gamma * p[greedy, rows], reward[rows, greedy])
        q = reward + gamma * (p @ v).T  # then `greedy` is kept iff it is greedy for this q
        if all(q[s].argmax() == greedy[s] for s in live):
            ends = np.einsum("sa,as->s", behaviour, p[:, :, TERMINAL])  # P(s1 next | s)
            episode_reward = float((occupancy * ends[:, None] * end_reward).sum())
            kept.append(("".join("LR"[a] for a in actions), episode_reward))
    return kept


def episode_log(reward: np.ndarray, done: np.ndarray) -> hdqn.EpisodeLog:
    """The task's episode log, as its `train` builds it, for (..., steps) arrays: each finished
    episode's reward (that of its last step), zero-padded, and the number of episodes."""
    shape = reward.shape
    reward, done = reward.reshape(-1, shape[-1]), done.reshape(-1, shape[-1])
    rewards = [np.pad(r[d], (0, len(r) - d.sum())) for r, d in zip(reward, done)]
    return hdqn.EpisodeLog(np.stack(rewards).reshape(shape), done.sum(1).reshape(shape[:-1]))


def make_tabular_q(cfg: hdqn.Config):
    """Returns (init(key, step_size), step(carry) -> (carry, Trajectory)): flat tabular Q-learning,
    the textbook agent, with the flat DQN's observation and epsilon schedule. Carry: (key, step,
    env, Q, step size)."""

    def init(key: jax.Array, step_size: jax.Array) -> tuple:
        q = jnp.zeros((NUM_STATES, NUM_ACTIONS))
        return key, jnp.int32(0), hdqn.env_reset(), q, step_size

    def step(c: tuple) -> tuple:
        key, t, env, q, step_size = c
        key, act_key, env_key = jax.random.split(key, 3)
        epsilon = hdqn.linear_epsilon(t / (cfg.anneal_frac * cfg.num_steps))
        action = hdqn.epsilon_greedy(act_key, q[env.pos], epsilon)
        nxt, reward, done = hdqn.env_step(env_key, env, action, cfg.time_limit)
        target = reward + cfg.gamma * (1.0 - done) * q[nxt.pos].max()
        q = q.at[env.pos, action].add(step_size * (target - q[env.pos, action]))
        carry = key, t + 1, hdqn.tree_where(done, hdqn.env_reset(), nxt), q, step_size
        return carry, hdqn.Trajectory(nxt.pos, reward, done)

    return init, step


def train_tabular(cfg: hdqn.Config, step_sizes: tuple[float, ...]):
    """Tabular Q-learning for every (step size, seed) in one jitted scan; (log, final Q-tables),
    each with axes (step size, seed, ...)."""
    init, step = make_tabular_q(cfg)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2), cfg.num_seeds)

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0))  # over step sizes
    @functools.partial(jax.vmap, in_axes=(0, None))  # over seeds
    def run(key, step_size):
        return jax.lax.scan(lambda c, _: step(c), init(key, step_size), None, cfg.num_steps)

    carry, steps = jax.device_get(run(hdqn.shard_seeds(keys), jnp.asarray(step_sizes)))
    real = lambda x: np.asarray(x)[:, : cfg.num_seeds]  # drop the seeds that shard_seeds padded
    return episode_log(real(steps.reward), real(steps.done)), real(carry[3])


def train_flat_dqn_counting(cfg: hdqn.Config):
    """The task's flat DQN, same seeds, with a counter beside it: in s2, once epsilon is annealed,
    how often the greedy action was "left" and "right". Returns (final FlatCarry, EpisodeLog,
    counts)."""
    _, step = hdqn.make_flat_dqn(cfg)
    q_values = hdqn.make_dqn(cfg, NUM_STATES, NUM_ACTIONS)[1]

    def counting(carry, _):
        c, s2_greedy = carry
        epsilon = hdqn.linear_epsilon(c.step / (cfg.anneal_frac * cfg.num_steps))
        q = q_values(c.dqn.params, hdqn.one_hot_state(c.env.pos))
        counted = (c.env.pos == START) & (epsilon <= hdqn.EPS_MIN)
        c, steps = step(c)
        return (c, s2_greedy.at[q.argmax()].add(counted.astype(jnp.int32))), steps

    chunk = cfg.num_steps // hdqn.NUM_CHUNKS
    run = jax.jit(jax.vmap(lambda c: jax.lax.scan(counting, c, None, chunk)))
    carry = hdqn.init_carry(cfg, "dqn")
    carry, chunks = (carry, jnp.zeros((carry.key.shape[0], NUM_ACTIONS), jnp.int32)), []
    for _ in range(hdqn.NUM_CHUNKS):
        carry, steps = run(carry)
        chunks.append(jax.device_get(steps))
    flat, counts = jax.tree.map(lambda x: x[: cfg.num_seeds], jax.device_get(carry))
    steps = hdqn.Trajectory(*(np.concatenate(x, axis=1)[: cfg.num_seeds] for x in zip(*chunks)))
    return flat, episode_log(steps.reward, steps.done), counts


def replay_share_of_1(cfg: hdqn.Config, buf: hdqn.Buffer) -> np.ndarray:
    """Per seed and action out of s2: the share of the replay buffer's ends in s1 that paid 1
    (s6 had been visited). A fixed policy would give both actions the same share."""
    stored = np.arange(cfg.buffer_size) < buf.size[:, None]
    from_s2 = stored & (buf.obs.argmax(-1) == START) & (buf.next_obs.argmax(-1) == TERMINAL)
    paid = lambda a: ((buf.reward == 1.0) & from_s2 & (buf.action == a)).sum(1)
    exits = lambda a: np.maximum((from_s2 & (buf.action == a)).sum(1), 1)
    return np.stack([paid(a) / exits(a) for a in (LEFT, RIGHT)], axis=1)  # (seeds, action)


def plot_flat_learners(tab_rewards, step_sizes, rewards: dict, path: pathlib.Path) -> None:
    """Flat tabular Q-learning's final reward against its step size, one dot per seed."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, lr in enumerate(step_sizes):
        ax.scatter(np.full(tab_rewards.shape[1], lr), tab_rewards[i], color="tab:gray", s=14)
    ax.plot(step_sizes, tab_rewards.mean(1), "o-", color="k", label="flat tabular Q-learning")
    styles = {"hdqn": ("tab:blue", "-", "h-DQN"), "dqn": ("tab:red", "-", "flat DQN"),
              "optimum": ("k", "--", "optimum"), "right": ("tab:gray", "-.", '"always right"'),
              "paper": ("tab:red", ":", "paper flat Q-learning")}  # fmt: skip
    for name, (color, ls, label) in styles.items():
        ax.axhline(rewards[name], color=color, ls=ls, label=f"{label} ({rewards[name]:.3f})")
    ax.set(xscale="log", xlabel="step size of the tabular Q-learning update", ylim=(0, 0.25))
    ax.set(ylabel="average reward, last 1000 episodes")
    ax.set_title("A flat learner lands in one of two regimes (dots: seeds)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    hdqn.save_figure(fig, path)


def main(study: StudyConfig) -> dict:
    cfg = hdqn.Config(
        seed=study.seed, num_seeds=study.num_seeds, num_steps=study.num_steps, out_dir=study.out_dir
    )
    hdqn.validate(cfg)
    if not study.step_sizes or not all(0 < x <= 1 for x in study.step_sizes):
        raise hdqn.option_error("step_sizes", study.step_sizes, "must be numbers > 0 and <= 1")
    fixed_points = expected_update_fixed_points(hdqn.EPS_MIN, cfg.gamma)
    tab_log, tab_q = train_tabular(cfg, study.step_sizes)
    tab = np.stack([hdqn.last_episodes_mean(r, n) for r, n in zip(tab_log.reward, tab_log.count)])
    goes_left = (tab_q[:, :, START, LEFT] > tab_q[:, :, START, RIGHT]).mean(1)  # share of seeds
    flat, flat_log, s2_greedy = train_flat_dqn_counting(cfg)
    log = hdqn.train(cfg, "hdqn").log
    reward = lambda log: float(hdqn.last_episodes_mean(log.reward, log.count).mean())
    share = replay_share_of_1(cfg, flat.dqn.buffer)
    rewards = {
        "hdqn": reward(log), "dqn": reward(flat_log), "optimum": hdqn.solve_mdp(cfg.time_limit),
        "right": hdqn.solve_mdp(cfg.time_limit, policy=np.array([0.0, 1.0])),
        "paper": hdqn.PAPER_FLAT_REWARD,
    }  # fmt: skip
    metrics = {
        "study": "hdqn_flat_learners",
        "seed": cfg.seed,
        "num_seeds": cfg.num_seeds,
        "num_steps": cfg.num_steps,
        "hdqn_reward": rewards["hdqn"],
        "dqn_reward": rewards["dqn"],
        "always_right_reward": rewards["right"],
        "flat_expected_update_fixed_points": " ".join(f"{p}:{r:.4f}" for p, r in fixed_points),
        "tabular_step_sizes": " ".join(f"{lr:g}" for lr in study.step_sizes),
        "tabular_q_reward_by_step_size": " ".join(f"{r:.4f}" for r in tab.mean(1)),
        "tabular_q_share_greedy_left_in_s2": " ".join(f"{g:.1f}" for g in goes_left),
        "dqn_s2_greedy_left_share": float(
            (s2_greedy[:, LEFT] / np.maximum(s2_greedy.sum(1), 1)).mean()
        ),
        "dqn_replay_s2_left_paid_1": float(share[:, LEFT].mean()),
        "dqn_replay_s2_right_paid_1": float(share[:, RIGHT].mean()),
    }
    with hdqn.staged_run(study.out_dir) as out:
        plot_flat_learners(tab, study.step_sizes, rewards, out / "flat_learners.png")
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        )
        hdqn.write_metrics(out, study, metrics)  # config.json, then metrics.json last, atomically
    return metrics


if __name__ == "__main__":
    main(tyro.cli(StudyConfig))
