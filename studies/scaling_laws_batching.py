"""Does training the runs of one width together (vmapped) beat running them in turn, here?

tasks/scaling_laws.py batches the runs of a width (one `vmap`ped program, the run axis sharded
over the devices) only on an accelerator: on the 2-core CPU it measured no faster. This study
re-measures that on the machine at hand: the same runs of one width (different data sizes, one
seed), sequential and batched, their CPU and wall time after compilation, and checks that both
paths give the same validation curves.

    python studies/scaling_laws_batching.py                 # width 16, 4 runs of 400 steps
    python studies/scaling_laws_batching.py --channels 4 --num-runs 8 --out-dir /tmp/batching
"""

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
import scaling_laws  # noqa: E402


def timed(fn):
    """(result, CPU seconds, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def measure(channels: int, num_runs: int, steps: int, seed: int = 0) -> dict:
    """Sequential against batched for `num_runs` runs of one width (data sizes 1, 1/2, ...)."""
    cfg = scaling_laws.Config(steps=steps, eval_every=steps // 4, num_seeds=1, seed=seed)
    data = scaling_laws.load_splits(cfg)
    num_train = data["train_x"].shape[0]
    runs = [(channels, num_train // 2**k) for k in range(num_runs)]
    out = {"channels": channels, "num_runs": num_runs, "steps": steps}
    for name, batched in (("sequential", False), ("batched", True)):
        scaling_laws.run_sweeps(cfg, data, runs[:1] if not batched else runs, batched)  # compile
        results, cpu, wall = timed(lambda b=batched: scaling_laws.run_sweeps(cfg, data, runs, b))
        out |= {f"{name}_cpu_s": cpu, f"{name}_wall_s": wall}
        out[f"{name}_curves"] = [r["val_loss_curve"] for r in results]
    seq, bat = np.array(out.pop("sequential_curves")), np.array(out.pop("batched_curves"))
    out["max_curve_difference"] = float(np.abs(seq - bat).max())
    out["batched_over_sequential_cpu"] = out["batched_cpu_s"] / out["sequential_cpu_s"]
    out["batched_over_sequential_wall"] = out["batched_wall_s"] / out["sequential_wall_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16, help="width c of the runs")
    parser.add_argument("--num-runs", type=int, default=4, help="runs trained together")
    parser.add_argument("--steps", type=int, default=400, help="steps a run (a multiple of 4)")
    parser.add_argument("--out-dir", default=str(ROOT / "runs/scaling_laws/study/batching"))
    args = parser.parse_args(argv)
    if args.channels < 1 or not 1 <= args.num_runs <= 8 or args.steps < 4 or args.steps % 4:
        parser.error("need --channels >= 1, 1 <= --num-runs <= 8, --steps a multiple of 4")
    metrics = {
        "study": "scaling_laws_batching",
        **measure(args.channels, args.num_runs, args.steps),
    }
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=1))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")  # written last, atomically
    return metrics


if __name__ == "__main__":
    main()
