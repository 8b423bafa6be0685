"""Tests for studies/bmg_meta_gradient.py: the meta-gradients with respect to a constant eps, on
a tiny config (one compiled program per arm)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import bmg_meta_gradient as study  # noqa: E402

bmg = study.bmg


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_bmg_meta_gradient_study_writes_every_arm(tmp_path):
    sc = study.StudyConfig(num_seeds=2, num_streams=3, epsilons=(0.1, 0.5), swap_every=64,
                           num_envs=2, out_dir=str(tmp_path / "run"))  # fmt: skip
    m = study.main(sc)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == m
    for arm in study.ARMS:
        for eps in ("0.1", "0.5"):
            assert np.isfinite(m[f"{arm}_eps_{eps}_grad"]) and np.isfinite(m[f"{arm}_eps_{eps}_t"])
    assert (tmp_path / "run" / "meta_gradient.png").stat().st_size > 0


@pytest.mark.slow  # a side study's run (make test-all); keeps make test near 10 min
def test_bmg_meta_gradient_study_loss_matches_the_task():
    # With eps held constant, the study's BMG meta-loss is the task's meta_loss evaluated with
    # a meta-learner whose output is that constant (zero weights, bias = logit(eps)).
    cfg = bmg.Config(num_seeds=1, num_envs=2, rollout_len=4, k_inner=2, l_target=3, hidden=8)
    carry = bmg.init_carry(jnp.int32(0), cfg)
    eps = 0.3
    meta = jax.tree.map(jnp.zeros_like, carry.meta_params)
    meta[-1]["b"] = jnp.full_like(meta[-1]["b"], np.log(eps / (1 - eps)))
    for arm in ("bmg", "mg"):
        task = float(bmg.meta_loss(meta, carry.inner, cfg, arm)[0])
        mine = float(study.meta_loss(arm, jnp.float32(eps), carry.inner, cfg))
        np.testing.assert_allclose(mine, task, rtol=1e-5)
