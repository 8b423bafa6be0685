"""Which prompts drew toxic output most often, and which groups? A report on a finished run of
tasks/red_team.py, read from the files it wrote (flagged.jsonl, metrics.json, config.json), so no
model runs again. It writes report.md (the prompts that most often drew toxic output, each with
its most toxic continuation), group_toxicity.png (mean toxicity per group of the bias probes) and
metrics.json (with the expected maximum toxicity of each prompt source).

    python tasks/red_team.py                   # the run, in runs/red_team/
    python studies/red_team_report.py          # writes runs/red_team/study/report/
    python studies/red_team_report.py --help
"""

import dataclasses
import json
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import red_team  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    run_dir: str = "runs/red_team"
    """a finished run of tasks/red_team.py"""
    top: int = 10
    """prompts listed in the report"""
    out_dir: str = "runs/red_team/study/report"
    """where report.md, group_toxicity.png and metrics.json go"""


def read_run(run_dir: str) -> tuple[list[dict], np.ndarray, np.ndarray, dict, dict]:
    """A run's prompts in order (each with its K continuations), toxicity and flags (prompts, K),
    its metrics and its config. flagged.jsonl holds K consecutive rows per prompt."""
    run = pathlib.Path(run_dir)
    rows = [json.loads(line) for line in (run / "flagged.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    k = config["num_continuations"]
    records = [
        dict(rows[i], continuations=[r["continuation"] for r in rows[i : i + k]])
        for i in range(0, len(rows), k)
    ]
    tox = np.array([r["toxicity"] for r in rows]).reshape(-1, k)
    flagged = np.array([r["flag"] for r in rows]).reshape(-1, k)
    return records, tox, flagged, json.loads((run / "metrics.json").read_text()), config


def write_report(path, records: list[dict], tox, flagged, m: dict, config: dict, top: int) -> list:
    """report.md: the prompts that most often drew toxic output (ties: by max toxicity)."""
    n_toxic = flagged.sum(1)
    order = sorted(range(len(records)), key=lambda i: (-n_toxic[i], -tox[i].max()))[:top]
    clean = lambda s: s.replace("\n", " ").replace("|", "/")  # noqa: E731
    lines = [
        "# Red-team report",
        "",
        f"target `{m['model_used']}`, red LM `{m['red_model_used']}`, "
        f"classifier `{m['classifier_used']}`",
        "",
        f"{m['num_prompts']} prompts x {config['num_continuations']} continuations; "
        f"expected max toxicity {m['expected_max_toxicity']:.3f}, toxicity probability "
        f"{m['toxicity_probability']:.3f}, max group gap {m['max_group_gap']:.3f}",
        "",
        f"## Prompts that most often drew toxic output (threshold {config['threshold']})",
        "",
        "| # toxic | max toxicity | source | prompt | most toxic continuation |",
        "|---|---|---|---|---|",
    ]
    for i in order:
        r, k = records[i], int(tox[i].argmax())
        lines.append(
            f"| {n_toxic[i]}/{tox.shape[1]} | {tox[i].max():.3f} | {r['source']} | "
            f"{clean(r['prompt'])} | {clean(r['continuations'][k])} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return [(records[i]["prompt"], int(n_toxic[i])) for i in order]


def plot_groups(path, per_group: dict[str, float], gap: float, model_used: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(per_group), list(per_group.values()), color="tab:purple")
    ax.set_xlabel("demographic group in the bias-probe template")
    ax.set_ylabel("mean toxicity of continuations")
    ax.set_title(f"Toxicity per group (max gap {gap:.3f}), {model_used}")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    red_team.save_figure(fig, path)


def main(cfg: StudyConfig) -> dict:
    red_team.check_number(cfg, "top", 1)
    if not all((pathlib.Path(cfg.run_dir) / f).is_file() for f in ("flagged.jsonl", "config.json")):
        raise red_team.option_error(
            "run_dir", cfg.run_dir, "holds no finished run; run `python tasks/red_team.py` first"
        )
    records, tox, flagged, task_metrics, config = read_run(cfg.run_dir)
    # expected max toxicity per prompt source (from the rows' toxicity, rounded to 5 decimals)
    by_source = red_team.group_metrics(tox.max(1, keepdims=True), [r["source"] for r in records])
    prefix = "toxicity_group_"
    per_group = {k[len(prefix) :]: v for k, v in task_metrics.items() if k.startswith(prefix)}
    with red_team.staged_run(cfg.out_dir) as out:
        worst = write_report(
            out / "report.md", records, tox, flagged, task_metrics, config, cfg.top
        )
        gap, model_used = task_metrics["max_group_gap"], task_metrics["model_used"]
        plot_groups(out / "group_toxicity.png", per_group, gap, model_used)
        metrics = {
            "study": "red_team_report",
            "run_dir": cfg.run_dir,
            "num_prompts": len(records),
            "most_toxic_prompt": worst[0][0],
            "most_toxic_prompt_n_toxic": worst[0][1],
            "max_group_gap": gap,
            **{f"expected_max_toxicity_{s}": v for s, v in by_source.items()},
        }
        red_team.write_metrics(out, cfg, metrics)
    print("prompts that most often drew toxic output:")
    for prompt, n in worst[:5]:
        print(f"  {n}/{tox.shape[1]}  {prompt!r}")
    return metrics


if __name__ == "__main__":
    try:
        main(tyro.cli(StudyConfig))
    except ValueError as err:  # a bad option: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
