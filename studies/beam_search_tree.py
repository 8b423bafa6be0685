"""What does the search look like? The tree of running beams of the task's first context.

The task (tasks/beam_search.py) checks beam search against `generate` and sets it beside greedy
decoding and sampling; this study decodes the same batch with the same settings and draws the
search of the first context (search_tree.png): the B running beams at every decoding step, ranked
by summed log-prob (rank 0 = best), an edge from each to the beam it extends, the token it added,
and the returned hypothesis in red. The beams share their prefixes: the final ones often differ
in a token or two near the end. It also writes metrics.json (steps, best score) and config.json.

    python studies/beam_search_tree.py           # runs/beam_search/study/tree/
    python studies/beam_search_tree.py --help    # the task's flags
"""

import dataclasses
import json
import pathlib
import sys

import matplotlib.pyplot as plt
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import beam_search as bs  # noqa: E402

DEFAULT = dataclasses.replace(bs.Config(), out_dir="runs/beam_search/study/tree")


def plot_search_tree(path, trace: list, tokenizer, best: list[int], context: str, model_used):
    """Running beams per step (rank 0 = best), edges to the beam each one extends."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    prefixes = [[]] * len(trace[0]["parents"])
    for t, step in enumerate(trace):
        new_prefixes = []
        for rank, (par, tok) in enumerate(zip(step["parents"], step["tokens"])):
            new_prefixes.append(prefixes[par] + [tok])
            on_best = new_prefixes[-1] == best[: t + 1]
            if t > 0:
                ax.plot(
                    [t - 1, t], [par, rank], c="C3" if on_best else "0.75", lw=2 if on_best else 1
                )
            ax.scatter(t, rank, s=12, c="C3" if on_best else "0.4", zorder=3)
            if rank < 4 or on_best:
                label = tokenizer.decode([tok]).replace("\n", "\\n")[:8]
                ax.text(t, rank - 0.25, label, fontsize=6, ha="center", rotation=30)
        prefixes = new_prefixes
    ax.invert_yaxis()
    ax.set(xlabel="decoding step", ylabel="beam rank (by summed log-prob)")
    ax.set_title(f"Search tree, width {len(prefixes)}, {model_used}: {context!r} (red: returned)")
    fig.tight_layout()
    bs.save_figure(fig, path)


def main(cfg: bs.Config) -> dict:
    """Decode the task's batch (its contexts, left-padded, and its settings), tracing item 0."""
    bs.validate(cfg)
    model, tokenizer, model_used, _ = bs.load_causal_lm(cfg.model, bs.pick_device(cfg.device))
    tokenizer.padding_side = "left"
    contexts = list(bs.CONTEXTS[: cfg.num_contexts])
    enc = tokenizer(contexts, return_tensors="pt", padding=True).to(model.device)
    trace = []
    seqs, scores = bs.beam_search(
        model, enc["input_ids"], enc["attention_mask"], num_beams=cfg.num_beams,
        max_new_tokens=cfg.max_new_tokens, length_penalty=cfg.length_penalty,
        early_stopping=cfg.early_stopping, num_return_sequences=cfg.num_beams,
        pad_token_id=tokenizer.pad_token_id, trace=trace,
    )  # fmt: skip
    eos = bs.special_ids(model)[0]
    best = bs.strip_generated(seqs[:1], enc["input_ids"].shape[1], eos)[0]  # context 0's best
    metrics = {
        "study": "beam_search_tree", "seed": cfg.seed, "model_used": model_used,
        "num_beams": cfg.num_beams, "steps": len(trace), "best_score": float(scores[0]),
        "best_text": tokenizer.decode(best),
    }  # fmt: skip
    with bs.staged_run(cfg.out_dir) as out:
        plot_search_tree(out / "search_tree.png", trace, tokenizer, best, contexts[0], model_used)
        bs.write_metrics(out, cfg, metrics)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(tyro.cli(bs.Config, default=DEFAULT))
