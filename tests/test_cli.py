"""Every task, run from the command line with a bad option, prints one line and exits 2 at once."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (ROOT / "tasks").glob("*.py"))


def test_bad_seed_is_one_line_exit_2_for_every_task(tmp_path):
    """All 14 at once (2 cores): import, parse, validate, exit 2; nothing written to --out-dir."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    procs = {}
    for task in TASKS:
        cmd = [sys.executable, str(ROOT / "tasks" / f"{task}.py"), "--seed", "-1"]
        cmd += ["--out-dir", str(tmp_path / task)]
        procs[task] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for task, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (task, proc.returncode, err[-500:])
        assert len(lines) == 1 and lines[0].startswith("error: --seed -1: "), (task, err)
        assert "Traceback" not in out + err, task
        assert not (tmp_path / task).exists(), f"{task} wrote its out-dir before failing"
