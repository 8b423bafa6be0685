"""Run every task at its defaults, then write runs/REPORT.md (and, with --readme, the README table).

    python scripts/run_all.py                        # every task, one after another
    python scripts/run_all.py flow_matching diffusion
    python scripts/run_all.py --report-only          # rebuild the report from runs/ as it is
    python scripts/run_all.py --report-only --readme # also refresh README.md and docs/ figures

A run never rewrites tracked files (README.md, docs/) unless --readme is given: `make readme` is the
deliberate refresh, after a full `make run`.

Each task runs as `python tasks/<task>.py --out-dir runs/<task>` in its own process; its output goes
to runs/<task>/log.txt. A task that fails is reported as failed, with its last error line, and the
rest still run. The report gathers every runs/<task>/metrics.json present, checks each headline
metric against its bar (from the task's issue), embeds the figures, and copies each task's main
figure, shrunk, to docs/ for the README.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
DOCS = ROOT / "docs"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Task:
    framework: str
    summary: str
    time_bar_s: float
    headline: list[str]
    # label -> Python expression over the metrics; True means the bar is met.
    checks: dict[str, str] = field(default_factory=dict)
    # the figure shown in the README (a file in runs/<task>/)
    figure: str = ""


# The bars come from the issues. Order is the README's order.
TASKS: dict[str, Task] = {
    "rand_transformer": Task(
        "JAX",
        "causal transformer generating uniform numbers in [0, 100]",
        60,
        ["nll", "nll_floor", "chi2_p", "serial_p", "tv_uniform", "tv_numpy"],
        {
            "NLL within 0.01 nats of the floor": "abs(nll - nll_floor) <= 0.01",
            "chi-square p > 0.01": "chi2_p > 0.01",
            "serial p > 0.01": "serial_p > 0.01",
        },
        "histogram.png",
    ),
    "shakespeare_ppo": Task(
        "JAX",
        "PPO writes Shakespeare-like lines",
        300,
        [
            "judge_name",
            "judge_reference",
            "judge_ppo",
            "judge_ppo_std",
            "ppo_distinct2",
            "ppo_longest_copy_words",
            "reference_longest_copy_words",
        ],
        {
            "independent judge prefers PPO by more than the seed spread": (
                "judge_ppo - judge_reference > judge_ppo_std"
            ),
            "PPO copies no longer spans than the reference (or none over 6 words)": (
                "ppo_longest_copy_words <= max(reference_longest_copy_words, 6)"
            ),
            "distinct-2 >= 0.5": "ppo_distinct2 >= 0.5",
        },
        "reward_curve.png",
    ),
    "cot": Task(
        "JAX",
        "chain-of-thought tokens vs direct answers",
        240,
        [
            "systematic_heldout_tv_excess_cot",
            "systematic_heldout_tv_excess_direct",
            "systematic_heldout_validity_cot",
            "systematic_heldout_validity_direct",
            "heldout_tv_cot",
            "heldout_tv_direct",
            "num_seeds",
        ],
        {
            "systematic split: CoT TV excess <= half direct's": (
                "systematic_heldout_tv_excess_cot <= 0.5 * systematic_heldout_tv_excess_direct"
            ),
            "systematic split: CoT validity >= 0.95 (worst seed)": (
                "systematic_heldout_validity_cot_min >= 0.95"
            ),
            ">= 3 seeds": "num_seeds >= 3",
        },
        "distributions.png",
    ),
    "flow_matching": Task(
        "JAX",
        "conditional flow matching on two moons",
        90,
        ["w2", "w2_floor", "w2_ratio", "nfe"],
        {"W2 ratio <= 1.2": "w2_ratio <= 1.2"},
        "field.png",
    ),
    "hdqn": Task(
        "JAX",
        "hierarchical DQN on the 6-state stochastic MDP",
        180,
        ["hdqn_reward", "dqn_reward", "optimal_reward", "num_seeds"],
        {
            "h-DQN >= 0.13": "hdqn_reward >= 0.13",
            "h-DQN >= 2x flat DQN": "hdqn_reward >= 2 * dqn_reward",
        },
        "reward.png",
    ),
    "diffusion": Task(
        "JAX",
        "DDPM with a short schedule on two moons",
        90,
        ["w2", "w2_floor", "w2_ratio", "nfe", "alpha_bar_T"],
        {"W2 ratio <= 1.2": "w2_ratio <= 1.2", "alpha_bar_T ~ 0": "alpha_bar_T < 1e-3"},
        "reverse.png",
    ),
    "llama3_sft": Task(
        "PyTorch",
        "LoRA finetuning of a Llama-architecture LM on the sonnets",
        600,
        [
            "model_used",
            "ppl_before",
            "ppl_after",
            "embed_sim_before",
            "embed_sim_after",
            "flagged_copies",
        ],
        {
            "held-out perplexity >= 25% lower": "ppl_after <= 0.75 * ppl_before",
            "more corpus-like by embeddings": "embed_sim_after > embed_sim_before",
            "no flagged copies": "flagged_copies == 0",
        },
        "perplexity.png",
    ),
    "beam_search": Task(
        "PyTorch",
        "beam search by hand, width 10, checked against generate",
        120,
        ["model_used", "num_contexts", "matches_generate", "speed_ratio_vs_generate"],
        {
            "same output as generate": "matches_generate == 1",
            "speed >= 0.8x generate": "speed_ratio_vs_generate >= 0.8",
        },
        "beam_scores.png",
    ),
    "reverse_digits": Task(
        "JAX",
        "hand-written decoder-only transformer reversing tokens",
        120,
        ["exact_match", "token_accuracy", "train_exact_match", "seq_len", "vocab_size"],
        {"held-out exact match >= 0.99": "exact_match >= 0.99"},
        "attention.png",
    ),
    "scaling_laws": Task(
        "JAX",
        "validation loss vs model and data size for an MNIST CNN",
        300,
        ["model_alpha", "model_r2", "data_alpha", "data_r2", "joint_alpha", "joint_beta"],
        {"model fit R2 >= 0.95": "model_r2 >= 0.95", "data fit R2 >= 0.95": "data_r2 >= 0.95"},
        "scaling.png",
    ),
    "optimization": Task(
        "JAX",
        "SGD, momentum, Nesterov and Adam by hand vs optax on MNIST",
        240,
        [
            "test_accuracy_adam_hand",
            "test_accuracy_adam_optax",
            "max_rel_param_diff_sgd",
            "max_rel_param_diff_momentum",
            "max_rel_param_diff_nesterov",
            "max_rel_param_diff_adam",
        ],
        {
            "hand == optax to 1e-5 (all four)": "max(max_rel_param_diff_sgd, "
            "max_rel_param_diff_momentum, max_rel_param_diff_nesterov, "
            "max_rel_param_diff_adam) <= 1e-5",
            "Adam test accuracy >= 98.5%": "test_accuracy_adam_hand >= 0.985",
            "hand and optax accuracies within 0.1 points": "max(abs(m[f'test_accuracy_{o}_hand']"
            " - m[f'test_accuracy_{o}_optax']) for o in ('sgd', 'momentum', 'nesterov', 'adam'))"
            " <= 0.001",
        },
        "loss_curves.png",
    ),
    "interpret": Task(
        "JAX",
        "deep dream and class visualisation on an MNIST CNN, with a report",
        180,
        ["test_accuracy", "min_classvis_confidence", "num_findings"],
        {
            "test accuracy >= 99.0%": "test_accuracy >= 0.99",
            "every class visualisation >= 0.9 confident": "min_classvis_confidence >= 0.9",
            ">= 4 measured findings": "num_findings >= 4",
        },
        "class_visualisations.png",
    ),
    "red_team": Task(
        "PyTorch",
        "red-teaming an LM, with a toxicity classifier and bias probes",
        300,
        [
            "model_used",
            "classifier_used",
            "num_prompts",
            "expected_max_toxicity",
            "toxicity_probability",
            "max_group_gap",
        ],
        {
            ">= 100 prompts scored": "num_prompts >= 100",
            "toxic control >= 0.5": "control_toxic_score >= 0.5",
            "benign control < 0.5": "control_benign_score < 0.5",
        },
        "toxicity.png",
    ),
    "bmg": Task(
        "JAX",
        "Bootstrapped Meta-Gradients vs MG vs fixed epsilon (A2C)",
        300,
        [
            "bmg_cumulative_reward",
            "mg_cumulative_reward",
            "best_fixed_cumulative_reward",
            "num_seeds",
        ],
        {
            "BMG above MG": "bmg_cumulative_reward > mg_cumulative_reward",
            "BMG above best fixed epsilon": "bmg_cumulative_reward > best_fixed_cumulative_reward",
            "BMG's epsilon rises after a swap": "bmg_eps_after_swap > bmg_eps_before_swap",
            "best fixed epsilon positive in red phases": "best_fixed_red_phase_reward > 0",
            "best fixed epsilon positive in blue phases": "best_fixed_blue_phase_reward > 0",
            ">= 10 seeds": "num_seeds >= 10",
        },
        "cumulative_reward.png",
    ),
}


def run_task(name: str) -> dict:
    """Run one task in its own process; return its status (ok or failed, the error, the time)."""
    out = RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a failed run must not show stale numbers
    start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tasks" / f"{name}.py"), "--out-dir", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    elapsed = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    lines = (out / "log.txt").read_text(errors="replace").strip().splitlines()
    ok = proc.returncode == 0 and (out / "metrics.json").exists()
    status = {
        "task": name,
        "ok": ok,
        "process_time_s": round(elapsed, 1),
        # CPU time (user + sys) of the task's process: unlike wall time, it barely changes when
        # other work shares the machine.
        "cpu_time_s": round(cpu, 1),
        "error": "" if ok else (lines[-1] if lines else f"exit code {proc.returncode}"),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    (out / "status.json").write_text(json.dumps(status, indent=1))
    return status


def evaluate_checks(task: Task, metrics: dict) -> dict[str, bool | None]:
    """Each bar: True (met), False (missed) or None (its metric is missing)."""
    results: dict[str, bool | None] = {}
    bars = dict(task.checks)
    bars[f"wall time <= {task.time_bar_s:.0f} s"] = f"wall_time_s <= {task.time_bar_s}"
    for label, expr in bars.items():
        try:
            # the metrics are globals, so that generator expressions in a bar can see them
            namespace = {"abs": abs, "max": max, "min": min, **metrics, "m": metrics}
            results[label] = bool(eval(expr, namespace))
        except (NameError, KeyError, TypeError):
            results[label] = None
    return results


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mark(ok: bool | None) -> str:
    return {True: "pass", False: "MISS", None: "n/a"}[ok]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def shrink_figure(src: pathlib.Path, dst: pathlib.Path, width: int = 480) -> None:
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        DOCS.mkdir(exist_ok=True)
        im.save(dst, optimize=True)


def build_report() -> list[dict]:
    """Write runs/REPORT.md and the README table from whatever runs/ holds; return the rows."""
    rows = []
    sections = []
    for name, task in TASKS.items():
        out = RUNS / name
        status = (
            json.loads((out / "status.json").read_text())
            if (out / "status.json").exists()
            else None
        )
        metrics = (
            json.loads((out / "metrics.json").read_text())
            if (out / "metrics.json").exists()
            else None
        )
        exists = (ROOT / "tasks" / f"{name}.py").exists()
        if (
            status
            and metrics
            and abs((out / "metrics.json").stat().st_mtime - (out / "status.json").stat().st_mtime)
            > 120
        ):
            status = None  # the metrics come from a later direct run of the task, not this one
        if metrics is None:
            state = "not yet" if not exists else ("failed" if status else "not run")
            rows.append(
                {
                    "task": name,
                    "task_obj": task,
                    "state": state,
                    "metrics": None,
                    "checks": {},
                    "error": (status or {}).get("error", ""),
                }
            )
            sections.append(
                f"## {name}\n\n{state}"
                + (f": `{status['error']}`" if status and status.get("error") else "")
                + "\n"
            )
            continue
        checks = evaluate_checks(task, metrics)
        state = "pass" if all(checks.values()) else "MISS"
        rows.append(
            {
                "task": name,
                "task_obj": task,
                "state": state,
                "metrics": metrics,
                "checks": checks,
                "error": "",
                "status": status,
            }
        )
        lines = [f"## {name} ({task.framework}): {task.summary}", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]
        lines += ["", "| bar | result |", "|---|---|"]
        lines += [f"| {label} | {mark(ok)} |" for label, ok in checks.items()]
        lines.append("")
        for fig in sorted(out.glob("*.png")) + sorted(out.glob("*.gif")):
            lines.append(f"![{fig.stem}]({name}/{fig.name})")
        sections.append("\n".join(lines) + "\n")

    header = [
        "# Toy Examples: run report",
        "",
        f"Written {datetime.datetime.now().isoformat(timespec='seconds')} on {machine()}.",
        "",
        "| task | state | headline | device | preset | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = ", ".join(
            f"{k}={fmt(r['metrics'][k])}"
            for k in r["task_obj"].headline
            if r["metrics"] and k in r["metrics"]
        )
        m = r["metrics"] or {}
        wall = fmt(m["wall_time_s"]) if m else ""
        device, preset = m.get("device", ""), m.get("preset", "")
        link = f"[{r['task']}](#{r['task']})"
        header.append(f"| {link} | {r['state']} | {head} | {device} | {preset} | {wall} |")
    RUNS.mkdir(exist_ok=True)
    tmp = RUNS / "REPORT.md.tmp"
    tmp.write_text("\n".join(header) + "\n\n" + "\n".join(sections))
    os.replace(tmp, RUNS / "REPORT.md")
    return rows


def update_readme(rows: list[dict]) -> None:
    """Replace the README's results table (between the markers) with the measured rows."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if not README.exists() or start not in README.read_text():
        return
    table = [
        f"Measured by `make run` on {machine()}.",
        "",
        "| task | framework | headline (measured) | bars | wall time (CPU time) in s | figure |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["task_obj"]
        fig = RUNS / r["task"] / t.figure
        if r["metrics"] is not None and t.figure and fig.exists():
            shrink_figure(fig, DOCS / f"{r['task']}.png")
        if r["metrics"] is None:
            table.append(f"| `{r['task']}.py` | {t.framework} | {r['state']} | | | |")
            continue
        m = r["metrics"]
        head = "<br>".join(f"{k} = {fmt(m[k])}" for k in t.headline if k in m)
        bars = "<br>".join(f"{mark(ok)}: {label}" for label, ok in r["checks"].items())
        fig = f"[figure](docs/{r['task']}.png)" if (DOCS / f"{r['task']}.png").exists() else ""
        cpu = r["status"].get("cpu_time_s") if r["status"] else None
        wall = fmt(m["wall_time_s"]) + (f" ({cpu:.0f})" if cpu is not None else "")
        table.append(f"| `{r['task']}.py` | {t.framework} | {head} | {bars} | {wall} | {fig} |")
    text = README.read_text()
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    README.write_text(before + start + "\n" + "\n".join(table) + "\n" + end + after)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run tasks at their defaults and write runs/REPORT.md.",
        epilog=f"tasks: {' '.join(TASKS)}",
    )
    parser.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to run (default: all)")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from runs/, run nothing"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="also rewrite README.md's results table and the docs/ figures (make readme)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.tasks if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = args.tasks or list(TASKS)
    statuses = []
    if not args.report_only:
        for name in names:
            print(f"=== {name} ...", flush=True)
            s = run_task(name)
            print(
                f"=== {name}: {'ok' if s['ok'] else 'FAILED: ' + s['error']} "
                f"({s['process_time_s']} s)",
                flush=True,
            )
            statuses.append(s)
    rows = build_report()
    if args.readme:
        update_readme(rows)
        print(f"README.md and docs/ figures refreshed from {RUNS}")
    print(f"\n{'task':<18} {'state':<8} {'device':<10} {'wall s':>8}  bars")
    for r in rows:
        if r["task"] not in names and r["metrics"] is None:
            continue
        wall = fmt(r["metrics"]["wall_time_s"]) if r["metrics"] else "-"
        device = str(r["metrics"].get("device", "?")) if r["metrics"] else "-"
        bars = " ".join(mark(ok) for ok in r["checks"].values())
        print(f"{r['task']:<18} {r['state']:<8} {device:<10} {wall:>8}  {bars} {r['error']}")
    print(f"\nreport: {RUNS / 'REPORT.md'}")
    return 0 if all(s["ok"] for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
