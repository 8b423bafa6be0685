"""Bootstrapped Meta-Gradients (BMG) vs meta-gradients (MG) vs fixed entropy, in a changing world.

The idea (Flennerhag, Schroecker, Zahavy, van Hasselt, Silver, Singh, ICLR 2022, "Bootstrapped
Meta-Learning"): a meta-learner with parameters w sets a hyperparameter of an agent, here the
entropy-regularisation weight eps of an A2C agent. The agent takes K SGD steps

    theta_{k+1} = theta_k - alpha * grad_theta L_A2C(theta_k; eps_k),   eps_k = f_w(reward stats),
    L_A2C = -mean(log pi(a|s) * A) + 0.5 * mean(A^2) - eps * mean(H(pi(.|s))),

so theta_K is a differentiable function of w. The two meta-learners differ only in what they ask
of theta_K:

- MG (Xu et al. 2018): minimise the policy-gradient loss of theta_K on the next rollout,
  dL_pg(theta_K)/dw. It only sees one step past the K-step horizon, so it is myopic: entropy
  does not lower the immediate policy-gradient loss, so MG has no reason to keep exploring.
- BMG: bootstrap a target from theta_K by L - 1 more steps of the agent's own update rule and a
  last plain policy-gradient step (no entropy), theta~ = theta_{K+L-1} - alpha grad L_pg, then
  stop its gradient and pull theta_K towards it in policy space (Eq. 3 of the paper):

      L_BMG(w) = KL( pi_{stop_grad(theta~)} || pi_{theta_K(w)} )   on the target rollout's states.

  The target sees L steps further, so the meta-learner can trade a worse immediate objective for
  faster learning: after the colours swap, raising eps lets the agent unlearn its old habit.

The task is the paper's non-stationary "two colours" grid world: a 5x5 grid without episodes, the
agent, one blue and one red object. Stepping on an object collects it (+1 for one colour, -1 for
the other) and it reappears on a random free cell; every other step costs 0.04. Every
`swap_every` steps the colours' rewards swap, and nothing in the observation (one-hot positions of
agent, blue and red) says so: the agent must notice from its rewards and relearn. The meta-learner
is an MLP from the mean reward of the last 10 rollouts to eps in (0, 1), as in the paper.

Everything (environment, rollouts, inner updates, meta-updates) is pure JAX: each arm's training
is one jitted `lax.scan` per chunk, vmapped over seeds (PureJaxRL style).

    python tasks/bmg.py
    python tasks/bmg.py --help

Expected at defaults (5 seeds per arm; 4 fixed-eps baselines, MG, BMG and BMG with L = 1):
about 160 s of CPU time (user + sys, compilation included), so about 2 minutes on an idle
2-core CPU. Outputs in runs/bmg/: metrics.json, cumulative_reward.png, reward_around_swap.png,
epsilon.png.

Measured at defaults (mean +- sample std of the cumulative reward over 5 seeds): best fixed eps
(0.05) 7232 +- 3431, MG -504 +- 6426, BMG -4193 +- 5092, BMG with L = 1 -2845 +- 9279 (fixed
eps 0: -17941, 0.01: -9700, 0.2: -457). Paired over seeds, BMG - MG is -3689 +- 9156 (BMG ahead
on 3 of 5 seeds) and BMG - best fixed -11426 +- 3962 (0 of 5). The issue's bar (BMG above MG and
above the best fixed eps) is NOT met at this scale. What we measured, and why:
- Only the blue phases are learned. In the phases where red pays +1 every arm earns about
  -0.04 per step, the bare step cost: it collects nothing. Our reading: the agent first learns
  "go to blue, avoid red", the swap teaches it to avoid blue too, and with little entropy it
  does not find red again.
  Fixed eps 0.05, mean reward per step in the 8 phases: -0.003, -0.040, 0.092, -0.040, 0.067,
  -0.041, 0.127, -0.041. More exploration does learn red, late: with fixed eps 0.2 the last
  quarter of the last two red phases earns +0.04 per step, but its later blue phases average
  0.02 to 0.04 (eps 0.05: 0.07 to 0.13). A swap-aware eps could win this trade-off; that is
  what BMG is claimed to learn.
- BMG's eps goes the other way: about 0.19 while the agent exploits, 0.17 just after each swap
  (epsilon.png). Part of the drift comes from the bootstrap itself: the target's L - 1 steps use
  the meta-learner's own eps, so the target lies further along the entropy gradient than
  theta_K, and matching pulls eps up. Mean eps grows with L (BMG arm alone, 5 seeds): L = 1
  0.10, L = 4 0.18, L = 9 0.18, L = 16 0.21; with eps = 0 in the target's L - 1 steps the
  learned eps stays near 0.13.
- The seed spread hides the arms' differences. A seed's outcome is chaotic: same seeds, same
  config, fixed eps 0.1 gives 7637 +- 2482 when run alone and 2729 when vmapped next to three
  other eps values (only floating-point rounding differs). With the meta-learner frozen (meta
  learning rate 1e-9, eps about 0.10 throughout), the MG arm scores -1024 +- 9274 and the BMG
  arm 7714 +- 8752: the gap between arms that set eps identically exceeds every gap above.
Other settings tried, same 5 seeds (mean +- std of cumulative reward):
- hidden 64, 480k steps: best fixed (0.2) 5201 +- 4355, MG 12182 +- 6303, BMG 3730 +- 8492,
  BMG L = 1 14934 +- 6045 (about 200 s of CPU time). BMG is again the last meta arm.
- hidden 256 (the public reproductions' width), 240k steps: every arm learns faster; best fixed
  (0.05) 8337 +- 4595, MG 3048 +- 8117, BMG 5728 +- 1693, BMG L = 1 4518 +- 7684, BMG's eps
  0.18 before and 0.14 after swaps (670 s of CPU time: too slow for the default).
- the paper's swap period, 100k steps (500k steps, 5 phases): best fixed (0.2) 14847 +- 8322,
  MG 12464 +- 20522, BMG 8008 +- 14629, BMG L = 1 20723 +- 12883; BMG's eps 0.18 before and 0.16
  after swaps (`--total-steps 500000 --swap-every 100000`, 120 s on an idle 2-core CPU).
- the paper's meta learning rate 1e-4, 480k steps: eps barely moves from 0.1 in any arm;
  MG 4723 +- 6498, BMG -2188 +- 10929, BMG L = 1 4911 +- 5911.
- MG's meta-objective as in the public reproduction MagiFeeney/Bootstrapped-Meta-Learning (the
  mean over the K steps of L_pg - 0.12 H), 240k steps: MG -4128 +- 2329 (plain L_pg of
  theta_K: -2323 +- 2583), its eps rising from 0.17 to 0.20 after swaps.
The paper trains 13x longer, with 100k steps per phase, where the agent can learn both colours
and the bootstrap's benefit after a swap has room to show.

Differences from the paper (chosen so that a run fits in minutes on 2 CPU cores):
- 480k environment steps with a swap every 60k (paper: 6.4M steps, swaps every 100k).
- K = 7 and L = 9 as in the paper, but meta learning rate 1e-3 (paper 1e-4), since there are
  about 13x fewer meta-updates.
- The agent is two 2-layer MLPs of width 32 (actor and critic; the public reproductions use
  256, `--hidden 256`); the observation is one-hot row and column of agent, blue and red, as in
  the public reproductions.
- MG's meta-objective is the plain policy-gradient loss of theta_K on its next rollout, the same
  objective as BMG's last target step, so the two differ only in the bootstrap (a public
  reproduction averages L_pg - 0.12 H over the inner steps; measured above, it does worse).
- Every rollout gives one real agent update: BMG continues from theta_{K+L-1}, so its target
  rollouts are also the agent's experience. All arms see the same number of environment steps
  and, per seed, start from the same agent and grid.
"""

# %%
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from tqdm import tqdm

GRID = 5
N_CELLS = GRID * GRID
N_ACTIONS = 4  # up, down, left, right
OBS_DIM = 3 * 2 * GRID  # one-hot row and column of agent, blue, red
STEP_COST = -0.04
GAMMA = 0.99
STATS_LEN = 10  # the meta-learner sees the mean reward of the last 10 rollouts (as the paper)
META_HIDDEN = 32
EPS_INIT = 0.1  # the meta-learners start from eps = 0.1 (sigmoid of the output bias)
CHUNKS = 10  # host round-trips per arm: one progress-bar tick and one log line each


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


# %% ---------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    seed: int = 0
    """Base random seed; seed i of `num_seeds` uses seed + i."""
    out_dir: str = "runs/bmg"
    """Folder for metrics.json and the figures."""
    total_steps: int = 480_000
    """Environment steps per seed and arm (paper: 6.4M)."""
    swap_every: int = 60_000
    """Environment steps between swaps of the colours' rewards (paper: 100k)."""
    num_seeds: int = 5
    """Independent seeds per arm, vmapped."""
    rollout_len: int = 16
    """Steps per A2C rollout; one SGD step per rollout (n-step returns, as the paper)."""
    lr: float = 0.1
    """Agent's SGD learning rate alpha (paper: 0.1)."""
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-learner (paper: 1e-4 over 13x more steps)."""
    k_inner: int = 7
    """K: agent steps differentiated through per meta-update (paper: 7)."""
    l_target: int = 9
    """L: BMG's bootstrap horizon, L - 1 agent steps plus one policy-gradient step (paper: 9)."""
    hidden: int = 32
    """Width of the actor's and the critic's two hidden layers (public reproductions: 256)."""
    fixed_epsilons: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2)
    """Entropy weights of the fixed-eps A2C baselines; the best one is reported."""


# %% ---------------------------------------------------------------- environment
class EnvState(NamedTuple):
    agent: jax.Array  # () int cell index in [0, 25)
    blue: jax.Array  # () int
    red: jax.Array  # () int
    blue_reward: jax.Array  # () float, +1 or -1; red pays the opposite
    t: jax.Array  # () int, steps taken so far


def observe(state: EnvState) -> jax.Array:
    """(30,) one-hot row and column of agent, blue and red (as the public reproductions)."""
    cells = jnp.stack([state.agent, state.blue, state.red])
    coords = jnp.stack([cells // GRID, cells % GRID], axis=1)  # (3, 2)
    return jax.nn.one_hot(coords, GRID).reshape(-1)


def free_cell(u: jax.Array, taken_a: jax.Array, taken_b: jax.Array) -> jax.Array:
    """The k-th of the 23 cells other than two distinct taken ones, k = floor(23 u), u ~ U[0, 1):
    a uniform free cell from one uniform number (cheaper than a categorical over 25 cells)."""
    low, high = jnp.minimum(taken_a, taken_b), jnp.maximum(taken_a, taken_b)
    cell = jnp.minimum((u * (N_CELLS - 2)).astype(jnp.int32), N_CELLS - 3)
    cell = cell + (cell >= low)
    return cell + (cell >= high)


def env_reset(key: jax.Array) -> EnvState:
    """Agent, blue and red on three distinct random cells; blue pays +1 first."""
    k_agent, k_blue, k_red = jax.random.split(key, 3)
    agent = jax.random.randint(k_agent, (), 0, N_CELLS)
    blue = (agent + jax.random.randint(k_blue, (), 1, N_CELLS)) % N_CELLS  # any other cell
    red = free_cell(jax.random.uniform(k_red), agent, blue)
    return EnvState(agent, blue, red, jnp.float32(1.0), jnp.int32(0))


def env_step(
    state: EnvState, action: jax.Array, u: jax.Array, swap_every: int
) -> tuple[EnvState, jax.Array]:
    """Move (walls block), collect an object if the agent lands on it, respawn it on a uniform
    free cell (u ~ U[0, 1) picks it), and swap the colours' rewards every swap_every steps."""
    row, col = state.agent // GRID, state.agent % GRID
    d_row = jnp.array([-1, 1, 0, 0])[action]
    d_col = jnp.array([0, 0, -1, 1])[action]
    agent = jnp.clip(row + d_row, 0, GRID - 1) * GRID + jnp.clip(col + d_col, 0, GRID - 1)
    hit_blue, hit_red = agent == state.blue, agent == state.red
    reward = jnp.where(
        hit_blue, state.blue_reward, jnp.where(hit_red, -state.blue_reward, STEP_COST)
    )
    blue = jnp.where(hit_blue, free_cell(u, agent, state.red), state.blue)
    red = jnp.where(hit_red, free_cell(u, agent, state.blue), state.red)
    t = state.t + 1
    blue_reward = jnp.where(t % swap_every == 0, -state.blue_reward, state.blue_reward)
    return EnvState(agent, blue, red, blue_reward, t), reward


# %% ---------------------------------------------------------------- agent and meta-learner
# Meta-gradients differentiate through SGD steps theta' = theta - alpha grad L(theta), so the
# networks are plain pytrees of arrays with pure apply functions rather than Flax NNX modules:
# every inner step is then a one-line tree_map that jax.grad can see through.
def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict]:
    """LeCun-normal weights, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / math.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def apply_mlp(layers: list[dict], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def init_agent(key: jax.Array, hidden: int) -> dict:
    """Separate actor and critic MLPs, as the paper's A2C."""
    k_pi, k_v = jax.random.split(key)
    actor = init_mlp(k_pi, [OBS_DIM, hidden, hidden, N_ACTIONS])
    actor[-1]["w"] = actor[-1]["w"] * 0.01  # near-uniform initial policy
    return {"actor": actor, "critic": init_mlp(k_v, [OBS_DIM, hidden, hidden, 1])}


def policy_logits(params: dict, obs: jax.Array) -> jax.Array:
    return apply_mlp(params["actor"], obs)


def value(params: dict, obs: jax.Array) -> jax.Array:
    return apply_mlp(params["critic"], obs)[..., 0]


def init_meta(key: jax.Array) -> list[dict]:
    layers = init_mlp(key, [STATS_LEN, META_HIDDEN, 1])
    layers[-1]["b"] = jnp.full(1, math.log(EPS_INIT / (1 - EPS_INIT)))  # eps starts at EPS_INIT
    return layers


def meta_epsilon(meta_params: list[dict], reward_stats: jax.Array) -> jax.Array:
    """eps = sigmoid(MLP(mean reward of the last 10 rollouts)), a scalar in (0, 1)."""
    return jax.nn.sigmoid(apply_mlp(meta_params, reward_stats)[0])


# %% ---------------------------------------------------------------- rollouts and losses
class Rollout(NamedTuple):
    obs: jax.Array  # (T, 30)
    actions: jax.Array  # (T,)
    rewards: jax.Array  # (T,)
    last_obs: jax.Array  # (30,) the state after the last step, for the bootstrap value


def collect_rollout(
    params: dict, env_state: EnvState, key: jax.Array, cfg: Config
) -> tuple[Rollout, EnvState]:
    """Act for rollout_len steps. Acting is data collection: no gradient flows into it."""
    params = jax.lax.stop_gradient(params)
    # All the rollout's randomness in one call: Gumbel noise for actions, uniforms for respawns.
    k_act, k_env = jax.random.split(key)
    gumbels = jax.random.gumbel(k_act, (cfg.rollout_len, N_ACTIONS))
    uniforms = jax.random.uniform(k_env, (cfg.rollout_len,))

    def step(state, noise):
        gumbel, u = noise
        obs = observe(state)
        action = jnp.argmax(policy_logits(params, obs) + gumbel)  # Gumbel-max: a ~ pi(.|s)
        state, reward = env_step(state, action, u, cfg.swap_every)
        return state, (obs, action, reward)

    env_state, (obs, actions, rewards) = jax.lax.scan(step, env_state, (gumbels, uniforms))
    return Rollout(obs, actions, rewards, observe(env_state)), env_state


def nstep_returns(rewards: jax.Array, bootstrap: jax.Array) -> jax.Array:
    """G_t = r_t + gamma G_{t+1}, G_T = V(s_T): the n-step A2C return, by a reverse scan."""

    def back(g, r):
        g = r + GAMMA * g
        return g, g

    return jax.lax.scan(back, bootstrap, rewards, reverse=True)[1]


def a2c_losses(params: dict, ro: Rollout) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(policy-gradient loss, value loss, mean entropy) on one rollout."""
    logits = policy_logits(params, ro.obs)  # (T, 4)
    values = value(params, ro.obs)  # (T,)
    returns = jax.lax.stop_gradient(nstep_returns(ro.rewards, value(params, ro.last_obs)))
    advantage = returns - values
    log_pi = jax.nn.log_softmax(logits)
    log_pi_a = jnp.take_along_axis(log_pi, ro.actions[:, None], axis=1)[:, 0]
    pg_loss = -jnp.mean(log_pi_a * jax.lax.stop_gradient(advantage))
    value_loss = 0.5 * jnp.mean(advantage**2)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1))
    return pg_loss, value_loss, entropy


def a2c_loss(params: dict, ro: Rollout, epsilon: jax.Array) -> jax.Array:
    """The agent's objective L_A2C(theta; eps): its gradient is the inner update."""
    pg_loss, value_loss, entropy = a2c_losses(params, ro)
    return pg_loss + value_loss - epsilon * entropy


def pg_loss_only(params: dict, ro: Rollout) -> jax.Array:
    return a2c_losses(params, ro)[0]


def sgd(params: dict, grads: dict, lr: float) -> dict:
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def bmg_target(params: dict, ro: Rollout, lr: float) -> dict:
    """theta~ = theta - alpha grad L_pg(theta): the last, entropy-free step; held constant."""
    return jax.lax.stop_gradient(sgd(params, jax.grad(pg_loss_only)(params, ro), lr))


def kl_matching(target_params: dict, params: dict, obs: jax.Array) -> jax.Array:
    """mean_s KL(pi_target(.|s) || pi_theta(.|s)): BMG's matching function mu (Eq. 3)."""
    log_p = jax.nn.log_softmax(policy_logits(target_params, obs))
    log_q = jax.nn.log_softmax(policy_logits(params, obs))
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


# %% ---------------------------------------------------------------- inner loop and meta-losses
class Inner(NamedTuple):
    params: dict  # agent's theta
    rollout: Rollout  # collected with the current theta, to be used for its next update
    env_state: EnvState
    reward_stats: jax.Array  # (10,) mean reward of the last 10 rollouts


def push_stats(stats: jax.Array, ro: Rollout) -> jax.Array:
    return jnp.concatenate([stats[1:], jnp.mean(ro.rewards)[None]])


def agent_steps(
    eps_fn: Callable[[jax.Array], jax.Array], inner: Inner, keys: jax.Array, cfg: Config
) -> tuple[Inner, tuple[jax.Array, jax.Array]]:
    """len(keys) agent updates, each on the pending rollout followed by a fresh rollout with the
    new theta. eps_fn maps the reward statistics to eps; gradients flow from it into theta.
    Logs (eps, summed reward) per rollout."""

    def step(inner: Inner, key):
        eps = eps_fn(inner.reward_stats)
        grads = jax.grad(a2c_loss)(inner.params, inner.rollout, eps)
        params = sgd(inner.params, grads, cfg.lr)
        ro, env_state = collect_rollout(params, inner.env_state, key, cfg)
        new = Inner(params, ro, env_state, push_stats(inner.reward_stats, ro))
        return new, (eps, jnp.sum(ro.rewards))

    return jax.lax.scan(step, inner, keys)


def learned_eps(meta_params: list[dict]) -> Callable[[jax.Array], jax.Array]:
    return lambda stats: meta_epsilon(meta_params, stats)


def mg_meta_loss(meta_params: list[dict], inner: Inner, keys: jax.Array, cfg: Config):
    """MG: K differentiable steps, then the policy-gradient loss of theta_K on the rollout that
    theta_K itself collected."""
    inner, logs = agent_steps(learned_eps(meta_params), inner, keys, cfg)
    return pg_loss_only(inner.params, inner.rollout), (inner, logs)


def bmg_meta_loss(
    meta_params: list[dict], inner: Inner, keys_k: jax.Array, keys_l: jax.Array, cfg: Config
):
    """BMG: K differentiable steps to theta_K; L - 1 more steps (no gradient) and one
    policy-gradient step give the target theta~; loss KL(pi_theta~ || pi_theta_K)."""
    inner_k, logs_k = agent_steps(learned_eps(meta_params), inner, keys_k, cfg)
    frozen_meta = jax.lax.stop_gradient(meta_params)
    inner_t, logs_t = agent_steps(
        learned_eps(frozen_meta), jax.lax.stop_gradient(inner_k), keys_l, cfg
    )
    target = bmg_target(inner_t.params, inner_t.rollout, cfg.lr)
    loss = kl_matching(target, inner_k.params, inner_t.rollout.obs)
    logs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), logs_k, logs_t)
    return loss, (inner_t, logs)  # the agent continues from theta_{K+L-1}


# %% ---------------------------------------------------------------- one seed's training
ARMS = ("fixed", "mg", "bmg", "bmg_l1")


def steps_per_cycle(arm: str, cfg: Config) -> int:
    """Agent updates (= rollouts) per meta-update."""
    k, l_target = cfg.k_inner, cfg.l_target
    return {"fixed": 1, "mg": k, "bmg": k + l_target - 1, "bmg_l1": k}[arm]


class Carry(NamedTuple):
    inner: Inner
    meta_params: list[dict]
    meta_opt_state: optax.OptState
    key: jax.Array


def init_carry(key: jax.Array, cfg: Config, optimizer) -> Carry:
    k_env, k_agent, k_meta, k_ro, key = jax.random.split(key, 5)
    params = init_agent(k_agent, cfg.hidden)
    ro, env_state = collect_rollout(params, env_reset(k_env), k_ro, cfg)
    meta_params = init_meta(k_meta)
    stats = jnp.zeros(STATS_LEN).at[-1].set(jnp.mean(ro.rewards))
    return Carry(Inner(params, ro, env_state, stats), meta_params, optimizer.init(meta_params), key)


def make_cycle(arm: str, cfg: Config, optimizer):
    """One cycle = steps_per_cycle agent updates and, for the meta arms, one meta-update."""
    n_steps = steps_per_cycle(arm, cfg)

    def cycle(carry: Carry, fixed_eps: jax.Array):
        key, sub = jax.random.split(carry.key)
        keys = jax.random.split(sub, n_steps)
        if arm == "fixed":
            inner, logs = agent_steps(lambda stats: fixed_eps, carry.inner, keys, cfg)
            return carry._replace(inner=inner, key=key), logs
        if arm == "mg":
            loss_fn = lambda m: mg_meta_loss(m, carry.inner, keys, cfg)  # noqa: E731
        else:  # bmg, bmg_l1: the first K keys for theta_K, the rest for the target's L - 1 steps
            k = cfg.k_inner
            loss_fn = lambda m: bmg_meta_loss(m, carry.inner, keys[:k], keys[k:], cfg)  # noqa: E731
        grads, (inner, logs) = jax.grad(loss_fn, has_aux=True)(carry.meta_params)
        updates, opt_state = optimizer.update(grads, carry.meta_opt_state, carry.meta_params)
        meta_params = optax.apply_updates(carry.meta_params, updates)
        return Carry(inner, meta_params, opt_state, key), logs

    return cycle


def initial_carries(cfg: Config) -> Carry:
    """One carry per seed. Every arm starts from the same agent, meta-learner and grid for a
    given seed (common random numbers), so the arms differ only in how eps is set."""
    optimizer = optax.adam(cfg.meta_lr)
    keys = jax.vmap(jax.random.key)(jnp.arange(cfg.num_seeds) + cfg.seed)
    return jax.jit(jax.vmap(lambda k: init_carry(k, cfg, optimizer)))(keys)


def train_arm(arm: str, cfg: Config, carry0: Carry, epsilons: jax.Array, bar: tqdm) -> dict:
    """Train one arm for every (eps, seed) pair at once (eps only matters for "fixed").
    Returns per-rollout logs "eps" and "reward", numpy arrays (len(epsilons), seeds, rollouts)."""
    cycle = make_cycle(arm, cfg, optax.adam(cfg.meta_lr))
    n_rollouts = cfg.total_steps // cfg.rollout_len
    n_steps = steps_per_cycle(arm, cfg)
    cycles_per_chunk = -(-n_rollouts // (n_steps * CHUNKS))  # ceil: the tail is cut off below

    @jax.jit
    @jax.vmap  # over eps values
    @jax.vmap  # over seeds
    def run_chunk(carry: Carry, eps: jax.Array):
        return jax.lax.scan(lambda c, _: cycle(c, eps), carry, None, length=cycles_per_chunk)

    shape = (len(epsilons), cfg.num_seeds)
    carry = jax.tree.map(lambda x: jnp.broadcast_to(x, shape + x.shape[1:]), carry0)
    eps_in = jnp.broadcast_to(epsilons[:, None], shape)
    eps_log, reward_log = [], []
    for chunk in range(CHUNKS):
        carry, (eps, reward) = run_chunk(carry, eps_in)  # (E, S, cycles, n_steps)
        eps_log.append(np.asarray(eps).reshape(shape + (-1,)))
        reward_log.append(np.asarray(reward).reshape(shape + (-1,)))
        bar.update(1)
        done = min((chunk + 1) * cycles_per_chunk * n_steps * cfg.rollout_len, cfg.total_steps)
        bar.write(
            f"arm={arm} steps={done} reward_per_step={reward_log[-1].mean() / cfg.rollout_len:.4f}"
            f" eps={eps_log[-1].mean():.4f}"
        )
    eps = np.concatenate(eps_log, axis=-1)[..., :n_rollouts]
    reward = np.concatenate(reward_log, axis=-1)[..., :n_rollouts]
    return {"eps": eps, "reward": reward}


# %% ---------------------------------------------------------------- evaluation
def swap_window_means(x: np.ndarray, cfg: Config, before: bool) -> np.ndarray:
    """Per seed, the mean of a per-rollout series x (seeds, rollouts) over the quarter swap
    period just before (or just after) every swap."""
    period = cfg.swap_every // cfg.rollout_len
    n_swaps = x.shape[-1] // period - (x.shape[-1] % period == 0)
    quarter = max(period // 4, 1)
    parts = []
    for i in range(1, n_swaps + 1):
        at = i * period
        parts.append(x[:, at - quarter : at] if before else x[:, at : at + quarter])
    return np.concatenate(parts, axis=-1).mean(-1) if parts else np.full(x.shape[0], np.nan)


def binned(x: np.ndarray, size: int) -> np.ndarray:
    """Means over consecutive bins of `size` rollouts along the last axis."""
    n = x.shape[-1] // size * size
    return x[..., :n].reshape(x.shape[:-1] + (-1, size)).mean(-1)


# %% ---------------------------------------------------------------- figures
ARM_STYLE = {
    "best_fixed": ("fixed eps (best)", "tab:gray"),
    "mg": ("MG", "tab:blue"),
    "bmg": ("BMG", "tab:red"),
    "bmg_l1": ("BMG, L = 1", "tab:orange"),
}


def mark_swaps(ax, cfg: Config, scale: float = 1.0) -> None:
    for i, at in enumerate(range(cfg.swap_every, cfg.total_steps, cfg.swap_every)):
        ax.axvline(at * scale, color="k", lw=0.6, ls=":", label="colours swap" if i == 0 else None)


def plot_cumulative(results: dict, fixed: dict, cfg: Config, out: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = np.arange(1, cfg.total_steps // cfg.rollout_len + 1) * cfg.rollout_len / 1e3
    for reward in fixed.values():
        ax.plot(steps, np.cumsum(reward, -1).mean(0), color="tab:gray", lw=0.6, ls="--", alpha=0.6)
    ax.plot([], [], color="tab:gray", lw=0.6, ls="--", label="fixed eps (others)")
    for arm, reward in results.items():
        label, color = ARM_STYLE[arm]
        cum = np.cumsum(reward, -1)
        mean, std = cum.mean(0), cum.std(0, ddof=min(1, len(cum) - 1))  # sample std
        ax.plot(steps, mean, color=color, label=f"{label}: {mean[-1]:.0f} ± {std[-1]:.0f}")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    mark_swaps(ax, cfg, 1e-3)
    ax.set(
        xlabel="environment steps (thousands)",
        ylabel="cumulative reward",
        title=f"Two colours: cumulative reward, mean ± std over {cfg.num_seeds} seeds",
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "cumulative_reward.png", dpi=120)
    plt.close(fig)


def plot_around_swap(results: dict, cfg: Config, out: pathlib.Path) -> None:
    """Reward per step from half a period before to half a period after each swap, averaged
    over swaps and seeds: how deep the dip is and how fast each arm recovers."""
    period = cfg.swap_every // cfg.rollout_len
    half = period // 2
    bin_size = max(half // 20, 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, reward in results.items():
        windows = [
            reward[:, at - half : at + half]
            for at in range(period, reward.shape[-1] - half + 1, period)
        ]
        if not windows:
            continue
        rate = binned(np.concatenate(windows, 0), bin_size) / cfg.rollout_len  # (swaps*seeds, bins)
        x = (np.arange(rate.shape[-1]) * bin_size - half + bin_size / 2) * cfg.rollout_len / 1e3
        label, color = ARM_STYLE[arm]
        ax.plot(x, rate.mean(0), color=color, label=label)
    ax.axvline(0, color="k", lw=0.8, ls=":", label="colours swap")
    ax.set(
        xlabel="environment steps from the swap (thousands)",
        ylabel="reward per step",
        title="Reward rate around a swap (mean over swaps and seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_around_swap.png", dpi=120)
    plt.close(fig)


def plot_epsilon(eps_logs: dict, best_eps: float, cfg: Config, out: pathlib.Path) -> None:
    bin_size = max(cfg.swap_every // cfg.rollout_len // 20, 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for arm, eps in eps_logs.items():
        curve = binned(eps, bin_size)
        steps = (np.arange(curve.shape[-1]) + 0.5) * bin_size * cfg.rollout_len / 1e3
        label, color = ARM_STYLE[arm]
        mean, std = curve.mean(0), curve.std(0)
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    ax.axhline(best_eps, color="tab:gray", ls="--", label=f"best fixed eps = {best_eps:g}")
    mark_swaps(ax, cfg, 1e-3)
    ax.set(
        xlabel="environment steps (thousands)",
        ylabel="entropy weight eps",
        title=f"Meta-learned eps, mean ± std over {cfg.num_seeds} seeds",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "epsilon.png", dpi=120)
    plt.close(fig)


# %% ---------------------------------------------------------------- main
def validate(cfg: Config) -> None:
    """Every option finite and in range, before any work."""
    check_number(cfg, "seed", 0, 2**32 - 1000)
    for name in ("total_steps", "swap_every", "num_seeds", "rollout_len", "k_inner", "l_target"):
        check_number(cfg, name, 1)
    check_number(cfg, "hidden", 1, 4096)
    check_number(cfg, "lr", 0, 10, low_open=True)
    check_number(cfg, "meta_lr", 0, 1, low_open=True)
    if cfg.total_steps < cfg.rollout_len * CHUNKS:
        raise option_error(
            "total_steps",
            cfg.total_steps,
            f"must be >= --rollout-len * {CHUNKS}",
        )
    if cfg.swap_every >= cfg.total_steps:
        raise option_error(
            "swap_every", cfg.swap_every, f"must be < --total-steps ({cfg.total_steps}): no swap"
        )
    bad = [e for e in cfg.fixed_epsilons if not (math.isfinite(e) and 0 <= e < 1)]
    if not cfg.fixed_epsilons or bad:
        raise option_error("fixed_epsilons", cfg.fixed_epsilons, "must be values in [0, 1)")
    check_out_dir(cfg.out_dir)


def main(cfg: Config) -> dict:
    start = time.perf_counter()
    validate(cfg)
    carry0 = initial_carries(cfg)
    epsilons = jnp.array(cfg.fixed_epsilons, dtype=jnp.float32)
    bar = tqdm(total=CHUNKS * len(ARMS), disable=None, desc="train")
    logs = {"fixed": train_arm("fixed", cfg, carry0, epsilons, bar)}
    for arm in ARMS[1:]:
        logs[arm] = train_arm(arm, cfg, carry0, jnp.zeros(1), bar)
    bar.close()
    train_time = time.perf_counter() - start
    if not all(np.isfinite(log["reward"]).all() for log in logs.values()):
        raise FloatingPointError(
            "training diverged: a reward log is not finite; try a smaller --lr"
        )

    # Cumulative reward per seed, then mean and (sample) std over seeds.
    cumulative = {arm: log["reward"].sum(-1) for arm, log in logs.items()}  # (E, S)
    fixed_means = cumulative["fixed"].mean(-1)
    best = int(np.argmax(fixed_means))  # the best fixed eps in hindsight: a strong baseline
    rewards = {"best_fixed": logs["fixed"]["reward"][best]}
    rewards |= {arm: logs[arm]["reward"][0] for arm in ARMS[1:]}
    per_seed = {arm: r.sum(-1) for arm, r in rewards.items()}
    metrics: dict = {"task": "bmg", "seed": cfg.seed, "num_seeds": cfg.num_seeds}
    for arm, values in per_seed.items():
        metrics[f"{arm}_cumulative_reward"] = float(values.mean())
        metrics[f"{arm}_cumulative_reward_std"] = (
            float(values.std(ddof=1)) if len(values) > 1 else 0.0
        )
    metrics["best_fixed_epsilon"] = float(cfg.fixed_epsilons[best])
    for eps, mean in zip(cfg.fixed_epsilons, fixed_means):
        metrics[f"fixed_eps_{eps:g}_cumulative_reward"] = float(mean)
    for arm in ARMS[1:]:  # the paper's claim: BMG's eps rises after each swap
        eps = logs[arm]["eps"][0]
        metrics[f"{arm}_eps_before_swap"] = float(swap_window_means(eps, cfg, True).mean())
        metrics[f"{arm}_eps_after_swap"] = float(swap_window_means(eps, cfg, False).mean())
    metrics |= {"total_steps": cfg.total_steps, "swap_every": cfg.swap_every}
    metrics |= {**device_info(), "preset": getattr(cfg, "preset", "cpu")}
    arms = len(cfg.fixed_epsilons) + len(ARMS) - 1
    metrics["throughput"] = arms * cfg.num_seeds * cfg.total_steps / train_time
    metrics["throughput_unit"] = "env steps/s (all arms and seeds, compilation included)"
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )

    fixed = {e: logs["fixed"]["reward"][i] for i, e in enumerate(cfg.fixed_epsilons) if i != best}
    with staged_run(cfg.out_dir) as out:
        plot_cumulative(rewards, fixed, cfg, out)
        plot_around_swap(rewards, cfg, out)
        eps_logs = {arm: logs[arm]["eps"][0] for arm in ARMS[1:]}
        plot_epsilon(eps_logs, cfg.fixed_epsilons[best], cfg, out)
        metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
        write_metrics(out, cfg, metrics)  # written last and atomically
    return metrics


PRESETS = {"cpu": Config()}

if __name__ == "__main__":
    run_cli()
