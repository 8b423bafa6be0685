"""Where would greedy decoding fail first, and how did training get there?

The task reports one exact-match number over all held-out sequences. This study trains the task's
model (same config and seed, so the same weights), then writes exact match and token accuracy for
each sequence length k, the loss curves (loss.png: training batches and held-out, teacher
forcing) and a table of held-out inputs, greedy outputs and targets (examples.png).

    python studies/reverse_digits_by_length.py     # runs/reverse_digits/study/by_length/
    python studies/reverse_digits_by_length.py --steps 100 --help   # any task flag works
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import reverse_digits as rd  # noqa: E402

DEFAULT = dataclasses.replace(rd.Config(), out_dir="runs/reverse_digits/study/by_length")


def plot_loss(train_losses: np.ndarray, heldout_losses: np.ndarray, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(1, len(train_losses) + 1), train_losses, lw=0.8, label="train batch")
    ax.semilogy(heldout_losses[:, 0], heldout_losses[:, 1], "o-", ms=3, label="held-out")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy on reversed part (nats)")
    ax.set_title("Loss (teacher forcing)")
    ax.legend()
    fig.tight_layout()
    rd.save_figure(fig, path)


def plot_examples(seqs, lengths, decoded, cfg: rd.Config, path: pathlib.Path, n=12) -> None:
    """A table of held-out inputs, greedy outputs and targets."""
    half, rows = cfg.seq_len, []
    fmt = lambda a: " ".join(str(int(x)) for x in a)
    for s, k, d in zip(seqs[:n], lengths[:n], decoded[:n]):
        target, output = s[half + 1 : half + 1 + k], d[half + 1 : half + 1 + k]
        ok = "yes" if (target == output).all() else "NO"
        rows.append([fmt(s[half - k : half]), fmt(output), fmt(target), ok])
    fig, ax = plt.subplots(figsize=(11, 0.35 * n + 1))
    ax.axis("off")
    table = ax.table(rows, colLabels=["input", "greedy output", "target", "exact"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width([0, 1, 2, 3])
    ax.set_title("Held-out examples (greedy decoding, own outputs fed back)")
    fig.tight_layout()
    rd.save_figure(fig, path)


def main(cfg: rd.Config) -> dict:
    rd.validate(cfg)
    key_train, key_heldout, key_model = jax.random.split(jax.random.key(cfg.seed), 3)
    train_seqs, train_lengths, seqs, lengths = rd.make_datasets(cfg, key_train, key_heldout)
    params, train_losses, heldout_losses, _ = rd.train(
        cfg, key_model, train_seqs, train_lengths, seqs, lengths
    )
    heldout = rd.evaluate(params, seqs, lengths, cfg)
    metrics = {"study": "reverse_digits_by_length", "seed": cfg.seed,
               "exact_match": heldout["exact_match"]}  # fmt: skip
    mask = np.asarray(rd.loss_mask(jnp.asarray(lengths), seqs.shape[1]))  # the output slots
    hit = (heldout["decoded"][:, 1:] == seqs[:, 1:]) & mask
    for k in range(1, cfg.seq_len + 1):
        rows = lengths == k
        metrics[f"count_length_{k}"] = int(rows.sum())
        if rows.any():
            metrics[f"exact_match_length_{k}"] = float(heldout["exact_rows"][rows].mean())
            metrics[f"token_accuracy_length_{k}"] = float(hit[rows].sum() / mask[rows].sum())
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("exact")))
    with rd.staged_run(cfg.out_dir) as out:
        plot_loss(train_losses, heldout_losses, out / "loss.png")
        plot_examples(seqs, lengths, heldout["decoded"], cfg, out / "examples.png")
        rd.write_metrics(out, cfg, metrics)
    return metrics


if __name__ == "__main__":
    main(tyro.cli(rd.Config, default=DEFAULT))
