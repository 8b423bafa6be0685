"""Tests for tasks/scaling_laws.py: the fits, the model's size, the conv, and a tiny sweep."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import scaling_laws as sl
from flax import nnx

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
    loss = sl.power_law(x, 0.04, 30.0, 0.6)
    fit = sl.fit_power_law(x, loss)
    assert fit["alpha"] == pytest.approx(0.6, rel=1e-3)
    assert fit["E"] == pytest.approx(0.04, rel=1e-3)
    assert fit["A"] == pytest.approx(30.0, rel=1e-2)
    assert fit["r2"] > 0.9999
    # With 2% multiplicative noise the exponent is still recovered to within 0.1.
    noisy = loss * np.exp(0.02 * np.random.default_rng(0).standard_normal(x.size))
    assert abs(sl.fit_power_law(x, noisy)["alpha"] - 0.6) < 0.1


def test_scaling_laws_joint_fit_recovers_known_law():
    n, d = np.meshgrid(np.geomspace(1e3, 2e4, 5), np.geomspace(8e2, 5e4, 7))
    n, d = n.ravel(), d.ravel()
    loss = sl.joint_law((n, d), 0.03, 20.0, 0.5, 8.0, 0.4)
    fit = sl.fit_joint_law(n, d, loss)
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


def test_scaling_laws_patch_conv_equals_lax_conv():
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 5))
    conv = sl.PatchConv(5, 7, nnx.Rngs(1))
    kernel = conv.linear.kernel.value.reshape(2, 2, 5, 7)  # (dy, dx, c) rows -> HWIO
    ref = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv(x), ref + conv.linear.bias.value, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        {"num_widths": 2},
        {"num_data_sizes": 0},
        {"num_widths": 6, "base_channels": 16},
        {"steps": 0},
        {"steps": 50, "eval_every": 20},
        {"batch_size": -1},
        {"learning_rate": 0.0},
        {"num_seeds": 0},
        {"val_size": 1500},
        {"num_data_sizes": 20},
    ],
)
def test_scaling_laws_bad_config_raises(change, tmp_path):
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path), **change)
    with pytest.raises(ValueError):
        sl.main(cfg)


def test_scaling_laws_unwritable_out_dir_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir"):
        sl.main(dataclasses.replace(TINY, out_dir=str(blocker / "sub")))


@pytest.fixture(scope="module")
def scaling_laws_tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling_laws_tiny")
    return sl.main(dataclasses.replace(TINY, out_dir=str(out))), out


def test_scaling_laws_tiny_run_learns_and_writes_outputs(scaling_laws_tiny_run):
    metrics, out = scaling_laws_tiny_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("scaling.png", "joint.png", "curves.png", "runs.json"):
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
    again = sl.run_sweeps(TINY, sl.load_splits(TINY), [(narrowest, target["n_train"])])[0]
    assert again["val_loss_curve"] == target["val_loss_curve"]
    assert again["val_loss"] == target["val_loss"]
