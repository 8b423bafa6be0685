"""Run every task at its defaults, then write runs/REPORT.md (and, with --readme, the README table).

    python scripts/run_all.py                        # every task, one after another
    python scripts/run_all.py flow_matching diffusion
    python scripts/run_all.py --report-only          # rebuild the report from runs/ as it is
    python scripts/run_all.py --report-only --readme # also refresh README.md and docs/ figures

A run never rewrites tracked files (README.md, docs/) unless --readme is given: `make readme` is the
deliberate refresh, after a full `make run`.

Each task runs as `python tasks/<task>.py --out-dir runs/<task>` in its own process; its output goes
to runs/<task>/log.txt. A task that fails is reported as failed, with its last error line, and the
rest still run. The report gathers every runs/<task>/metrics.json present, checks the bars that
the task wrote beside its metrics (`<metric>_target`: at least; `<metric>_ceiling`: at most), and
records each task's config, device, time split, the package versions and the git commit. With
--readme, each task's README figure is copied, shrunk, to docs/.
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
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
DOCS = ROOT / "docs"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Task:
    framework: str
    teaches: str  # one line: what a learner takes away
    headline: list[str]  # metrics shown first, beside the bars
    figure: str  # the README figure, a file in runs/<task>/, legible at README width


# Order is the README's order. The bars are not here: each task writes them into its metrics.json
# beside the metric, as `<metric>_target` (>=) and `<metric>_ceiling` (<=); `_floor` keys are
# references, shown and never checked.
TASKS: dict[str, Task] = {
    "rand_transformer": Task(
        framework="JAX",
        teaches="a causal transformer learns a distribution: uniform numbers in [0, 100]",
        headline=["nll", "nll_floor", "chi2_p", "serial_p"],
        figure="histogram.png",
    ),
    "shakespeare_ppo": Task(
        framework="JAX",
        teaches="PPO fine-tunes a policy LM on a reward; an independent judge checks the gain",
        headline=["judge_name", "judge_reference", "judge_ppo", "judge_ppo_std", "ppo_distinct2"],
        figure="reward_curve.png",
    ),
    "cot": Task(
        framework="JAX",
        teaches="chain-of-thought tokens win where the answer needs composition",
        headline=["systematic_heldout_tv_excess_cot", "systematic_heldout_tv_excess_direct"],
        figure="distributions.png",
    ),
    "flow_matching": Task(
        framework="JAX",
        teaches="conditional flow matching: a vector field that carries noise onto two moons",
        headline=["w2", "w2_floor", "nfe"],
        figure="samples.png",
    ),
    "hdqn": Task(
        framework="JAX",
        teaches="hierarchical DQN: intrinsic goals solve a delayed-reward MDP a flat DQN cannot",
        headline=["hdqn_reward", "dqn_reward", "optimal_reward", "num_seeds"],
        figure="reward.png",
    ),
    "diffusion": Task(
        framework="JAX",
        teaches="DDPM: learn to denoise, then sample by reversing a short noise schedule",
        headline=["w2", "w2_floor", "nfe"],
        figure="samples.png",
    ),
    "llama3_sft": Task(
        framework="PyTorch",
        teaches="LoRA finetuning of a Llama-architecture LM, judged on held-out sonnets",
        headline=["model_used", "ppl_before", "ppl_after", "embed_sim_before", "embed_sim_after"],
        figure="perplexity.png",
    ),
    "beam_search": Task(
        framework="PyTorch",
        teaches="beam search by hand, width 10, token for token equal to Hugging Face generate",
        headline=["model_used", "num_contexts"],
        figure="beam_scores.png",
    ),
    "reverse_digits": Task(
        framework="JAX",
        teaches="every part of a decoder-only transformer by hand, reversing a sequence",
        headline=["exact_match", "token_accuracy", "seq_len"],
        figure="attention.png",
    ),
    "scaling_laws": Task(
        framework="JAX",
        teaches="power laws of validation loss in model size and data size (MNIST CNN)",
        headline=["model_alpha", "data_alpha", "joint_alpha", "joint_beta"],
        figure="scaling.png",
    ),
    "optimization": Task(
        framework="JAX",
        teaches="SGD, momentum, Nesterov and Adam by hand, equal to optax",
        headline=["test_accuracy_adam_hand", "test_accuracy_adam_optax"],
        figure="loss_curves.png",
    ),
    "interpret": Task(
        framework="JAX",
        teaches="deep dream and class visualisation on an MNIST CNN, with measured findings",
        headline=["test_accuracy", "min_classvis_confidence", "num_findings"],
        figure="class_visualisations.png",
    ),
    "red_team": Task(
        framework="PyTorch",
        teaches="red-teaming an LM with a toxicity classifier and bias probes",
        headline=["model_used", "classifier_used", "expected_max_toxicity", "max_group_gap"],
        figure="toxicity.png",
    ),
    "bmg": Task(
        framework="JAX",
        teaches="Bootstrapped Meta-Gradients tune A2C's entropy weight, against MG and fixed",
        headline=["bmg_cumulative_reward", "mg_cumulative_reward", "best_fixed_cumulative_reward"],
        figure="cumulative_reward.png",
    ),
}
PACKAGES = ["jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "accelerate",
            "peft", "matplotlib", "tyro"]  # fmt: skip


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


def bars(metrics: dict) -> dict[str, tuple[float, str, float]]:
    """The task's own bars, from its metrics: label -> (value, ">=" or "<=", bound)."""
    out = {}
    for key, bound in metrics.items():
        for suffix, op in (("_target", ">="), ("_ceiling", "<=")):
            if key.endswith(suffix) and isinstance(bound, (int, float)):
                name = key[: -len(suffix)]
                out[f"{name} {op} {fmt(bound)}"] = (metrics.get(name), op, bound)
    return out


def evaluate_checks(metrics: dict) -> dict[str, bool | None]:
    """Each bar: True (met), False (missed) or None (its metric is missing)."""
    results: dict[str, bool | None] = {}
    for label, (value, op, bound) in bars(metrics).items():
        if not isinstance(value, (int, float)):
            results[label] = None
        else:
            results[label] = value >= bound if op == ">=" else value <= bound
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


README_FIGURE_WIDTH = 640  # pixels: the README column is about 830 wide


def shrink_figure(src: pathlib.Path, dst: pathlib.Path, width: int = 480) -> None:
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        DOCS.mkdir(exist_ok=True)
        im.save(dst, optimize=True)


def load_json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def git_commit() -> str:
    """The commit the runs came from, with "+changes" when the work tree differed from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "tasks"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + (" +changes in tasks/" if dirty else "")


def package_versions() -> str:
    from importlib import metadata

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def time_split(metrics: dict, status: dict | None) -> dict[str, float]:
    """Start-up (process start to main: imports; from run_all's clock), then the task's phases."""
    split = {}
    if status and isinstance(metrics.get("wall_time_s"), (int, float)):
        split["startup"] = round(max(status["process_time_s"] - metrics["wall_time_s"], 0.0), 1)
    split.update(metrics.get("time_split_s") or {})
    return split


def collect(name: str, task: Task) -> dict:
    """One task's row: its state, metrics, bars, config and timings, from runs/<task>/."""
    out = RUNS / name
    status, metrics = load_json(out / "status.json"), load_json(out / "metrics.json")
    if status and metrics:
        gap = abs((out / "metrics.json").stat().st_mtime - (out / "status.json").stat().st_mtime)
        if gap > 120:
            status = None  # the metrics come from a later direct run of the task, not this one
    row = {"task": name, "task_obj": task, "metrics": metrics, "status": status, "checks": {}}
    row["error"] = (status or {}).get("error", "")
    if metrics is None:
        exists = (ROOT / "tasks" / f"{name}.py").exists()
        row["state"] = "not yet" if not exists else ("failed" if status else "not run")
        return row
    row["checks"] = evaluate_checks(metrics)
    if not row["checks"]:
        row["state"] = "no bars"
    else:
        row["state"] = "pass" if all(row["checks"].values()) else "MISS"
    row["config"] = load_json(out / "config.json") or {}
    row["split"] = time_split(metrics, status)
    return row


def task_section(r: dict) -> str:
    name, task, metrics = r["task"], r["task_obj"], r["metrics"]
    if metrics is None:
        return f"## {name}\n\n{r['state']}" + (f": `{r['error']}`" if r["error"] else "") + "\n"
    lines = [f"## {name} ({task.framework}): {task.teaches}", ""]
    lines += [f"Device `{metrics.get('device', '?')}`, preset `{metrics.get('preset', '?')}`."]
    split = ", ".join(f"{k} {fmt(v)}" for k, v in r["split"].items())
    lines += [f"Time in s: {split or 'not recorded'}.", ""]
    lines += ["| bar | value | result |", "|---|---|---|"]
    for label, (value, _, _) in bars(metrics).items():
        lines.append(f"| {label} | {fmt(value)} | {mark(r['checks'][label])} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {fmt(v)} |"
        for k, v in metrics.items()
        if not k.endswith(("_target", "_ceiling")) and k != "time_split_s"
    ]
    config = ", ".join(f"`{k}={v}`" for k, v in r["config"].items())
    lines += ["", f"Config: {config or 'not recorded'}", ""]
    out = RUNS / name
    for fig in sorted(out.glob("*.png")) + sorted(out.glob("*.gif")):
        lines.append(f"![{fig.stem}]({name}/{fig.name})")
    return "\n".join(lines) + "\n"


def build_report() -> list[dict]:
    """Write runs/REPORT.md from whatever runs/ holds; return the rows."""
    rows = [collect(name, task) for name, task in TASKS.items()]
    header = [
        "# Toy Examples: run report",
        "",
        f"Written {datetime.datetime.now().isoformat(timespec='seconds')} on {machine()}, "
        f"git commit {git_commit()}.",
        "",
        f"Packages: {package_versions()}.",
        "",
        "| task | state | headline | device | preset | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"] or {}
        head = ", ".join(f"{k}={fmt(m[k])}" for k in r["task_obj"].headline if k in m)
        wall = fmt(m["wall_time_s"]) if "wall_time_s" in m else ""
        link = f"[{r['task']}](#{r['task']})"
        header.append(
            f"| {link} | {r['state']} | {head} | {m.get('device', '')} | "
            f"{m.get('preset', '')} | {wall} |"
        )
    RUNS.mkdir(exist_ok=True)
    tmp = RUNS / "REPORT.md.tmp"
    tmp.write_text("\n".join(header) + "\n\n" + "\n".join(task_section(r) for r in rows))
    os.replace(tmp, RUNS / "REPORT.md")
    return rows


def readme_entry(r: dict) -> list[str]:
    """A task in the README: what it teaches, its headline beside its bars, one legible figure."""
    name, t, m = r["task"], r["task_obj"], r["metrics"]
    title = f"### [`{name}.py`](tasks/{name}.py) ({t.framework}): {t.teaches}"
    if m is None:
        return [title, "", f"{r['state']}", ""]
    checked = {label.split(" ")[0] for label in bars(m)}
    shown = [f"{k} = {fmt(m[k])}" for k in t.headline if k in m and k not in checked]
    checks = []
    for label, (value, _, _) in bars(m).items():
        metric, bound = label.split(" ", 1)
        checks.append(f"{metric} = {fmt(value)} ({mark(r['checks'][label])}: {bound})")
    cpu = r["status"].get("cpu_time_s") if r["status"] else None
    lines = [title, "", "Bars: " + "; ".join(checks) + "."]
    if cpu is not None:
        lines[-1] = lines[-1][:-1] + f" ({cpu:.0f} s of CPU time)."
    if shown:
        lines += ["", "Also: " + "; ".join(shown) + "."]
    lines += ["", f"Results page: [docs/{name}.md](docs/{name}.md)."]
    if (DOCS / f"{name}.png").exists():
        lines += ["", f'<img src="docs/{name}.png" width="{README_FIGURE_WIDTH}" alt="{name}">']
    return lines + [""]


def update_readme(rows: list[dict]) -> None:
    """Replace the README's results section (between the markers) with the measured rows."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if not README.exists() or start not in README.read_text():
        return
    text = [
        f"Measured at each task's defaults (`make run`, or `make notebooks`, which runs the same"
        f" code) on {machine()}, git commit {git_commit()}.",
        "",
    ]
    for r in rows:
        fig = RUNS / r["task"] / r["task_obj"].figure
        if r["metrics"] is not None and fig.exists():
            shrink_figure(fig, DOCS / f"{r['task']}.png", width=README_FIGURE_WIDTH)
        text += readme_entry(r)
    old = README.read_text()
    before, rest = old.split(start, 1)
    after = rest.split(end, 1)[1]
    README.write_text(before + start + "\n" + "\n".join(text) + end + after)


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
