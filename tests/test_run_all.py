"""scripts/run_all.py reads each task's bars from its metrics.json and reports them."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_all", ROOT / "scripts" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)


def test_bars_come_from_target_and_ceiling_keys():
    metrics = {"w2_ratio": 1.3, "w2_ratio_ceiling": 1.2, "acc": 0.99, "acc_target": 0.985}
    metrics |= {"w2_floor": 0.04, "missing_target": 1}
    checks = run_all.evaluate_checks(metrics)
    assert checks == {"w2_ratio <= 1.2": False, "acc >= 0.985": True, "missing >= 1": None}


def test_report_and_readme_from_runs(tmp_path, monkeypatch):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- results:start -->\nold\n<!-- results:end -->\nbottom\n")
    monkeypatch.setattr(run_all, "RUNS", runs)
    monkeypatch.setattr(run_all, "DOCS", docs)
    monkeypatch.setattr(run_all, "README", readme)
    out = runs / "flow_matching"
    out.mkdir(parents=True)
    metrics = {"w2": 0.043, "w2_ratio": 1.02, "w2_ratio_ceiling": 1.2, "wall_time_s": 30.0}
    metrics |= {"wall_time_s_ceiling": 90, "device": "cpu:cpu", "preset": "cpu"}
    metrics |= {"time_split_s": {"setup": 5.0, "train": 20.0, "evaluate": 3.0, "figures": 2.0}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "config.json").write_text(json.dumps({"seed": 0, "steps": 100}))
    rows = run_all.build_report()
    row = next(r for r in rows if r["task"] == "flow_matching")
    assert row["state"] == "pass" and row["config"] == {"seed": 0, "steps": 100}
    report = (runs / "REPORT.md").read_text()
    assert "git commit" in report and "Packages:" in report and "`steps=100`" in report
    assert "| w2_ratio <= 1.2 | 1.02 | pass |" in report and "train 20" in report
    assert "not run" in report  # the other tasks
    run_all.update_readme(rows)
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith("bottom\n") and "old" not in text
    assert "w2_ratio = 1.02 (pass: <= 1.2)" in text and "docs/flow_matching.md" in text
