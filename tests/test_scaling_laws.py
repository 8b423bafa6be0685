"""Tests for tasks/scaling_laws.py: the fits, the model's size, the conv, and a tiny sweep."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import scaling_laws as sl
from flax import nnx


def _reject(name):
    raise ValueError(f"metrics.json holds {name}, not strict JSON")


TINY = sl.Config(
    num_widths=3,
    num_data_sizes=7,
    base_channels=8,
    steps=100,
    batch_size=64,
    learning_rate=5e-3,
    eval_every=25,
    num_seeds=1,
    val_size=2000,
)


def test_scaling_laws_fit_recovers_known_power_law():
    x = np.geomspace(1e3, 5e4, 7)
    loss = 0.04 + 30.0 * x**-0.6
    fit = sl.fit_law([x], loss)
    assert fit["alpha"] == pytest.approx(0.6, rel=1e-3)
    assert fit["E"] == pytest.approx(0.04, rel=1e-3)
    assert fit["A"] == pytest.approx(30.0, rel=1e-2)
    assert fit["r2"] > 0.9999
    # With 2% multiplicative noise the exponent is still recovered to within 0.1.
    noisy = loss * np.exp(0.02 * np.random.default_rng(0).standard_normal(x.size))
    assert abs(sl.fit_law([x], noisy)["alpha"] - 0.6) < 0.1


def test_scaling_laws_joint_fit_recovers_known_law():
    n, d = np.meshgrid(np.geomspace(1e3, 2e4, 5), np.geomspace(8e2, 5e4, 7))
    n, d = n.ravel(), d.ravel()
    loss = 0.03 + 20.0 * n**-0.5 + 8.0 * d**-0.4
    fit = sl.fit_law([n, d], loss)
    assert fit["alpha"] == pytest.approx(0.5, rel=1e-2)
    assert fit["beta"] == pytest.approx(0.4, rel=1e-2)
    assert fit["E"] == pytest.approx(0.03, rel=2e-2)
    assert fit["r2"] > 0.9999


@pytest.mark.parametrize("channels", [1, 2, 16])
def test_scaling_laws_param_count_matches_model(channels):
    params = nnx.state(sl.CNN(channels, nnx.Rngs(0)), nnx.Param)
    counted = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert counted == sl.param_count(channels)


def test_scaling_laws_width_multiplier_scales_params():
    # Halving the width halves the linear head (49 * 2c * 10 weights) and quarters the c x 2c
    # conv, so the count shrinks by a factor between 2 and 4 at every step of the sweep.
    counts = [sl.param_count(c) for c in (16, 8, 4, 2, 1)]
    ratios = [a / b for a, b in zip(counts, counts[1:])]
    assert all(1.9 < r < 4.0 for r in ratios), ratios
    assert sl.param_count(16) - 2 * sl.param_count(8) == 4 * 16 * 32 - 2 * 4 * 8 * 16 - 10


def test_scaling_laws_patchify_then_linear_equals_lax_conv():
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 5))
    linear = nnx.Linear(4 * 5, 7, rngs=nnx.Rngs(1))
    kernel = linear.kernel.value.reshape(2, 2, 5, 7)  # (dy, dx, c) rows -> HWIO
    ref = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(linear(sl.patchify(x)), ref + linear.bias.value, atol=1e-5)


@pytest.mark.parametrize(
    "change,option",
    [
        ({"num_widths": 2}, "--num-widths"),
        ({"num_data_sizes": 0}, "--num-data-sizes"),
        ({"num_widths": 6, "base_channels": 16}, "--base-channels"),
        ({"steps": 0}, "--steps"),
        ({"steps": 50, "eval_every": 20}, "--eval-every"),
        ({"batch_size": -1}, "--batch-size"),
        ({"learning_rate": 0.0}, "--learning-rate"),
        ({"learning_rate": float("nan")}, "--learning-rate"),
        ({"learning_rate": float("inf")}, "--learning-rate"),
        ({"learning_rate": -1e-3}, "--learning-rate"),
        ({"num_seeds": 0}, "--num-seeds"),
        ({"val_size": 1500}, "--val-size"),
        ({"val_size": 40_000}, "--val-size"),
        ({"num_data_sizes": 14}, "--num-data-sizes"),
        ({"num_data_sizes": 10**6}, "--num-data-sizes"),
        ({"num_widths": 10**6}, "--num-widths"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**32 - 1, "num_seeds": 2}, "--seed"),
        ({"preset": "gpu"}, "--preset"),
    ],
)
def test_scaling_laws_bad_config_raises(change, option, tmp_path):
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path / "run"), **change)
    with pytest.raises(ValueError, match=option):
        sl.validate(cfg)
    with pytest.raises(ValueError, match=option):  # main validates before any work
        sl.main(cfg)
    assert not (tmp_path / "run").exists()


def test_scaling_laws_unwritable_out_dir_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out_dir in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match="--out-dir"):
            sl.main(dataclasses.replace(TINY, out_dir=str(out_dir)))


@pytest.fixture(scope="module")
def scaling_laws_tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling_laws_tiny")
    return sl.main(dataclasses.replace(TINY, out_dir=str(out))), out


def test_scaling_laws_tiny_run_learns_and_writes_outputs(scaling_laws_tiny_run):
    metrics, out = scaling_laws_tiny_run
    assert json.loads((out / "metrics.json").read_text(), parse_constant=_reject) == metrics
    assert metrics["device"].startswith(jax.default_backend())
    assert metrics["num_devices"] == jax.device_count() and metrics["preset"] == "cpu"
    assert metrics["throughput"] > 0 and metrics["throughput_unit"] == "steps/s"
    assert metrics["runs_vmapped"] == int(jax.default_backend() != "cpu")
    # The bars, beside their metrics (scripts/run_all.py checks them from the metrics alone).
    bars = {k: v for k, v in metrics.items() if k.endswith(("_target", "_ceiling"))}
    assert bars == {"model_r2_target": 0.95, "data_r2_target": 0.95, "wall_time_s_ceiling": 300}
    assert set(metrics["time_split_s"]) == {"setup", "train", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert metrics["wall_time_s"] == pytest.approx(sum(metrics["time_split_s"].values()), abs=0.02)
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging folder left behind
    for name in ("scaling.png", "runs.json"):  # joint.png, curves.png: the diagnostics study
        assert (out / name).exists()
    for key in ("model_alpha", "model_r2", "data_alpha", "data_r2", "joint_alpha", "joint_beta"):
        assert math.isfinite(metrics[key]), key
    # Calibrated over seeds 0, 1, 2: full-model validation accuracy 0.890 / 0.900 / 0.890 after
    # 100 steps; narrowest minus widest loss 0.22 / 0.22 / 0.28; 1/64 of the data minus all of
    # it 0.076 / 0.053 / 0.067. More width and more data both lower the validation loss.
    runs = json.loads((out / "runs.json").read_text())
    loss = {(r["channels"], r["n_train"]): r["val_loss"] for r in runs}
    widest, full_d = max(c for c, _ in loss), max(d for _, d in loss)
    assert metrics["full_val_accuracy"] > 0.85
    assert loss[(widest, full_d)] < loss[(min(c for c, _ in loss), full_d)] - 0.1
    assert loss[(widest, full_d)] < loss[(widest, min(d for _, d in loss))] - 0.02


def test_scaling_laws_same_seed_same_run(scaling_laws_tiny_run):
    # Re-train one run of the sweep from scratch (a fresh compilation): bit-identical result.
    _, out = scaling_laws_tiny_run
    first = json.loads((out / "runs.json").read_text())
    narrowest = min(r["channels"] for r in first)
    target = next(r for r in first if r["channels"] == narrowest)
    sl.make_train.cache_clear()
    again = sl.run_sweeps(TINY, sl.load_splits(TINY), [(narrowest, target["n_train"])])[0]
    assert again["val_loss_curve"] == target["val_loss_curve"]
    assert again["val_loss"] == target["val_loss"]


# One width, three data sizes, one seed: the batched path against the sequential one. TINY's
# settings, so the sequential runs reuse the program that the tiny sweep compiled.
SCALING_LAWS_BATCH_CFG = TINY
SCALING_LAWS_BATCH_RUNS = [(2, 58_000), (2, 7_250), (2, 906)]


def _scaling_laws_curves(results):
    return np.array([r["val_loss_curve"] + [r["test_loss"]] for r in results])


@pytest.fixture(scope="module")
def scaling_laws_batched():
    data = sl.load_splits(SCALING_LAWS_BATCH_CFG)
    cfg, runs = SCALING_LAWS_BATCH_CFG, SCALING_LAWS_BATCH_RUNS
    return sl.run_sweeps(cfg, data, runs, batched=False), sl.run_sweeps(cfg, data, runs, True)


def test_scaling_laws_batched_runs_match_sequential(scaling_laws_batched):
    sequential, batched = scaling_laws_batched
    assert [(r["n_train"], r["seed"]) for r in batched] == [
        (r["n_train"], r["seed"]) for r in sequential
    ]
    # Measured bit-identical on one CPU device; the tolerance allows for a backend whose
    # batched matmuls round differently.
    np.testing.assert_allclose(
        _scaling_laws_curves(batched), _scaling_laws_curves(sequential), rtol=1e-4
    )


@pytest.mark.slow  # a fresh process that imports JAX and compiles: ~10 s of CPU
def test_scaling_laws_batched_runs_shard_over_two_devices(scaling_laws_batched):
    """The 3 runs, padded to 4, split over 2 forced host devices: same results as 1 device."""
    script = f"""
import json, sys
sys.path.insert(0, {str(pathlib.Path(sl.__file__).parent)!r})
import jax, scaling_laws as sl
seen = []
def spy(tree, shard=sl.shard_seeds):
    out = shard(tree)
    seen.append([len(x.sharding.device_set) for x in jax.tree.leaves(out)] + [jax.device_count()])
    return out
sl.shard_seeds = spy
cfg, runs = sl.{SCALING_LAWS_BATCH_CFG!r}, {SCALING_LAWS_BATCH_RUNS!r}
results = sl.run_sweeps(cfg, sl.load_splits(cfg), runs, batched=True)
curves = [r["val_loss_curve"] + [r["test_loss"]] for r in results]
print(json.dumps({{"seen": seen, "curves": curves}}))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["seen"] and all(n == 2 for n in out["seen"][0]), out["seen"]
    np.testing.assert_allclose(
        np.array(out["curves"]), _scaling_laws_curves(scaling_laws_batched[1]), rtol=1e-4
    )


def test_scaling_laws_paper_preset_is_wider():
    paper = sl.PRESETS["paper"]
    sl.validate(dataclasses.replace(paper, out_dir="runs/scaling_laws"))
    widest, narrowest = paper.base_channels, paper.base_channels // 2 ** (paper.num_widths - 1)
    assert narrowest >= 1
    assert sl.param_count(widest) / sl.param_count(narrowest) >= 100  # today's default: ~18x
    cpu = sl.PRESETS["cpu"]
    assert sl.param_count(cpu.base_channels) / sl.param_count(1) < 20
    assert paper.num_data_sizes > cpu.num_data_sizes and paper.num_seeds > cpu.num_seeds


def test_scaling_laws_paper_preset_smoke_run(tmp_path):
    """The paper preset's 9 data sizes on 3 narrow widths with TINY's training settings (whose
    programs the tiny sweep has compiled): it validates, runs and records its name."""
    tiny = {k: getattr(TINY, k) for k in ("num_widths", "base_channels", "steps", "eval_every")}
    tiny |= {k: getattr(TINY, k) for k in ("batch_size", "learning_rate", "val_size")}
    cfg = dataclasses.replace(
        sl.PRESETS["paper"], **tiny, num_seeds=1, joint_grid=False, out_dir=str(tmp_path)
    )
    metrics = sl.main(cfg)
    assert metrics["preset"] == "paper" and metrics["num_runs"] == cfg.num_data_sizes + 2
    assert metrics["n_train_max"] == 58_000 and metrics["n_train_min"] == 58_000 // 2**8
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=_reject) == metrics


def test_scaling_laws_cli_presets_and_help(capsys):
    assert sl.cli_config([]) == sl.PRESETS["cpu"]
    cfg = sl.cli_config(["--preset", "paper", "--steps", "400"])
    assert cfg == dataclasses.replace(sl.PRESETS["paper"], steps=400)
    with pytest.raises(SystemExit):
        sl.cli_config(["--help"])
    assert "paper" in capsys.readouterr().out
