"""Hierarchical DQN (h-DQN) on the 6-state stochastic decision process, against a flat DQN.

What this teaches: why temporal abstraction plus intrinsic motivation helps exploration when the
reward is sparse, delayed and depends on the *history*, not just the current state.

The environment (Kulkarni, Narasimhan, Saeedi, Tenenbaum, "Hierarchical Deep Reinforcement
Learning: Integrating Temporal Abstraction and Intrinsic Motivation", NeurIPS 2016, section 4.1):
six states s1..s6 in a row; every episode starts in s2; s1 is terminal. "left" always moves one
state left; "right" moves right with probability 0.5 and otherwise left. On reaching s1 the
reward is 1 if s6 was visited on the way, else 0.01. The best any policy can do (gambler's ruin:
a fair walk from s2 hits s6 before s1 with probability 1/5) is 0.2 * 1 + 0.8 * 0.01 = 0.208.

Two choices the paper leaves open, made here:
  * "right" in s6 moves left (s6 is a wall), as in the widely copied public environment;
  * an episode also ends after `time_limit` = 50 steps. The reward is paid on reaching s1, so an
    episode cut off earns 0. The optimum under that limit is still 0.2080 to 4 decimals (value
    iteration below computes it): the optimal agent almost never needs 50 steps.

The agent has two levels, each a small MLP Q-network with its own replay buffer, target network
and Adam optimiser:
  * the meta-controller Q2(s, g) picks a goal g in {s1..s6} (a goal equal to the current state
    means "come back here") and learns from the extrinsic reward F summed over the option:
        Q2(s, g) <- F + gamma * max_g' Q2(s', g')
  * the controller Q1(s, a; g) acts until s == g or the episode ends, rewarded by the internal
    critic r = 1 when it reaches g:
        Q1(s, a; g) <- r + gamma * max_a' Q1(s', a'; g)
Exploration (paper Algorithm 1): the meta-controller's epsilon2 anneals linearly from 1 to 0.1;
the controller has one epsilon1_g per goal, annealed adaptively from how often g is reached.

The baseline is a flat DQN on the same observation (a one-hot of the current state). That state
is not Markov for the reward: it does not say whether s6 was visited, so in s3..s5 "right" is
right on the way out and wrong on the way back. Worse, for a flat learner the reward on reaching
s1 from s2 cannot depend on the action that got it there, so "right" in s2 only delays it:
    Q(s2, left) = Rbar(s2),    Q(s2, right) = 0.5 * Rbar(s2) + 0.5 * gamma * V(s3),
where Rbar(s) is the average reward on reaching s1 over the times the learner is in s.
`expected_update_fixed_points` checks all 32 memoryless greedy policies exactly. Under
epsilon = 0.1 exploration (and for gamma 0.5, 0.9 and 0.99), the only policy the expected
Q-learning update keeps is "always left", worth 0.01: the paper's flat number.

A sampled learner need not find it. The equation above needs the data for (s2, left) and
(s2, right) to come from the same mix of histories. A fixed policy gives that, since it cannot
see the history. A learner whose greedy action in s2 flips now and then does not: many of its
"left" samples come from the stretches when it was greedy-left, and those episodes end at once,
having rarely seen s6. So "left" looks worse than it is, Q(s2, left) is underestimated, and the
greedy action stays "right": a self-sustaining regime that earns more than 0.01. Large steps
(Q-values that track recent data) produce the flips; small steps let the learner settle on
"left". The run measures both regimes with flat tabular Q-learning at six step sizes
(flat_learners.png) and records the mechanism in the flat DQN (metrics.json, below).

Implementation: PureJaxRL style. The environment is pure JAX; one environment step of either
agent (act, store, learn, reset) is a pure function; `lax.scan` runs chunks of steps under one
`jax.jit`, and `jax.vmap` runs 5 seeds at once. The seed axis is split over every local device
(`shard_seeds`: a 1-D `Mesh` and a `NamedSharding`), so 8 accelerators run 8 times the seeds in
about the same time; with one device the code path is the same.

    python tasks/hdqn.py                 # 5 seeds of h-DQN and flat DQN, figures and metrics.json
    python tasks/hdqn.py --preset paper  # the paper's 10 runs, learning rate and epsilon schedule
    python tasks/hdqn.py --help          # every option

Expected result (defaults: 5 seeds, 60k steps per seed and agent; about 35 s on an idle 2-core
machine): average extrinsic reward over the last 1000 episodes, mean +- std over seeds,
h-DQN 0.144 +- 0.010 (paper: about 0.13), flat DQN 0.065 +- 0.005 (paper: about 0.01), optimum
0.208. h-DQN stays below 0.208 because both levels keep exploring with epsilon = 0.1 to the end.
The bars, stored in metrics.json beside the results: h-DQN >= 0.13 (`hdqn_reward_target`) and at
least twice the flat DQN (`hdqn_over_dqn` >= `hdqn_over_dqn_target` = 2).
The flat DQN misses the paper's 0.01: it sits in the large-step regime above (a standard
Adam-trained DQN keeps flipping between Q-values about 0.02 apart). At the end its Q(s2, left) is
0.038 and Q(s2, right) 0.064 (means over seeds);
after annealing its greedy action in s2 was "left" 7% of the time; in its replay buffer 3.0% of
the "left" exits from s2 paid 1, against 5.4% of the "right" exits that fell back to s1, where a
fixed policy would give both the same share. Flat tabular Q-learning with the same exploration
scores 0.010 at step sizes 0.002, 0.005 and 0.01 (every seed ends greedy-left in s2), and 0.059,
0.104 and 0.093 at 0.02, 0.05 and 0.1. A flat learner can earn that much without memory:
"always right" is worth 0.1755 under the 50-step limit (0.208 without it). The shared
hyperparameters move the flat DQN only a little; it stays in the noisy regime (measured with
`--gamma`, `--learning-rate` and `--buffer-size`, 5 seeds each):
    gamma 0.9: h-DQN 0.150, flat DQN 0.048      learning rate 2.5e-4: h-DQN 0.152, flat DQN 0.050
    gamma 0.95: h-DQN 0.150, flat DQN 0.053     learning rate 1e-4:   h-DQN 0.147, flat DQN 0.050
    buffer 2000: h-DQN 0.146, flat DQN 0.068
So the paper's flat 0.01 depends on the learner settling, not only on the missing memory.
Files in runs/hdqn/: reward.png, visits.png, flat_learners.png, metrics.json.

Differences from the paper: the controller's epsilon1_g schedule. Algorithm 1 anneals it "using
the average success rate of reaching goal g" without a formula. A rate alone cannot work here:
from s2 even a perfect controller reaches s6 only 1 time in 5, so a rate threshold would keep
exploring s6 forever. We anneal epsilon1_g linearly from 1 to 0.1 in the number of times g was
reached (success rate times attempts), so goals the controller masters early stop exploring early.
Network sizes and buffer sizes are ours; the paper does not give them for this task. The
paper's own settings (10 runs averaged in its Fig. 3, epsilon annealed from 1 to 0.1 over 50,000
steps, learning rate 0.00025) are the `paper` preset; its training length ("200 epochs") is not
given in steps, so the preset runs 200k steps, with the anneal over the first quarter as here.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tyro
from flax import nnx
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# %% ---------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Config:
    preset: Literal["cpu", "paper"] = "cpu"
    """the defaults to start from. `cpu`: the 2-core CPU run (5 seeds, 60k steps).
    `paper`: the paper's 10 runs (Fig. 3), learning rate 2.5e-4, epsilon annealed 50k of 200k steps.
    Flags given on the command line override the preset's values."""
    seed: int = 0
    """base random seed; the seeds run are split from it"""
    num_seeds: int = 5
    """independent runs of each agent, vmapped and split over the local devices"""
    num_steps: int = 60_000
    """environment steps per seed and agent (a positive multiple of 10)"""
    time_limit: int = 50
    """an episode ends after this many steps even if s1 is not reached"""
    gamma: float = 0.99
    """discount of both levels and of the flat DQN"""
    hidden: int = 64
    """hidden units of every Q-network (one hidden layer)"""
    learning_rate: float = 1e-3
    """Adam learning rate of every Q-network"""
    batch_size: int = 32
    """minibatch size of each replay update (one update per level per step)"""
    buffer_size: int = 20_000
    """capacity of each replay buffer (at least batch_size: learning waits for one full batch)"""
    target_period: int = 500
    """steps between copies of the online network into the target network"""
    anneal_frac: float = 0.25
    """fraction of num_steps over which the meta-controller's and flat DQN's epsilon go 1 -> 0.1"""
    goal_anneal_reaches: int = 100
    """times goal g must be reached for the controller's epsilon_g to go from 1 to 0.1"""
    tabular_step_sizes: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    """step sizes of the flat tabular Q-learning diagnostic (why the flat result is fragile)"""
    out_dir: str = "runs/hdqn"
    """where figures and metrics.json are written"""


PRESETS: dict[str, Config] = {
    "cpu": Config(),
    # Kulkarni et al. 2016, section 4.1: "Figure 3 plots the evolution of reward for both methods
    # averaged over 10 different runs"; "all epsilon parameters are annealed from 1 to 0.1 over
    # 50,000 steps. The learning rate is set to 0.00025." (0.25 * 200k = 50k steps of annealing.)
    "paper": Config(preset="paper", num_seeds=10, num_steps=200_000, learning_rate=2.5e-4),
}
PAPER_HDQN_REWARD = 0.13  # paper Fig. 3, h-DQN; also the bar for hdqn_reward
PAPER_FLAT_REWARD = 0.01  # paper Fig. 3, flat Q-learning
HDQN_OVER_DQN_TARGET = 2.0  # the bar: h-DQN earns at least twice the flat DQN
EPS_MIN = 0.1  # final epsilon of every schedule (paper)
LAST_EPISODES = 1000  # the headline averages the last 1000 episodes of each seed
NUM_CHUNKS = 10  # the host sees training 10 times (progress bar and log line); all else is jitted


# %% ---------------------------------------------------------------- helpers
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
    """Raise unless out_dir is a new or empty folder, or an earlier run's, that can be written.
    The run replaces it whole, so a folder holding anything else is refused."""
    path = pathlib.Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise option_error("out_dir", out_dir, "is a file; give a folder to write the run into")
    is_run = (path / "config.json").exists() or (path / "metrics.json").exists()
    if path.is_dir() and any(path.iterdir()) and not is_run:
        raise option_error(
            "out_dir", out_dir, "holds other files; give a new or empty folder, or a run's folder"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path.parent).cleanup()
    except OSError as err:
        raise option_error("out_dir", out_dir, f"cannot be written ({err.strerror})") from None


@contextlib.contextmanager
def staged_run(out_dir: str):
    """Yield a fresh folder to write a run into; on success it replaces out_dir whole, so a failed
    or killed run leaves the previous results as they were, never a mix of two runs."""
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


def cli_config(args: list[str] | None = None) -> "Config":
    """Parse the command line: `--preset NAME` picks the defaults from PRESETS, and any other flag
    overrides them. In a notebook the flags come from $TOY_EXAMPLES_ARGS, not the kernel's argv."""
    if args is None:
        in_kernel = "ipykernel" in sys.modules
        args = shlex.split(os.environ.get("TOY_EXAMPLES_ARGS", "")) if in_kernel else sys.argv[1:]
    flags = [f"{a}={b}" if a == "--preset" else a for a, b in zip(args, args[1:] + [""])]
    name = ([f.split("=", 1)[1] for f in flags if f.startswith("--preset=")] or ["cpu"])[-1]
    return tyro.cli(Config, default=PRESETS.get(name, PRESETS["cpu"]), args=args)


def run_cli() -> dict:
    """`python tasks/<task>.py [flags]`: a bad option prints one line and exits 2 before any work;
    missing or corrupt data, or a diverged run, prints one line and exits 1."""
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


def device_info() -> dict:
    """Where the run ran, for metrics.json: JAX's backend, the device kind, how many devices."""
    devices = jax.devices()
    return {
        "device": f"{jax.default_backend()}:{devices[0].device_kind}",
        "num_devices": len(devices),
    }


def shard_seeds(tree):
    """Split the leading (seed) axis of every array in `tree` over all local devices, with a 1-D
    Mesh and a NamedSharding: jit then runs each device's seeds on that device, so 8 accelerators
    train 8x the seeds in about the same time. A seed count that the device count does not divide
    is padded by repeating the last seed; keep the first num_seeds rows of every result."""
    devices = jax.devices()
    pad = -jax.tree.leaves(tree)[0].shape[0] % len(devices)
    if pad:
        tree = jax.tree.map(lambda x: jnp.concatenate([x] + [x[-1:]] * pad), tree)
    mesh = jax.sharding.Mesh(np.array(devices), ("seed",))
    return jax.device_put(
        tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))
    )


# %% ---------------------------------------------------------------- environment
NUM_STATES = 6  # index 0..5 is s1..s6
TERMINAL, START, GOAL_STATE = 0, 1, 5  # s1, s2, s6
LEFT, RIGHT = 0, 1
NUM_ACTIONS = 2


class EnvState(NamedTuple):
    pos: jax.Array  # int, 0..5
    visited_s6: jax.Array  # bool: the part of the history the reward depends on
    t: jax.Array  # int, steps taken


def env_reset() -> EnvState:
    return EnvState(jnp.int32(START), jnp.bool_(False), jnp.int32(0))


def env_step(
    key: jax.Array, state: EnvState, action: jax.Array, time_limit: int
) -> tuple[EnvState, jax.Array, jax.Array]:
    """One transition: returns (next state, extrinsic reward, done). Pure, so it jits and vmaps."""
    moves_right = (action == RIGHT) & (jax.random.uniform(key) < 0.5) & (state.pos < GOAL_STATE)
    pos = jnp.where(moves_right, state.pos + 1, state.pos - 1)  # in s6, "right" moves left
    visited = state.visited_s6 | (pos == GOAL_STATE)
    t = state.t + 1
    done = (pos == TERMINAL) | (t >= time_limit)
    # the reward is paid on reaching s1; an episode cut by the time limit earns nothing
    reward = jnp.where(pos == TERMINAL, jnp.where(visited, 1.0, 0.01), 0.0)
    return EnvState(pos, visited, t), reward, done


def env_auto_reset(state: EnvState, done: jax.Array) -> EnvState:
    """The next episode's start state where `done`, else `state` (no Python branch: it jits)."""
    return jax.tree.map(lambda r, e: jnp.where(done, r, e), env_reset(), state)


def one_hot_state(pos: jax.Array) -> jax.Array:
    """The observation: a one-hot vector of the current state, (6,)."""
    return jax.nn.one_hot(pos, NUM_STATES)


def controller_obs(pos: jax.Array, goal: jax.Array) -> jax.Array:
    """The controller sees state and goal, both one-hot, concatenated: (12,)."""
    return jnp.concatenate([one_hot_state(pos), one_hot_state(goal)])


def transition_matrix() -> np.ndarray:
    """Exact P[a, s, s'] of the environment, (2, 6, 6); the row of terminal s1 is all zeros."""
    p = np.zeros((NUM_ACTIONS, NUM_STATES, NUM_STATES))
    for s in range(1, NUM_STATES):
        p[LEFT, s, s - 1] = 1.0
        if s < GOAL_STATE:
            p[RIGHT, s, s + 1] = p[RIGHT, s, s - 1] = 0.5
        else:
            p[RIGHT, s, s - 1] = 1.0
    return p


def solve_mdp(horizon: int, policy: np.ndarray | None = None) -> float:
    """Expected episode reward from s2 by backward induction over (state, s6 visited, steps left).

    Augmenting the state with "s6 visited" makes the reward Markov. With `policy=None` this is
    value iteration (the optimum); otherwise it evaluates a fixed distribution over actions.
    """
    p = transition_matrix()
    end_reward = np.array([0.01, 1.0])  # indexed by "s6 visited"
    value = np.zeros((NUM_STATES, 2))  # value[s, visited] with `steps_left - 1` steps to go
    for steps_left in range(1, horizon + 1):
        q = np.zeros((NUM_ACTIONS, NUM_STATES, 2))
        for visited in (0, 1):
            for s_next in range(NUM_STATES):
                visited_next = visited | (s_next == GOAL_STATE)
                if s_next == TERMINAL:
                    continuation = end_reward[visited_next]
                elif steps_left == 1:  # cut by the time limit before reaching s1: no reward
                    continuation = 0.0
                else:
                    continuation = value[s_next, visited_next]
                q[:, :, visited] += p[:, :, s_next] * continuation
        value = q.max(0) if policy is None else np.einsum("a,asv->sv", policy, q)
    return float(value[START, 0])


def expected_update_fixed_points(epsilon: float, gamma: float) -> list[tuple[str, float]]:
    """Every memoryless greedy policy that the *expected* flat Q-learning update keeps (exact).

    A flat learner sees only the state, so its data mix the two histories of a state: whether s6
    was visited or not. Under an epsilon-greedy behaviour policy, let w(s) be the share of the time
    in s with s6 visited (from the episode's occupancy of (state, visited)). The reward on reaching
    s1 then averages to Rbar(s) = 0.01 + 0.99 * w(s), and the update's fixed point solves
        Q(s, a) = P(s1 | s, a) * Rbar(s) + gamma * sum_{s' != s1} P(s' | s, a) * max_a' Q(s', a').
    A greedy policy is kept when it is greedy for its own fixed point. All 2^5 policies over
    s2..s6 are checked; returns (policy as "L"/"R" for s2..s6, its episode reward) for each kept.
    No time limit here: episodes end at s1 with probability 1.
    """
    p = transition_matrix()
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
                    step[s, visited, s_next, visited | (s_next == GOAL_STATE)] += moves[s_next]
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


# %% ---------------------------------------------------------------- model and replay
class QNetwork(nnx.Module):
    """One-hidden-layer MLP from an observation to one Q-value per action (or goal)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


class Buffer(NamedTuple):
    """A ring buffer of transitions (obs, action, reward, next_obs, done)."""

    obs: jax.Array  # (capacity, obs_dim)
    action: jax.Array  # (capacity,)
    reward: jax.Array  # (capacity,)
    next_obs: jax.Array  # (capacity, obs_dim)
    done: jax.Array  # (capacity,) 1.0 where the target must not bootstrap
    ptr: jax.Array
    size: jax.Array


def buffer_init(capacity: int, obs_dim: int) -> Buffer:
    zeros = jnp.zeros
    return Buffer(
        zeros((capacity, obs_dim)), zeros(capacity, jnp.int32), zeros(capacity),
        zeros((capacity, obs_dim)), zeros(capacity), jnp.int32(0), jnp.int32(0),
    )  # fmt: skip


def buffer_add(buf: Buffer, obs, action, reward, next_obs, done, valid) -> Buffer:
    """Write one transition if `valid` (a traced bool); otherwise leave the buffer unchanged."""
    capacity = buf.action.shape[0]
    write = lambda arr, x: arr.at[buf.ptr].set(jnp.where(valid, x, arr[buf.ptr]))
    return Buffer(
        write(buf.obs, obs), write(buf.action, action), write(buf.reward, reward),
        write(buf.next_obs, next_obs), write(buf.done, done.astype(jnp.float32)),
        (buf.ptr + valid) % capacity, jnp.minimum(buf.size + valid, capacity),
    )  # fmt: skip


def buffer_sample(key: jax.Array, buf: Buffer, batch_size: int) -> tuple:
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
    return buf.obs[idx], buf.action[idx], buf.reward[idx], buf.next_obs[idx], buf.done[idx]


class Learner(NamedTuple):
    """One DQN: online and target parameters, optimiser state and its own replay buffer."""

    params: nnx.State
    target_params: nnx.State
    opt_state: optax.OptState
    buffer: Buffer
    loss: jax.Array  # TD loss of the last update (0 before the first full batch); host checks it


# %% ---------------------------------------------------------------- loss and update
def make_dqn(cfg: Config, in_dim: int, out_dim: int):
    """Returns (init, q_values, update) for one DQN level, closed over its graph and optimiser."""
    graphdef, _ = nnx.split(QNetwork(in_dim, cfg.hidden, out_dim, nnx.Rngs(0)))
    tx = optax.adam(cfg.learning_rate)

    def q_values(params: nnx.State, obs: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(obs)

    def init(key: jax.Array) -> Learner:
        params = nnx.split(QNetwork(in_dim, cfg.hidden, out_dim, nnx.Rngs(key)))[1]
        buffer = buffer_init(cfg.buffer_size, in_dim)
        return Learner(params, params, tx.init(params), buffer, jnp.float32(0.0))

    def loss_fn(params, target_params, batch) -> jax.Array:
        obs, action, reward, next_obs, done = batch
        q = jnp.take_along_axis(q_values(params, obs), action[:, None], axis=1)[:, 0]
        # Q-learning target from the frozen target network: r + gamma * max_a' Q_target(s', a')
        target = reward + cfg.gamma * (1.0 - done) * q_values(target_params, next_obs).max(-1)
        return optax.huber_loss(q, jax.lax.stop_gradient(target)).mean()

    def update(learner: Learner, key: jax.Array, step: jax.Array) -> tuple[Learner, jax.Array]:
        """One Adam step on a replay minibatch; returns (learner, gradient norm).

        The gradient is taken with respect to the *online* parameters (argument 0 of loss_fn);
        the public reference differentiated the wrong parameters and got zero gradients.
        """
        batch = buffer_sample(key, learner.buffer, cfg.batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(learner.params, learner.target_params, batch)
        updates, opt_state = tx.update(grads, learner.opt_state, learner.params)
        params = optax.apply_updates(learner.params, updates)
        ready = learner.buffer.size >= cfg.batch_size  # no learning before one full batch
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ready, a, b), new, old)
        params, opt_state = pick(params, learner.params), pick(opt_state, learner.opt_state)
        copy = step % cfg.target_period == 0
        target = jax.tree.map(lambda p, t: jnp.where(copy, p, t), params, learner.target_params)
        grad_norm = optax.global_norm(grads) * ready
        return Learner(params, target, opt_state, learner.buffer, loss * ready), grad_norm

    return init, q_values, update


def epsilon_greedy(key: jax.Array, q: jax.Array, epsilon: jax.Array) -> jax.Array:
    explore_key, pick_key = jax.random.split(key)
    random_choice = jax.random.randint(pick_key, (), 0, q.shape[-1])
    return jnp.where(jax.random.uniform(explore_key) < epsilon, random_choice, q.argmax())


def linear_epsilon(progress: jax.Array) -> jax.Array:
    """1 -> EPS_MIN linearly as progress goes 0 -> 1, then flat."""
    return jnp.maximum(EPS_MIN, 1.0 - (1.0 - EPS_MIN) * progress)


# %% ---------------------------------------------------------------- training (one step each)
class EpisodeLog(NamedTuple):
    reward: jax.Array  # (capacity,) extrinsic reward of each finished episode
    visits: jax.Array  # (capacity, 6) steps spent in each state, per finished episode
    count: jax.Array  # episodes finished so far
    current_visits: jax.Array  # (6,) visits in the running episode


def log_step(log: EpisodeLog, pos: jax.Array, reward: jax.Array, done: jax.Array) -> EpisodeLog:
    visits = log.current_visits + one_hot_state(pos).astype(jnp.int32)
    idx = jnp.minimum(log.count, log.reward.shape[0] - 1)
    return EpisodeLog(
        log.reward.at[idx].set(jnp.where(done, reward, log.reward[idx])),
        log.visits.at[idx].set(jnp.where(done, visits, log.visits[idx])),
        log.count + done,
        jnp.where(done, 0, visits),
    )


def log_init(capacity: int) -> EpisodeLog:
    return EpisodeLog(
        jnp.zeros(capacity), jnp.zeros((capacity, NUM_STATES), jnp.int32), jnp.int32(0),
        jnp.zeros(NUM_STATES, jnp.int32),
    )  # fmt: skip


class HdqnCarry(NamedTuple):
    key: jax.Array
    step: jax.Array
    env: EnvState
    goal: jax.Array  # current goal (a state index)
    option_start: jax.Array  # state where the current goal was chosen
    option_reward: jax.Array  # F: extrinsic reward collected since then
    need_goal: jax.Array  # bool: the meta-controller must choose a new goal this step
    goal_reached: jax.Array  # (6,) times each goal was reached, drives epsilon1_g
    meta: Learner
    ctrl: Learner
    log: EpisodeLog


class FlatCarry(NamedTuple):
    key: jax.Array
    step: jax.Array
    env: EnvState
    dqn: Learner
    log: EpisodeLog
    s2_greedy: jax.Array  # (2,) steps in s2 once epsilon is annealed: greedy "left", greedy "right"


def make_hdqn(cfg: Config):
    """Returns (init(key) -> HdqnCarry, step(carry) -> carry) for one seed (PureJaxRL style)."""
    meta_init, meta_q, meta_update = make_dqn(cfg, NUM_STATES, NUM_STATES)
    ctrl_init, ctrl_q, ctrl_update = make_dqn(cfg, 2 * NUM_STATES, NUM_ACTIONS)

    def init(key: jax.Array) -> HdqnCarry:
        key, meta_key, ctrl_key = jax.random.split(key, 3)
        zero = jnp.int32(0)
        return HdqnCarry(
            key, zero, env_reset(), zero, zero, jnp.float32(0.0), jnp.bool_(True),
            jnp.zeros(NUM_STATES, jnp.int32), meta_init(meta_key), ctrl_init(ctrl_key),
            log_init(cfg.num_steps),
        )  # fmt: skip

    def step(c: HdqnCarry) -> HdqnCarry:
        key, goal_key, act_key, env_key, meta_key, ctrl_key = jax.random.split(c.key, 6)
        pos = c.env.pos
        # 1. meta-controller: a new goal at the start of an episode or after an option ends
        eps_meta = linear_epsilon(c.step / (cfg.anneal_frac * cfg.num_steps))
        new_goal = epsilon_greedy(goal_key, meta_q(c.meta.params, one_hot_state(pos)), eps_meta)
        goal = jnp.where(c.need_goal, new_goal, c.goal)
        option_start = jnp.where(c.need_goal, pos, c.option_start)
        option_reward = jnp.where(c.need_goal, 0.0, c.option_reward)
        # 2. controller: one action towards the goal, epsilon1_g annealed per goal
        eps_goal = linear_epsilon(c.goal_reached[goal] / cfg.goal_anneal_reaches)
        action = epsilon_greedy(act_key, ctrl_q(c.ctrl.params, controller_obs(pos, goal)), eps_goal)
        env, reward, done = env_step(env_key, c.env, action, cfg.time_limit)
        # 3. internal critic: intrinsic reward 1 when the goal is reached; that ends the option
        reached = env.pos == goal
        option_end = reached | done
        option_reward = option_reward + reward
        ctrl_buffer = buffer_add(
            c.ctrl.buffer, controller_obs(pos, goal), action, reached.astype(jnp.float32),
            controller_obs(env.pos, goal), option_end, True,
        )  # fmt: skip
        # the meta-controller stores (s, g, F, s') once per option; it bootstraps unless done
        meta_buffer = buffer_add(
            c.meta.buffer, one_hot_state(option_start), goal, option_reward,
            one_hot_state(env.pos), done, option_end,
        )  # fmt: skip
        # 4. one replay update per level per step, each with its own buffer and target network
        ctrl, _ = ctrl_update(c.ctrl._replace(buffer=ctrl_buffer), ctrl_key, c.step)
        meta, _ = meta_update(c.meta._replace(buffer=meta_buffer), meta_key, c.step)
        return HdqnCarry(
            key, c.step + 1, env_auto_reset(env, done),
            goal, option_start, option_reward, option_end,
            c.goal_reached.at[goal].add(reached.astype(jnp.int32)), meta, ctrl,
            log_step(c.log, env.pos, reward, done),
        )  # fmt: skip

    return init, step


def make_flat_dqn(cfg: Config):
    """Returns (init(key) -> FlatCarry, step(carry) -> carry): a plain DQN on the same MDP."""
    dqn_init, dqn_q, dqn_update = make_dqn(cfg, NUM_STATES, NUM_ACTIONS)

    def init(key: jax.Array) -> FlatCarry:
        key, net_key = jax.random.split(key)
        return FlatCarry(
            key, jnp.int32(0), env_reset(), dqn_init(net_key), log_init(cfg.num_steps),
            jnp.zeros(NUM_ACTIONS, jnp.int32),
        )  # fmt: skip

    def step(c: FlatCarry) -> FlatCarry:
        key, act_key, env_key, learn_key = jax.random.split(c.key, 4)
        obs = one_hot_state(c.env.pos)
        epsilon = linear_epsilon(c.step / (cfg.anneal_frac * cfg.num_steps))
        q = dqn_q(c.dqn.params, obs)
        action = epsilon_greedy(act_key, q, epsilon)
        # a diagnostic: how often the greedy action in s2 is "left" once exploration is annealed
        counted = (c.env.pos == START) & (epsilon <= EPS_MIN)
        s2_greedy = c.s2_greedy.at[q.argmax()].add(counted.astype(jnp.int32))
        env, reward, done = env_step(env_key, c.env, action, cfg.time_limit)
        buffer = buffer_add(c.dqn.buffer, obs, action, reward, one_hot_state(env.pos), done, True)
        dqn, _ = dqn_update(c.dqn._replace(buffer=buffer), learn_key, c.step)
        env_next = env_auto_reset(env, done)
        log = log_step(c.log, env.pos, reward, done)
        return FlatCarry(key, c.step + 1, env_next, dqn, log, s2_greedy)

    return init, step


class TabularCarry(NamedTuple):
    key: jax.Array
    step: jax.Array
    env: EnvState
    q: jax.Array  # (6, 2) the Q-table
    step_size: jax.Array  # the constant step size of the Q-learning update
    log: EpisodeLog


def make_tabular_q(cfg: Config):
    """Returns (init(key, step_size), step(carry)): flat tabular Q-learning, the textbook agent.

    It sees the same state as the flat DQN and uses the same epsilon schedule, so it shows what
    the flat DQN is approximating. Its expected update has a fixed point that always goes left
    from s2: the reward on reaching s1 cannot depend on the action taken in s2 (the table does
    not know whether s6 was visited), and "right" only delays it by a discounted step.
    """

    def init(key: jax.Array, step_size: jax.Array) -> TabularCarry:
        q = jnp.zeros((NUM_STATES, NUM_ACTIONS))
        return TabularCarry(key, jnp.int32(0), env_reset(), q, step_size, log_init(cfg.num_steps))

    def step(c: TabularCarry) -> TabularCarry:
        key, act_key, env_key = jax.random.split(c.key, 3)
        epsilon = linear_epsilon(c.step / (cfg.anneal_frac * cfg.num_steps))
        action = epsilon_greedy(act_key, c.q[c.env.pos], epsilon)
        env, reward, done = env_step(env_key, c.env, action, cfg.time_limit)
        target = reward + cfg.gamma * (1.0 - done) * c.q[env.pos].max()
        q = c.q.at[c.env.pos, action].add(c.step_size * (target - c.q[c.env.pos, action]))
        env_next = env_auto_reset(env, done)
        log = log_step(c.log, env.pos, reward, done)
        return TabularCarry(key, c.step + 1, env_next, q, c.step_size, log)

    return init, step


def train_tabular(cfg: Config, step_sizes: tuple[float, ...]) -> tuple[EpisodeLog, np.ndarray]:
    """Tabular Q-learning for every (step size, seed) in one jitted scan; (log, final Q-tables),
    each with axes (step size, seed, ...)."""
    init, step = make_tabular_q(cfg)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2), cfg.num_seeds)

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0))  # over step sizes
    @functools.partial(jax.vmap, in_axes=(0, None))  # over seeds
    def run(key, step_size):
        carry = init(key, step_size)
        return jax.lax.scan(lambda c, _: (step(c), None), carry, None, cfg.num_steps)[0]

    carry = jax.device_get(run(shard_seeds(keys), jnp.asarray(step_sizes)))  # seeds over devices
    real = lambda x: x[:, : cfg.num_seeds]  # drop the seeds that shard_seeds padded
    return jax.tree.map(real, carry.log), real(np.asarray(carry.q))


@functools.lru_cache
def make_train(cfg: Config, agent: str):
    """Returns jitted (init(keys), run_chunk(carry)) for all seeds of "hdqn" or "dqn" (cached)."""
    init, step = make_hdqn(cfg) if agent == "hdqn" else make_flat_dqn(cfg)
    chunk = cfg.num_steps // NUM_CHUNKS
    scan_chunk = lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None, chunk)[0]
    return jax.jit(jax.vmap(init)), jax.jit(jax.vmap(scan_chunk))  # vmap over seeds


def init_carry(cfg: Config, agent: str) -> HdqnCarry | FlatCarry:
    """The initial carry of every seed of one agent, its seed axis split over the local devices
    (padded to a multiple of the device count by repeating the last seed). jit keeps that split:
    each device then runs its own seeds."""
    init, _ = make_train(cfg, agent)
    offset = {"hdqn": 0, "dqn": 1}[agent]
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), offset), cfg.num_seeds)
    return shard_seeds(init(keys))


def train(
    cfg: Config, agent: str, progress: tqdm | None = None, timing: dict | None = None
) -> HdqnCarry | FlatCarry:
    """Trains `cfg.num_seeds` seeds of one agent ("hdqn" or "dqn") at once; returns the final
    carry of every seed (its `log` holds the episodes), on the host. If `timing` is given,
    timing[agent] = (environment steps, seconds) of the chunks after the first (which compiles)."""
    _, run_chunk = make_train(cfg, agent)
    chunk = cfg.num_steps // NUM_CHUNKS
    carry = init_carry(cfg, agent)
    learners = lambda c: (c.meta, c.ctrl) if agent == "hdqn" else (c.dqn,)
    for i in range(NUM_CHUNKS):
        if i == 1:
            timed_from = time.perf_counter()
        carry = run_chunk(carry)
        step = (i + 1) * chunk
        # a diverged learner shows as a non-finite TD loss; checked once per chunk, on the host
        losses = np.stack([np.asarray(lrn.loss)[: cfg.num_seeds] for lrn in learners(carry)])
        if not np.isfinite(losses).all():
            bad = losses[~np.isfinite(losses)][0]
            raise FloatingPointError(
                f"{agent} training diverged at step {step}: loss is {bad}; "
                "try a smaller --learning-rate"
            )
        log = carry.log
        recent = [
            np.asarray(r[max(0, n - LAST_EPISODES) : n])
            for r, n in zip(log.reward[: cfg.num_seeds], np.asarray(log.count)[: cfg.num_seeds])
        ]
        print(
            f"agent={agent} step={step} episodes={int(log.count.min())} "
            f"reward_last{LAST_EPISODES}={np.mean([r.mean() for r in recent]):.4f}"
        )
        if progress is not None:
            progress.update(1)
    if timing is not None:
        timing[agent] = (cfg.num_seeds * (cfg.num_steps - chunk), time.perf_counter() - timed_from)
    return jax.tree.map(lambda x: x[: cfg.num_seeds], jax.device_get(carry))


# %% ---------------------------------------------------------------- evaluation
def flat_dqn_diagnostics(cfg: Config, carry: FlatCarry) -> dict[str, np.ndarray]:
    """Per seed, why the flat DQN keeps going right: its final Q(s2, .), how its replay data
    reward the two ways out of s2, and how often its greedy action in s2 was "left"."""
    q_values = make_dqn(cfg, NUM_STATES, NUM_ACTIONS)[1]
    q_s2 = np.asarray(jax.vmap(q_values, in_axes=(0, None))(carry.dqn.params, one_hot_state(START)))
    buf = carry.dqn.buffer  # the last `buffer_size` transitions of each seed
    stored = np.arange(cfg.buffer_size) < buf.size[:, None]
    from_s2 = stored & (buf.obs.argmax(-1) == START)
    into_s1 = buf.next_obs.argmax(-1) == TERMINAL
    share_of_1 = np.stack(
        [
            ((buf.reward == 1.0) & from_s2 & into_s1 & (buf.action == a)).sum(1)
            / np.maximum((from_s2 & into_s1 & (buf.action == a)).sum(1), 1)
            for a in (LEFT, RIGHT)
        ],
        axis=1,
    )  # (seeds, action): share of the ends in s1 that paid 1 (s6 had been visited)
    greedy_left = carry.s2_greedy[:, LEFT] / np.maximum(carry.s2_greedy.sum(1), 1)
    return {"q_s2": q_s2, "replay_share_of_1": share_of_1, "greedy_left_share": greedy_left}


def last_episodes_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per seed: the mean of `values` (reward or visits) over its last 1000 finished episodes, or
    over all of them in a short run (validate ensures every seed finishes at least one)."""
    return np.stack([v[max(0, n - LAST_EPISODES) : n].mean(0) for v, n in zip(values, counts)])


def per_bin(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Averages per 1000 episodes, over the bins all seeds finished: (seeds, bins, ...)."""
    bins = int(counts.min()) // LAST_EPISODES
    shape = (values.shape[0], bins, LAST_EPISODES) + values.shape[2:]
    return values[:, : bins * LAST_EPISODES].reshape(shape).mean(2)


# %% ---------------------------------------------------------------- figures
def plot_reward(logs: dict[str, EpisodeLog], optimum: float, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for agent, color in (("hdqn", "tab:blue"), ("dqn", "tab:red")):
        curves = per_bin(logs[agent].reward, logs[agent].count)  # (seeds, bins)
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        label = {"hdqn": "h-DQN", "dqn": "flat DQN"}[agent]
        ax.plot(x, mean, color=color, label=f"{label} (mean of {len(curves)} seeds)")
        ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.2)
    ax.axhline(optimum, color="k", ls="--", label=f"optimum {optimum:.3f}")
    ax.axhline(PAPER_HDQN_REWARD, color="tab:blue", ls=":", label="paper h-DQN (0.13)")
    ax.axhline(PAPER_FLAT_REWARD, color="tab:red", ls=":", label="paper flat Q-learning (0.01)")
    ax.set(xlabel="episodes (thousands)", ylabel="average extrinsic reward per 1000 episodes")
    ax.set_title("6-state stochastic MDP: h-DQN vs flat DQN (band: min-max over seeds)")
    ax.set_ylim(0, 0.25)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_visits(logs: dict[str, EpisodeLog], path: pathlib.Path) -> None:
    """Paper Fig. 4: average visits to s3..s6 per episode, per 1000 episodes."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    for agent, color in (("hdqn", "tab:blue"), ("dqn", "tab:red")):
        visits = per_bin(logs[agent].visits.astype(float), logs[agent].count)  # (seeds, bins, 6)
        x = np.arange(1, visits.shape[1] + 1)
        for state, ax in zip(range(2, NUM_STATES), axes):
            label = {"hdqn": "h-DQN", "dqn": "flat DQN"}[agent]
            ax.plot(x, visits[:, :, state].mean(0), color=color, label=label)
            ax.fill_between(
                x, visits[:, :, state].min(0), visits[:, :, state].max(0), color=color, alpha=0.2
            )
            ax.set(title=f"visits to s{state + 1}", xlabel="episodes (thousands)")
    axes[0].set_ylabel("visits per episode")
    axes[0].legend()
    fig.suptitle("Visits to s3..s6 per episode (mean and min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_flat_learners(tab_rewards, step_sizes, hdqn_reward, dqn_reward, optimum, right, path):
    """Flat tabular Q-learning's final reward against its step size, one dot per seed."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, lr in enumerate(step_sizes):
        ax.scatter(np.full(tab_rewards.shape[1], lr), tab_rewards[i], color="tab:gray", s=14)
    ax.plot(step_sizes, tab_rewards.mean(1), "o-", color="k", label="flat tabular Q-learning")
    ax.axhline(hdqn_reward, color="tab:blue", label=f"h-DQN ({hdqn_reward:.3f})")
    ax.axhline(dqn_reward, color="tab:red", label=f"flat DQN ({dqn_reward:.3f})")
    ax.axhline(optimum, color="k", ls="--", label=f"optimum {optimum:.3f}")
    ax.axhline(right, color="tab:gray", ls="-.", label=f'memoryless "always right" ({right:.3f})')
    ax.axhline(PAPER_FLAT_REWARD, color="tab:red", ls=":", label="paper flat Q-learning (0.01)")
    ax.set(xscale="log", xlabel="step size of the tabular Q-learning update", ylim=(0, 0.25))
    ax.set(ylabel="average reward, last 1000 episodes")
    ax.set_title("A flat learner lands in one of two regimes (dots: seeds)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# %% ---------------------------------------------------------------- main
INTEGER_OPTIONS = (
    "seed", "num_seeds", "num_steps", "time_limit", "hidden", "batch_size", "buffer_size",
    "target_period", "goal_anneal_reaches",
)  # fmt: skip


def validate(cfg: Config) -> None:
    """Every option finite and in range, and the rules between options; no model or compile work."""
    for name in INTEGER_OPTIONS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise option_error(name, value, "must be an integer")
    if not 0 <= cfg.seed < 2**32:
        raise option_error("seed", cfg.seed, "must be an integer >= 0 and < 2**32")
    for name in INTEGER_OPTIONS[1:]:
        check_number(cfg, name, 1)
    if cfg.num_steps % NUM_CHUNKS:
        raise option_error(
            "num_steps", cfg.num_steps, f"must be a multiple of {NUM_CHUNKS} (it runs in chunks)"
        )
    check_number(cfg, "gamma", 0.0, 1.0, low_open=True)
    check_number(cfg, "learning_rate", 0.0, 1.0, low_open=True)
    check_number(cfg, "anneal_frac", 0.0, 1.0, low_open=True)
    sizes = cfg.tabular_step_sizes
    if not sizes or not all(isinstance(x, int | float) and 0 < x <= 1 for x in sizes):
        shown = ",".join(str(x) for x in sizes) or "(none)"
        raise option_error(
            "tabular_step_sizes", shown, "must be one or more finite numbers > 0 and <= 1"
        )  # NaN fails 0 < x, inf fails x <= 1
    if cfg.buffer_size < cfg.batch_size:
        raise option_error(
            "buffer_size", cfg.buffer_size,
            f"must be >= --batch-size {cfg.batch_size}: learning waits for one full batch in "
            "the buffer, so no gradient step could ever happen",
        )  # fmt: skip
    if cfg.target_period >= cfg.num_steps:
        raise option_error(
            "target_period", cfg.target_period,
            f"must be < --num-steps {cfg.num_steps}, or the target network never updates",
        )  # fmt: skip
    if cfg.time_limit > cfg.num_steps:
        raise option_error(
            "time_limit", cfg.time_limit,
            f"must be <= --num-steps {cfg.num_steps}, so that every seed finishes an episode",
        )  # fmt: skip
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    validate(cfg)
    start = time.time()
    optimum = solve_mdp(cfg.time_limit)  # value iteration on (state, s6 visited, steps left)
    always_right = solve_mdp(cfg.time_limit, policy=np.array([0.0, 1.0]))  # needs no memory
    timing = {}  # agent -> (environment steps, seconds) of the compiled training loop
    with tqdm(total=2 * NUM_CHUNKS, desc="h-DQN and flat DQN chunks", disable=None) as progress:
        final = {agent: train(cfg, agent, progress, timing) for agent in ("hdqn", "dqn")}
    logs = {agent: carry.log for agent, carry in final.items()}
    fewest = min(int(log.count.min()) for log in logs.values())
    if fewest < LAST_EPISODES:
        print(f"note: a seed finished only {fewest} episodes; its averages use all of them")
    hdqn, dqn = (last_episodes_mean(logs[a].reward, logs[a].count) for a in ("hdqn", "dqn"))
    diag = flat_dqn_diagnostics(cfg, final["dqn"])
    # exact: which memoryless greedy policies the expected flat update keeps at epsilon 0.1
    fixed_points = expected_update_fixed_points(EPS_MIN, cfg.gamma)
    # The diagnostic: flat tabular Q-learning at several step sizes, every seed (3 s)
    tab_log, tab_q = train_tabular(cfg, cfg.tabular_step_sizes)
    tab = np.stack([last_episodes_mean(r, n) for r, n in zip(tab_log.reward, tab_log.count)])
    goes_left = (tab_q[:, :, START, LEFT] > tab_q[:, :, START, RIGHT]).mean(1)  # share of seeds
    s6_visits = lambda log: last_episodes_mean(log.visits, log.count)[:, GOAL_STATE].mean()
    # The flat DQN earns at least 0.01 per episode unless every episode is cut by the time limit;
    # the floor keeps the ratio finite (strict JSON) in that degenerate case.
    hdqn_over_dqn = float(hdqn.mean() / max(dqn.mean(), 1e-6))
    metrics = {
        "task": "hdqn",
        "seed": cfg.seed,
        "preset": getattr(cfg, "preset", "cpu"),
        "num_seeds": cfg.num_seeds,
        "hdqn_reward": float(hdqn.mean()),
        "hdqn_reward_std": float(hdqn.std()),
        "hdqn_reward_per_seed": " ".join(f"{r:.4f}" for r in hdqn),
        "hdqn_reward_target": PAPER_HDQN_REWARD,
        "hdqn_reward_paper": PAPER_HDQN_REWARD,
        "dqn_reward": float(dqn.mean()),
        "dqn_reward_std": float(dqn.std()),
        "dqn_reward_per_seed": " ".join(f"{r:.4f}" for r in dqn),
        "dqn_reward_paper": PAPER_FLAT_REWARD,
        "hdqn_over_dqn": hdqn_over_dqn,
        "hdqn_over_dqn_target": HDQN_OVER_DQN_TARGET,
        "optimal_reward": optimum,
        "always_right_reward": always_right,
        "hdqn_s6_visits_per_episode": float(s6_visits(logs["hdqn"])),
        "dqn_s6_visits_per_episode": float(s6_visits(logs["dqn"])),
        "dqn_q_s2_left": float(diag["q_s2"][:, LEFT].mean()),
        "dqn_q_s2_right": float(diag["q_s2"][:, RIGHT].mean()),
        "dqn_s2_greedy_left_share": float(diag["greedy_left_share"].mean()),
        "dqn_replay_s2_left_paid_1": float(diag["replay_share_of_1"][:, LEFT].mean()),
        "dqn_replay_s2_right_paid_1": float(diag["replay_share_of_1"][:, RIGHT].mean()),
        "flat_expected_update_fixed_points": " ".join(f"{p}:{r:.4f}" for p, r in fixed_points),
        "hdqn_episodes": int(logs["hdqn"].count.min()),
        "dqn_episodes": int(logs["dqn"].count.min()),
        "tabular_step_sizes": " ".join(f"{lr:g}" for lr in cfg.tabular_step_sizes),
        "tabular_q_reward_by_step_size": " ".join(f"{r:.4f}" for r in tab.mean(1)),
        "tabular_q_share_greedy_left_in_s2": " ".join(f"{g:.1f}" for g in goes_left),
        "num_steps": cfg.num_steps,
        **device_info(),
        # environment steps per second of both agents' compiled loops (first chunk, which
        # compiles, left out); padded seeds are not counted
        "throughput": sum(n for n, _ in timing.values()) / sum(t for _, t in timing.values()),
        "throughput_unit": "env-steps/s",
    }
    with staged_run(cfg.out_dir) as out:
        plot_reward(logs, optimum, out / "reward.png")
        plot_visits(logs, out / "visits.png")
        plot_flat_learners(
            tab, cfg.tabular_step_sizes, hdqn.mean(), dqn.mean(), optimum, always_right,
            out / "flat_learners.png",
        )  # fmt: skip
        metrics["wall_time_s"] = time.time() - start
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        )
        write_metrics(out, cfg, metrics)
    return metrics


if __name__ == "__main__":
    run_cli()
