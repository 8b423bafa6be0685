"""How does sample quality grow with the ODE solver's cost, and what does the learned field look
like? A study of tasks/flow_matching.py.

It trains the task's model (same flags and seed: the model of `python tasks/flow_matching.py`, whose
`w2_ratio` it records) and measures what the task's headline does not need:
- solver and cost: W2 / floor for Euler, midpoint and Heun at 1 to 32 steps (1000 points, with
  their own floor), in w2_vs_nfe.png and the metrics `w2_ratio_<solver>_<steps>`;
- a perfect i.i.d. sampler of the true distribution (`w2_ratio_perfect_iid_sampler`, 5 draws
  against the task's fresh moons and floor): make_moons' sets are stratified, so even exact
  independent draws score well above 1;
- the learned field: v(x, t) at six times with the particles (field.png), and an animation of the
  sampling (sampling.gif).

    python studies/flow_matching_sampling.py [--out-dir runs/flow_matching/study/sampling] [flags]

Any flag of the task works here (`--help` lists them).
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro
from matplotlib.animation import FuncAnimation, PillowWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import flow_matching as fm  # noqa: E402

OUT_DIR = "runs/flow_matching/study/sampling"
STEPS = (1, 2, 4, 8, 16, 32)
LIM = ((-1.6, 2.6), (-1.2, 1.7))  # the axes, in data coordinates


def sample(model, x0, steps: int, solver: str, mu, sd) -> np.ndarray:
    """Samples in data coordinates from noise x0; raises if they diverged."""
    xs = np.asarray(fm.integrate(model, x0, steps, solver)[-1]) * sd + mu
    if not np.isfinite(xs).all():
        raise FloatingPointError(f"sampling diverged ({solver}, {steps} steps)")
    return xs


def iid_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Independent draws from make_moons' distribution: a random moon, angle and noise."""
    moon, angle = rng.integers(0, 2, n), rng.uniform(0, np.pi, n)
    x = np.where(moon == 0, np.cos(angle), 1 - np.cos(angle))
    y = np.where(moon == 0, np.sin(angle), 0.5 - np.sin(angle))
    return (np.stack([x, y], axis=-1) + rng.normal(0, 0.1, (n, 2))).astype(np.float32)


def solver_sweep(cfg: fm.Config, model, mu, sd) -> dict:
    """W2 / floor for each solver and step count, on 1000 points (fewer if num_samples is smaller)
    with their own floor: an assignment of 2000 poor samples takes seconds."""
    n = min(1000, cfg.num_samples)
    x0 = fm.base_noise(n, cfg.noise, cfg.seed)
    fresh = fm.moons(n, 7_919 * (cfg.seed + 1) + 1)
    floor = fm.w2_floor(n, cfg.seed, draws=3)
    return {
        s: {k: fm.w2_distance(sample(model, x0, k, s, mu, sd), fresh) / floor for k in STEPS}
        for s in fm.SOLVERS
    }


def draw_field(ax, model, mu, sd, t: float, pts: np.ndarray, n: int = 17) -> None:
    """The learned field at time t on a grid, in data units (x = mu + sd z, so dx/dt = sd v), and
    the particles pts."""
    gx, gy = np.meshgrid(np.linspace(*LIM[0], n), np.linspace(*LIM[1], n))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)
    z = jnp.asarray((grid - mu) / sd)
    v = np.asarray(model(z, jnp.full((len(z),), t))) * sd
    u, w = v[:, 0].reshape(gx.shape), v[:, 1].reshape(gx.shape)
    ax.quiver(gx, gy, u, w, np.hypot(u, w), cmap="viridis", angles="xy")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="tab:orange")
    ax.set(xlabel="x1", xlim=LIM[0], ylim=LIM[1], aspect="equal")


def plot(out: pathlib.Path, model, mu, sd, path: np.ndarray, table: dict) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True, sharey=True)
    for ax, t in zip(axes.flat, np.linspace(0, 1, 6)):
        draw_field(ax, model, mu, sd, float(t), path[round(t * (len(path) - 1))])
        ax.set_title(f"t = {t:.1f}")
    fig.suptitle("learned velocity v(x, t) (arrows, data units per unit time) and the particles")
    fig.tight_layout()
    fm.save_figure(fig, out / "field.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, row in table.items():
        nfe = [k * fm.NFE_PER_STEP[solver] for k in row]
        ax.plot(nfe, list(row.values()), marker="o", label=solver)
    ax.axhline(1.0, color="black", ls="--", label="floor (fresh vs fresh)")
    ax.axhline(1.2, color="black", ls=":", label="bar: 1.2 x floor")
    ax.set(xscale="log", yscale="log", xlabel="function evaluations (NFE)")
    ax.set(ylabel="W2 / floor (1000 points)", title="sample quality against ODE solver cost")
    ax.legend()
    fig.tight_layout()
    fm.save_figure(fig, out / "w2_vs_nfe.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    steps = len(path) - 1

    def frame(k):
        ax.clear()
        draw_field(ax, model, mu, sd, k / steps, path[k])
        ax.set(title=f"flow matching sampling, t = {k / steps:.2f}", ylabel="x2")

    anim = FuncAnimation(fig, frame, frames=steps + 1)
    anim.save(out / "sampling.gif", writer=PillowWriter(fps=6), dpi=70)  # a file, not inline
    plt.close(fig)


def main(cfg: fm.Config) -> dict:
    fm.validate(cfg)
    data = fm.moons(cfg.num_train, cfg.seed)
    mu, sd = data.mean(axis=0), data.std(axis=0)
    model, _, _ = fm.train(cfg, (data - mu) / sd, jax.random.key(cfg.seed))  # the task's model
    x0, _, fresh, headline = fm.evaluate(cfg, model, mu, sd)
    metrics = {"task": "flow_matching", "study": "sampling", "seed": cfg.seed}
    metrics["w2_ratio"] = headline["w2_ratio"]  # the task's number: the same model
    rng = np.random.default_rng(cfg.seed)  # a perfect i.i.d. sampler, 5 draws
    w2_iid = np.mean([fm.w2_distance(iid_moons(cfg.num_samples, rng), fresh) for _ in range(5)])
    metrics["w2_ratio_perfect_iid_sampler"] = float(w2_iid / headline["w2_floor"])
    table = solver_sweep(cfg, model, mu, sd)
    metrics.update({f"w2_ratio_{s}_{k}": v for s, row in table.items() for k, v in row.items()})
    path = np.asarray(fm.integrate(model, x0, 20, "heun")) * sd + mu
    with fm.staged_run(cfg.out_dir) as out:
        plot(out, model, mu, sd, path, table)
        fm.write_metrics(out, cfg, metrics)  # metrics.json last, atomically
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


if __name__ == "__main__":
    main(tyro.cli(fm.Config, default=dataclasses.replace(fm.Config(), out_dir=OUT_DIR)))
