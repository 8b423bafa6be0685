"""Which parts of the digit and which units of the network carry the evidence?

The task (tasks/interpret.py) visualises what the CNN wants and dreams its channels; this study
trains the same model (same config and seed, so the same weights) and probes it three ways:
gradient saliency (how much of |d log p / dx| falls where there is no ink), occlusion (erase a
6x6 patch, measure the drop of p(label)), ablation of the conv2 channels most selective for a
class (chosen on the validation split, against random channels), dreaming such a channel into a
digit of another class (the task's deep dream, one channel), and the tuning of the first-layer
channels to oriented gratings. It writes report.md with one finding per probe, saliency.png,
ablation.png, first_layer_channels.png and metrics.json.

    python studies/interpret_probes.py          # runs/interpret/study/probes/
    python studies/interpret_probes.py --help
"""

import dataclasses
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import interpret  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    train_size: int = 55_000  # training images (the task's default)
    val_size: int = 5_000  # validation images, where the selective channels are chosen (task's)
    epochs: int = 3  # passes over the training images (the task's default)
    batch_size: int = 128  # images per Adam step (the task's default)
    width: int = 16  # channels of the first conv layer (the task's default)
    seed: int = 0  # the task's seed
    num_saliency_digits: int = 100  # test digits on which saliency and occlusion are measured
    ablate_k: int = 3  # second-layer channels ablated per class (the k most selective for it)
    out_dir: str = "runs/interpret/study/probes"  # where the report, figures and metrics go


# ---------------------------------------------------------------- features and saliency
@jax.jit
def pooled_features(model, x_u8: jax.Array) -> jax.Array:
    """uint8 images (N, 28, 28), N a multiple of 500 -> pooled conv2 maps (N, 7, 7, 2w)."""
    chunk = lambda xb: interpret.max_pool2(model.forward(interpret.to_input(xb))[1]["conv2"])
    feats = jax.lax.map(chunk, x_u8.reshape(-1, 500, 28, 28))
    return feats.reshape(-1, 7, 7, model.conv2.linear.out_features)


def features_of(model, x_u8: np.ndarray) -> jax.Array:
    """Pooled conv2 features of any number of images (padded to a multiple of 500 and cut)."""
    pad = np.zeros((-len(x_u8) % 500, 28, 28), np.uint8)
    return pooled_features(model, np.concatenate([x_u8, pad]))[: len(x_u8)]


def channel_selectivity(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d'-style selectivity (10, C): (mean over class c - mean over the rest) / std over all."""
    std = acts.std(0) + 1e-8
    return np.stack(
        [(acts[labels == c].mean(0) - acts[labels != c].mean(0)) / std for c in range(10)]
    )


@jax.jit
def gradient_saliency(model, images: jax.Array, labels: jax.Array) -> jax.Array:
    """|d log p(y|x) / dx| per pixel (N, 28, 28)."""
    log_p = lambda x, y: jax.nn.log_softmax(model(x[None])[0])[y]
    return jnp.abs(jax.vmap(jax.grad(log_p))(images, labels))[..., 0]


def measure_saliency(xs: jax.Array, grads: np.ndarray) -> dict:
    """Share of the gradient saliency on background pixels (value < 0.1). The floors keep the
    ratios finite (strict JSON) if the saliency is all zero."""
    background = np.asarray(xs[..., 0]) < 0.1
    ink_density = (grads * ~background).sum() / max((~background).sum(), 1)
    bg_density = (grads * background).sum() / max(background.sum(), 1)
    return {
        "saliency_background_share": float((grads * background).sum() / max(grads.sum(), 1e-30)),
        "background_area_share": float(background.mean()),
        "saliency_ink_to_background": float(ink_density / max(bg_density, 1e-30)),
    }


# ---------------------------------------------------------------- channel dreams
def measure_channel_dreams(study: StudyConfig, model, data: dict) -> dict:
    """In the first test digit of each class c, dream (tasks/interpret.py's deep_dream) the conv2
    channel most selective for k = (c + 1) % 10 on the validation split: does p(k) rise?"""
    val_acts = np.asarray(features_of(model, data["x_val"]).mean((1, 2)))  # (N_val, 2w)
    best = channel_selectivity(val_acts, data["y_val"]).argmax(1)  # (10,)
    i, k = np.arange(10), (np.arange(10) + 1) % 10
    x0 = interpret.to_input(
        jnp.asarray(data["x_test"][[np.argmax(data["y_test"] == c) for c in i]])
    )
    dreams = interpret.deep_dream(model, x0, jax.random.key(study.seed + 2), jnp.asarray(best[k]))
    p0, p1 = (np.asarray(jax.nn.softmax(model(a))) for a in (x0, dreams))
    return {
        "dream_channel_prob_before": float(p0[i, k].mean()),
        "dream_channel_prob_after": float(p1[i, k].mean()),
        "dream_channel_prob_rise": float((p1[i, k] - p0[i, k]).mean()),
        "dream_channel_flips": int((p1.argmax(1) == k).sum()),
    }


# ---------------------------------------------------------------- occlusion
def occlusion_map(prob_fn: Callable[[jax.Array], jax.Array], images: jax.Array, labels: jax.Array,
                  patch: int = 6, stride: int = 2, fill: float = 0.0) -> jax.Array:  # fmt: skip
    """Drop of p(true class) when a patch x patch square is set to `fill`: (N, P, P).

    prob_fn maps images (M, 28, 28, 1) to probabilities (M, 10); P = (28 - patch) // stride + 1.
    """
    starts = np.arange(0, 28 - patch + 1, stride)
    masks = np.zeros((len(starts), len(starts), 28, 28, 1), np.float32)
    for i, r in enumerate(starts):
        for j, c in enumerate(starts):
            masks[i, j, r : r + patch, c : c + patch] = 1.0
    masks = jnp.asarray(masks.reshape(-1, 28, 28, 1))  # (P*P, 28, 28, 1)

    def one(args):
        x, y = args  # (28, 28, 1), ()
        occluded = x[None] * (1 - masks) + fill * masks
        return prob_fn(x[None])[0, y] - prob_fn(occluded)[:, y]

    return jax.lax.map(one, (images, labels)).reshape(-1, len(starts), len(starts))


def measure_occlusion(model, xs: jax.Array, ys: jax.Array) -> tuple[dict, np.ndarray]:
    occ = np.asarray(
        jax.jit(lambda m, x, y: occlusion_map(lambda b: jax.nn.softmax(m(b)), x, y))(model, xs, ys)
    )  # (N, 12, 12)
    # Does erasing the most important patch flip the prediction? Patch (i, j) starts at (2i, 2j).
    ti, tj = np.unravel_index(occ.reshape(len(occ), -1).argmax(1), occ.shape[1:])
    erased = np.array(xs)
    for n, (i, j) in enumerate(zip(ti, tj)):
        erased[n, 2 * i : 2 * i + 6, 2 * j : 2 * j + 6] = 0.0
    flip = np.asarray(model(jnp.asarray(erased))).argmax(1) != np.asarray(ys)
    # The median drop over patches that contain ink (max pixel > 0.5); blank patches change nothing.
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(xs[..., 0]), (6, 6), (1, 2))
    patch_has_ink = windows[:, ::2, ::2].max((-2, -1)) > 0.5  # (N, 12, 12), like occ
    metrics = {
        "num_saliency_digits": len(xs),
        "occlusion_top_drop": float(occ.reshape(len(occ), -1).max(1).mean()),
        "occlusion_median_ink_drop": float(np.median(occ[patch_has_ink])),
        "occlusion_flip_rate": float(flip.mean()),
    }
    return metrics, occ


# ---------------------------------------------------------------- channel ablation
def masked_head(model, pooled: jax.Array, mask: jax.Array) -> jax.Array:
    """Logits with conv2 channels multiplied by mask (2w,); a 0/1 mask commutes with the max-pool,
    so masking the pooled maps equals masking the conv2 maps."""
    return head(model, pooled * mask)


def head(model, pooled: jax.Array) -> jax.Array:
    """The CNN's dense layers on pooled conv2 maps (B, 7, 7, 2w) -> logits (B, 10)."""
    return model.fc2(jax.nn.relu(model.fc1(pooled.reshape(pooled.shape[0], -1))))


def ablation_masks(selectivity: np.ndarray, k: int) -> np.ndarray:
    """(10, C) masks: row c zeroes the k channels most selective for class c."""
    masks = np.ones_like(selectivity)
    top = np.argsort(-selectivity, axis=1)[:, :k]
    np.put_along_axis(masks, top, 0.0, axis=1)
    return masks


@jax.jit
def per_class_accuracy(model, feats: jax.Array, y: jax.Array, masks: jax.Array) -> jax.Array:
    """Accuracy on each true class (M, 10) for each conv2 mask (M, 2w), from pooled features."""

    def one(mask):
        correct = masked_head(model, feats, mask).argmax(1) == y  # (N,)
        return jnp.stack([(correct * (y == c)).sum() / (y == c).sum() for c in range(10)])

    return jax.lax.map(one, masks)


def measure_ablation(study: StudyConfig, model, data: dict) -> tuple[dict, dict]:
    val_acts = np.asarray(features_of(model, data["x_val"]).mean((1, 2)))  # (N, 2w)
    selectivity = channel_selectivity(val_acts, data["y_val"])  # (10, 2w)
    channels = 2 * study.width
    rng = np.random.default_rng(study.seed)
    random_masks = np.ones((10, channels))
    for c in range(10):
        random_masks[c, rng.choice(channels, study.ablate_k, replace=False)] = 0.0
    all_masks = np.concatenate(
        [np.ones((1, channels)), ablation_masks(selectivity, study.ablate_k), random_masks]
    )
    feats = features_of(model, data["x_test"])
    acc = np.asarray(
        per_class_accuracy(model, feats, jnp.asarray(data["y_test"]), jnp.asarray(all_masks))
    )
    base = acc[0]  # (10,)
    drops = base[None] - acc[1:11]  # drops[c, d]: class d's drop when class c's channels go
    random_drop = base - np.diag(acc[11:])  # class c's drop with random channels ablated
    off = ~np.eye(10, dtype=bool)
    other_drop = drops[off].reshape(10, 9).mean(1)  # the other classes, per c
    specific = np.diag(drops) >= 2 * np.maximum(np.maximum(other_drop, random_drop), 1e-3)
    metrics = {
        "ablate_k": study.ablate_k,
        "ablation_target_drop": float(np.diag(drops).mean()),
        "ablation_other_drop": float(drops[off].mean()),
        "ablation_random_drop": float(random_drop.mean()),
        "ablation_specific_classes": int(specific.sum()),
    }
    return metrics, dict(base=base, target=np.diag(drops), other=other_drop, random=random_drop)


# ---------------------------------------------------------------- first-layer channels
def grating_tuning(model, num_orientations: int = 8, period: float = 8.0) -> np.ndarray:
    """Mean conv1 response (C, num_orientations) to sinusoidal gratings, averaged over 4 phases."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    thetas = np.arange(num_orientations) * np.pi / num_orientations
    phases = np.arange(4) * np.pi / 2
    u = np.cos(thetas)[:, None, None, None] * xx + np.sin(thetas)[:, None, None, None] * yy
    gratings = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phases[None, :, None, None])
    a1 = model.forward(jnp.asarray(gratings.reshape(-1, 28, 28, 1)))[1]["conv1"]
    resp = np.asarray(a1[:, 4:-4, 4:-4].mean((1, 2)))  # away from the zero-padded border
    return resp.reshape(num_orientations, 4, -1).mean(1).T


def orientation_selectivity(tuning: np.ndarray) -> np.ndarray:
    """(max - min) / (max + min) of each channel's tuning curve (C, n) -> (C,), in [0, 1]."""
    hi, lo = tuning.max(1), tuning.min(1)
    return (hi - lo) / (hi + lo + 1e-8)


def measure_first_layer(study: StudyConfig, model) -> tuple[dict, dict]:
    tuning = grating_tuning(model)
    osi = orientation_selectivity(tuning)
    metrics = {
        "num_conv1_channels": study.width,
        "orientation_selective_channels": int((osi > 0.5).sum()),
        "median_orientation_selectivity": float(np.median(osi)),
        "distinct_preferred_orientations": int(len(set(tuning[osi > 0.5].argmax(1).tolist()))),
    }
    return metrics, dict(tuning=tuning, osi=osi)


# ---------------------------------------------------------------- report
def verdicts(m: dict) -> dict[str, bool]:
    return {
        # the best patch lowers p(label) by >= 0.1 and >= 5x more than the median ink patch
        "local": m["occlusion_top_drop"] >= max(5 * m["occlusion_median_ink_drop"], 0.1),
        # top-k ablation hurts its own class >= 2x more than other classes and random channels
        "class_specific": m["ablation_target_drop"]
        >= 2 * max(m["ablation_other_drop"], m["ablation_random_drop"], 1e-3),
        # ... and that also holds class by class for at least half of the classes
        "specific_per_class": m["ablation_specific_classes"] >= 5,
        # a class-selective channel flips at least 3 of 10 dreams / raises p(k) by >= 0.05
        "dream_steers": m["dream_channel_flips"] >= 3,
        "dream_raises": m["dream_channel_prob_rise"] >= 0.05,
        # >= 30% of the gradient saliency lies on background pixels
        "reads_background": m["saliency_background_share"] >= 0.3,
        # more than half the first-layer channels have orientation selectivity index > 0.5
        "oriented": m["orientation_selective_channels"] > m["num_conv1_channels"] / 2,
    }


def report_findings(m: dict) -> list[str]:
    """One finding per probe: each quotes its measurement, and the wording follows the numbers."""
    v = verdicts(m)
    specific = "class-specific" if v["class_specific"] else "shared between classes"
    if v["class_specific"] and not v["specific_per_class"]:
        specific = "class-specific for some classes"
    steers = "steers the prediction" if v["dream_steers"] else "does not steer the prediction"
    if v["dream_raises"] and not v["dream_steers"]:
        steers = "raises p(k) but rarely flips the prediction"
    return [
        f"**The model {'also reads' if v['reads_background'] else 'mostly ignores'} where ink is "
        f"absent.** {100 * m['saliency_background_share']:.0f}% of the gradient saliency "
        f"|d log p / dx| falls on background pixels (value < 0.1, "
        f"{100 * m['background_area_share']:.0f}% of the area): the output is sensitive to ink "
        f"added there, not only to the strokes themselves; per pixel, ink is "
        f"{m['saliency_ink_to_background']:.1f}x as salient.",
        f"**Evidence is {'concentrated in a few parts' if v['local'] else 'spread over'} "
        f"{'of ' if v['local'] else ''}the digit.** Erasing the single most important 6x6 "
        f"patch lowers p(label) by {m['occlusion_top_drop']:.3f} on average and flips the "
        f"prediction in {100 * m['occlusion_flip_rate']:.0f}% of {m['num_saliency_digits']} test "
        f"digits, while erasing the median patch that contains ink lowers it by "
        f"{m['occlusion_median_ink_drop']:.4f}.",
        f"**Second-layer channels are {specific}.** Zeroing the {m['ablate_k']} conv2 channels "
        f"most selective for a class (chosen on the validation split) lowers that class's test "
        f"accuracy by {100 * m['ablation_target_drop']:.2f} points on average, the other classes' "
        f"by {100 * m['ablation_other_drop']:.2f} points, while {m['ablate_k']} random channels "
        f"lower it by {100 * m['ablation_random_drop']:.2f} points. Class by class, the own-class "
        f"drop is at least twice both controls for {m['ablation_specific_classes']}/10 digits.",
        f"**{'Most' if v['oriented'] else 'Only some'} first-layer channels are tuned to stroke "
        f"orientation.** {m['orientation_selective_channels']}/{m['num_conv1_channels']} conv1 "
        f"channels have an orientation selectivity index above 0.5 on sinusoidal gratings (median "
        f"{m['median_orientation_selectivity']:.2f}); their preferred angles cover "
        f"{m['distinct_preferred_orientations']} of 8 orientation bins.",
        f"**Dreaming a class-selective channel {steers}.** Amplifying, in a real digit of another "
        f"class, the conv2 channel most selective for class k moves p(k) from "
        f"{m['dream_channel_prob_before']:.3f} to {m['dream_channel_prob_after']:.3f} on average, "
        f"and the prediction becomes k in {m['dream_channel_flips']}/10 dreams.",
    ]


# ---------------------------------------------------------------- figures
def save_saliency(images, occlusion, grads, labels, path):
    n = min(8, len(images))
    fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.6))
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray")
        axes[0, i].set_title(f"label {labels[i]}", fontsize=9)
        # Occlusion cell (r, c) is the 6x6 patch starting at pixel (2r, 2c): centre 2r + 3.
        axes[1, i].contour(images[i], levels=[0.5], colors="gray", linewidths=0.7)
        axes[1, i].imshow(occlusion[i], cmap="RdBu_r", vmin=-1, vmax=1, extent=(2, 26, 26, 2))
        axes[1, i].set_xlim(0, 28)
        axes[1, i].set_ylim(28, 0)
        axes[2, i].imshow(grads[i], cmap="hot")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("test digit")
    axes[1, 0].set_ylabel("occlusion:\ndrop of p(label)")
    axes[2, 0].set_ylabel("|d log p / dx|")
    fig.suptitle("Saliency on test digits (occlusion: 6x6 patch erased, stride 2)")
    fig.tight_layout()
    interpret.save_figure(fig, path)


def save_ablation(drops: dict, k: int, path):
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(10)
    ax.bar(xs - 0.27, 100 * drops["target"], 0.27, label=f"its class, top-{k} selective ablated")
    ax.bar(xs, 100 * drops["other"], 0.27, label="mean of the other 9 classes")
    ax.bar(xs + 0.27, 100 * drops["random"], 0.27, label=f"its class, {k} random channels ablated")
    ax.set_xticks(xs)
    ax.set_xlabel("class whose most selective conv2 channels are ablated")
    ax.set_ylabel("test accuracy drop (percentage points)")
    ax.set_title(f"Ablating class-selective channels (baseline accuracy "
                 f"{100 * drops['base'].mean():.2f}%)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    interpret.save_figure(fig, path)


def save_first_layer(kernels, a1, tuning, osi, path):
    num = kernels.shape[-1]
    fig, axes = plt.subplots(3, num, figsize=(1.3 * num, 4.6))
    degrees = np.arange(tuning.shape[1]) * 180 / tuning.shape[1]
    for k in range(num):
        lim = abs(kernels).max()
        axes[0, k].imshow(kernels[..., k], cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, k].set_title(f"ch {k}", fontsize=8)
        axes[1, k].imshow(a1[..., k], cmap="magma")
        axes[2, k].plot(degrees, tuning[k])
        axes[2, k].set_title(f"OSI {osi[k]:.2f}", fontsize=8)
        axes[2, k].set_xlabel("grating angle (deg)", fontsize=6)
        axes[2, k].tick_params(labelsize=5)
        for ax in axes[:2, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("5x5 kernel")
    axes[1, 0].set_ylabel("response\nto a digit")
    axes[2, 0].set_ylabel("mean response")
    title = "First-layer channels: kernel (red +, blue -), ReLU response map on a test digit, "
    fig.suptitle(title + "and tuning to oriented gratings (OSI = orientation selectivity index)")
    fig.tight_layout()
    interpret.save_figure(fig, path)


# ---------------------------------------------------------------- main
def main(study: StudyConfig) -> dict:
    cfg = interpret.Config(train_size=study.train_size, val_size=study.val_size,
                           epochs=study.epochs, batch_size=study.batch_size, width=study.width,
                           seed=study.seed, out_dir=study.out_dir)  # fmt: skip
    interpret.validate(cfg)
    interpret.check_number(study, "ablate_k", 1, 2 * study.width - 1)  # conv2 has 2w channels
    interpret.check_number(study, "num_saliency_digits", 1, 10_000)  # the test set's size
    data = interpret.load_splits(cfg)
    model, history, _ = interpret.train(
        cfg, data["x_train"], data["y_train"], data["x_val"], data["y_val"]
    )  # the task's model: same config, same seed
    xs = interpret.to_input(jnp.asarray(data["x_test"][: study.num_saliency_digits]))
    ys = jnp.asarray(data["y_test"][: study.num_saliency_digits])
    m = {"study": "interpret_probes", "seed": study.seed, "val_accuracy": history[-1][1]}
    occ_metrics, occ = measure_occlusion(model, xs, ys)
    ablation_metrics, drops = measure_ablation(study, model, data)
    layer_metrics, layer = measure_first_layer(study, model)
    grads = np.asarray(gradient_saliency(model, xs, ys))
    m |= occ_metrics | measure_saliency(xs, grads) | ablation_metrics | layer_metrics
    m |= measure_channel_dreams(study, model, data)
    findings = report_findings(m)
    m["num_findings"] = len(findings)
    with interpret.staged_run(study.out_dir) as out:
        lines = ["# Where the evidence is: saliency, occlusion, ablation, dreams, conv1 tuning", ""]
        lines += [f"{i + 1}. {f}" for i, f in enumerate(findings)]
        (out / "report.md").write_text("\n".join(lines) + "\n")
        save_saliency(np.asarray(xs[..., 0]), occ, grads, np.asarray(ys), out / "saliency.png")
        save_ablation(drops, study.ablate_k, out / "ablation.png")
        zero = interpret.to_input(jnp.asarray(data["x_test"][data["y_test"] == 0][:1]))  # a 0
        a1 = np.asarray(model.forward(zero)[1]["conv1"][0])
        kernels = np.asarray(model.conv1.linear.kernel[...]).reshape(5, 5, study.width)
        save_first_layer(
            kernels, a1, layer["tuning"], layer["osi"], out / "first_layer_channels.png"
        )
        print(" ".join(f"{k}={v:.4g}" for k, v in m.items() if not isinstance(v, str)))
        interpret.write_metrics(out, study, m)  # config.json, then metrics.json last, atomically
    return m


if __name__ == "__main__":
    main(tyro.cli(StudyConfig))
