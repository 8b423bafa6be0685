"""Which way does each meta-gradient push eps, at a warm agent just after a swap?

At the defaults MG's eps falls while the agent exploits and rises at swaps, but BMG's stays near
0.5 (docs/bmg.md). This study looks at the meta-gradient itself. It warms the task's agents up on
the first (blue) phase exactly as the task does, holds eps at a constant value, and measures
d(meta-loss)/d(eps) just after the swap for MG, BMG (the paper's target), BMG with L = 1, and BMG
with eps = 0 in the target's L - 1 steps (`--bmg-target-eps zero`), over seeds x independent
rollout streams. A negative derivative means that meta-gradient descent raises eps. It writes the
mean derivative and its t-statistic (mean / standard error) per arm and eps, and
meta_gradient.png.

    python studies/bmg_meta_gradient.py            # runs/bmg/study/meta_gradient/
    python studies/bmg_meta_gradient.py --help
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
import bmg  # noqa: E402

ARMS = {"mg": "MG", "bmg": "BMG (paper's target)", "bmg_l1": "BMG, L = 1",
        "bmg_zero": "BMG, eps = 0 in the target"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    num_seeds: int = 3  # warm agents (the task's seeds seed, seed + 1, ...)
    num_streams: int = 24  # independent rollout streams per agent
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)  # the constant eps values
    swap_every: int = 50_000  # the task's; the warm-up is the first phase
    num_envs: int = 8  # grids per agent update (the task's)
    seed: int = 0  # the task's base seed
    out_dir: str = "runs/bmg/study/meta_gradient"  # where the figure and metrics.json go


def meta_loss(arm: str, eps: jax.Array, inner: bmg.Inner, cfg: bmg.Config) -> jax.Array:
    """The task's MG or BMG meta-loss, with eps a constant instead of the meta-learner's output."""
    inner_k, _ = bmg.agent_steps(lambda i: eps, inner, cfg.k_inner, cfg)
    if arm == "mg":
        return bmg.a2c_loss(inner_k.params, inner_k.rollout, 0.0)[1]
    target_eps = 0.0 if arm == "bmg_zero" else jax.lax.stop_gradient(eps)
    n_target = 0 if arm == "bmg_l1" else cfg.l_target - 1
    frozen = jax.lax.stop_gradient(inner_k)
    inner_t, _ = bmg.agent_steps(lambda i: target_eps, frozen, n_target, cfg)
    return bmg.bmg_matching_loss(inner_k.params, inner_t.params, inner_t.rollout, cfg.lr)


def warm_agents(cfg: bmg.Config) -> bmg.Inner:
    """The task's shared warm-up: each seed's agent at the first swap (leading seed axis)."""
    seeds = jnp.arange(cfg.num_seeds) + cfg.seed
    carry = jax.jit(jax.vmap(lambda s: bmg.init_carry(s, cfg)))(seeds)
    warm = cfg.swap_every // cfg.rollout_len
    carry = bmg.train_arm("fixed", cfg, carry, jnp.array([bmg.WARM_EPS]), warm, chunks=1)[1]
    return jax.tree.map(lambda x: x[:, 0], carry.inner)


def main(sc: StudyConfig) -> dict:
    cfg = bmg.Config(seed=sc.seed, num_seeds=sc.num_seeds, swap_every=sc.swap_every,
                     total_steps=3 * sc.swap_every, num_envs=sc.num_envs,
                     out_dir=sc.out_dir)  # fmt: skip
    bmg.validate(cfg)
    inner = warm_agents(cfg)
    keys = jax.random.split(jax.random.PRNGKey(sc.seed + 12345), sc.num_streams)
    metrics, t_stats = {"study": "bmg_meta_gradient", "seed": sc.seed}, {}
    for arm in ARMS:
        grad = jax.grad(lambda e, i, k, arm=arm: meta_loss(arm, e, i._replace(key=k), cfg))
        grad = jax.jit(jax.vmap(jax.vmap(grad, (None, None, 0)), (None, 0, None)))
        for eps in sc.epsilons:
            g = np.asarray(grad(jnp.float32(eps), inner, keys), dtype=np.float64).ravel()
            mean, se = g.mean(), g.std(ddof=1) / math.sqrt(g.size)
            metrics[f"{arm}_eps_{eps:g}_grad"] = float(mean)
            metrics[f"{arm}_eps_{eps:g}_t"] = t_stats[arm, eps] = float(mean / se)
        print(arm, " ".join(f"eps={e:g}: t={t_stats[arm, e]:+.2f}" for e in sc.epsilons))
    with bmg.staged_run(sc.out_dir) as out:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for arm, label in ARMS.items():
            ax.plot(sc.epsilons, [t_stats[arm, e] for e in sc.epsilons], "o-", label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="constant eps", ylabel="t of d(meta-loss)/d(eps)  (< 0: raises eps)")
        ax.set_title(f"Meta-gradient at a warm agent after a swap ({g.size} streams)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        bmg.save_figure(fig, out / "meta_gradient.png")
        bmg.write_metrics(out, sc, metrics)
    return metrics


if __name__ == "__main__":
    main(tyro.cli(StudyConfig))
