"""Run the side investigations: every studies/<task>_<topic>.py, or those of the tasks named.

    python scripts/run_studies.py                 # all
    python scripts/run_studies.py hdqn bmg        # the studies of these tasks

Each study imports its task, writes runs/<task>/study/<topic>/ and runs in its own process; a
failed study is reported and the others still run.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = sorted((p.stem for p in (ROOT / "tasks").glob("*.py")), key=len, reverse=True)


def task_of(study: pathlib.Path) -> str:
    return next((t for t in TASKS if study.stem.startswith(t + "_")), "")


def main(argv: list[str]) -> int:
    unknown = [t for t in argv if t not in TASKS]
    if unknown:
        print(f"error: unknown task(s) {unknown}; choose from {sorted(TASKS)}", file=sys.stderr)
        return 2
    studies = [s for s in sorted((ROOT / "studies").glob("*.py")) if not argv or task_of(s) in argv]
    failed = []
    for study in studies:
        print(f"=== {study.relative_to(ROOT)}", flush=True)
        if subprocess.run([sys.executable, str(study)], cwd=ROOT).returncode != 0:
            failed.append(study.name)
    print(f"{len(studies) - len(failed)} of {len(studies)} studies ran; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
