"""How do DDPM's samplers compare, and what do its two processes look like? A study of
tasks/diffusion.py.

It trains the task's model (same flags and seed: the model of `python tasks/diffusion.py`, whose
`w2_ratio` it records) and answers what the task's headline does not need:
- the paper's sampler, ancestral DDPM over all T steps from i.i.d. noise, on the task's 2000
  points and floor (`w2_ratio_ddpm_ancestral`; the task itself reported it before);
- sampler and cost: W2 / floor for Heun and DDIM (from the task's noise) and ancestral DDPM (from
  i.i.d. noise) at 5 to 100 reverse steps (1000 points, with their own floor), in w2_vs_steps.png
  and the metrics `w2_ratio_<sampler>_<steps>`;
- a perfect i.i.d. sampler of the true distribution (`w2_ratio_perfect_iid_sampler`): make_moons'
  sets are stratified, so even exact independent draws score well above 1;
- the forward process q(x_t | x_0) and the schedule (forward.png), ancestral sampling at six
  points of its reverse run, where the moons form late (reverse.png), and the loss (loss.png).

    python studies/diffusion_samplers.py [--out-dir runs/diffusion/study/samplers] [flags]

Any flag of the task works here (`--help` lists them).
"""

import dataclasses
import pathlib
import sys

import jax
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import diffusion as dd  # noqa: E402

OUT_DIR = "runs/diffusion/study/samplers"
STEPS = (5, 10, 20, 50, 100)


def nfe(sampler: str, steps: int) -> int:
    """Function evaluations: one a step, Heun two (one on its last step)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def iid_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Independent draws from the distribution that make_moons samples in a stratified way."""
    moon, angle = rng.integers(0, 2, n), rng.uniform(0, np.pi, n)
    x = np.where(moon == 0, np.cos(angle), 1 - np.cos(angle))
    y = np.where(moon == 0, np.sin(angle), 0.5 - np.sin(angle))
    return (np.stack([x, y], axis=-1) + rng.normal(0, 0.1, (n, 2))).astype(np.float32)


def draw(model, schedule, x_T, key, steps: int, sampler: str, mu, sd) -> np.ndarray:
    """The reverse path in data coordinates; raises if the samples diverged."""
    xs = np.asarray(dd.sample(model, schedule, x_T, key, steps, sampler)) * sd + mu
    if not np.isfinite(xs[-1]).all():
        raise FloatingPointError(f"sampling diverged ({sampler}, {steps} steps)")
    return xs


def sampler_sweep(cfg: dd.Config, model, schedule, key, mu, sd) -> dict:
    """W2 / floor per sampler and step count, on 1000 points (fewer if num_samples is smaller)
    with their own floor. Heun and DDIM start from cfg.noise, DDPM from i.i.d. noise."""
    n = min(1000, cfg.num_samples)
    fresh, floor = dd.moons(n, 7_919 * (cfg.seed + 1) + 1), dd.w2_floor(n, cfg.seed, 3)
    table = {}
    for sampler, noise in (("heun", cfg.noise), ("ddim", cfg.noise), ("ddpm", "iid")):
        x_T = dd.base_noise(n, noise, cfg.seed)
        table[sampler] = {
            k: dd.w2_distance(draw(model, schedule, x_T, key, k, sampler, mu, sd)[-1], fresh)
            / floor
            for k in STEPS
            if k <= cfg.num_timesteps
        }
    return table


def plot_forward(out, schedule, data, num_timesteps: int) -> None:
    alpha_bars = np.asarray(schedule["alpha_bars"])
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.5))
    rng, z = np.random.default_rng(0), (data - data.mean(0)) / data.std(0)
    for ax, f in zip(axes.flat, (0, 0.05, 0.1, 0.25, 0.5, 1)):
        t = round(f * (num_timesteps - 1))
        ab = alpha_bars[t]
        x_t = np.sqrt(ab) * z + np.sqrt(1 - ab) * rng.standard_normal(z.shape)
        ax.scatter(x_t[:, 0], x_t[:, 1], s=2, alpha=0.4)
        ax.set(title=f"q(x_t | x_0), t = {t + 1}, abar = {ab:.2g}", xlim=(-4, 4), ylim=(-4, 4))
        ax.set(xlabel="x1 (normalised)", ylabel="x2 (normalised)", aspect="equal")
    steps = np.arange(1, num_timesteps + 1)
    axes.flat[6].plot(steps, alpha_bars, label="abar_t")
    axes.flat[6].plot(steps, np.asarray(schedule["betas"]), label="beta_t")
    axes.flat[6].set(yscale="log", xlabel="step t", title="the schedule", ylim=(1e-5, 1.5))
    axes.flat[6].legend()
    axes.flat[7].axis("off")
    fig.tight_layout()
    dd.save_figure(fig, out / "forward.png")


def plot_reverse_and_sweep(out, ddpm_path: np.ndarray, table: dict, losses: np.ndarray) -> None:
    # The moons form late: most of the structure appears in the last tenth of the steps.
    snaps = (np.array([0, 0.5, 0.8, 0.9, 0.95, 1.0]) * (len(ddpm_path) - 1)).round().astype(int)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True, sharey=True)
    for ax, k in zip(axes.flat, snaps):
        ax.scatter(ddpm_path[k][:, 0], ddpm_path[k][:, 1], s=2, alpha=0.4, color="tab:orange")
        ax.set(title=f"reverse step {k} of {len(ddpm_path) - 1}", xlabel="x1", ylabel="x2")
        ax.set(xlim=(-3, 4), ylim=(-3, 3), aspect="equal")
    fig.suptitle("ancestral (DDPM) sampling: noise at t = T becomes two moons at t = 0")
    fig.tight_layout()
    dd.save_figure(fig, out / "reverse.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, row in table.items():
        ax.plot([nfe(sampler, k) for k in row], list(row.values()), marker="o", label=sampler)
    ax.axhline(1.0, color="black", ls="--", label="floor (fresh vs fresh)")
    ax.axhline(1.2, color="black", ls=":", label="bar: 1.2 x floor")
    ax.set(xscale="log", yscale="log", xlabel="function evaluations (NFE)")
    ax.set(ylabel="W2 / floor (1000 points)", title="sample quality against sampler cost")
    ax.legend()
    fig.tight_layout()
    dd.save_figure(fig, out / "w2_vs_steps.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    window = max(1, len(losses) // 100)
    ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), label="moving average")
    ax.set(xlabel="step", ylabel="noise-prediction loss", title="training loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    dd.save_figure(fig, out / "loss.png")


def main(cfg: dd.Config) -> dict:
    dd.validate(cfg)
    train_key, sample_key = jax.random.split(jax.random.key(cfg.seed))  # as the task's
    data = dd.moons(cfg.num_train, cfg.seed)
    mu, sd = data.mean(axis=0), data.std(axis=0)
    model, losses, _ = dd.train(cfg, (data - mu) / sd, train_key)
    schedule = dd.make_schedule(cfg.num_timesteps)
    _, fresh, headline = dd.evaluate(cfg, model, schedule, sample_key, mu, sd)  # the task's numbers
    floor = headline["w2_floor"]  # the task's fresh moons and floor
    rng = np.random.default_rng(cfg.seed)
    w2_iid = np.mean([dd.w2_distance(iid_moons(cfg.num_samples, rng), fresh) for _ in range(5)])
    table = sampler_sweep(cfg, model, schedule, sample_key, mu, sd)
    x_T = dd.base_noise(cfg.num_samples, "iid", cfg.seed)
    ddpm_path = draw(model, schedule, x_T, sample_key, cfg.num_timesteps, "ddpm", mu, sd)
    metrics = {"task": "diffusion", "study": "samplers", "seed": cfg.seed}
    metrics["w2_ratio"] = headline["w2_ratio"]  # the task's number: the same model
    metrics["w2_ratio_perfect_iid_sampler"] = float(w2_iid / floor)
    metrics["w2_ratio_ddpm_ancestral"] = dd.w2_distance(ddpm_path[-1], fresh) / floor
    metrics.update({f"w2_ratio_{s}_{k}": v for s, row in table.items() for k, v in row.items()})
    with dd.staged_run(cfg.out_dir) as out:
        plot_forward(out, schedule, fresh, cfg.num_timesteps)
        plot_reverse_and_sweep(out, ddpm_path, table, losses)
        dd.write_metrics(out, cfg, metrics)  # metrics.json last, atomically
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


if __name__ == "__main__":
    main(tyro.cli(dd.Config, default=dataclasses.replace(dd.Config(), out_dir=OUT_DIR)))
