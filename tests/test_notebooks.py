"""A task file converts to a notebook and runs there: tyro must not read the kernel's argv.

`make notebooks` (scripts/build_notebooks.py) builds all 14 at their defaults; this test builds one
with a tiny config, so a change that breaks notebooks fails CI.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rand_transformer_notebook_executes(tmp_path):
    out = tmp_path / "run"
    args = f"--context-len 8 --steps 30 --num-samples 200 --out-dir {out}"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_notebooks.py"), "rand_transformer"]
    cmd += ["--args", args, "--out-dir", str(tmp_path), "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nb = json.loads((tmp_path / "rand_transformer.ipynb").read_text())
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds[0] == "markdown" and "code" in kinds
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "rand_transformer" and metrics["num_samples"] == 200
