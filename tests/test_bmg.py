"""Tests for tasks/bmg.py: the two-colours grid world, the MG meta-gradient, BMG's target and
matching, paired random streams, seed sharding, bad options, the paper preset and a short run."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import bmg
import jax
import jax.numpy as jnp
import numpy as np
import pytest

TINY = bmg.Config(
    total_steps=1536,
    swap_every=512,
    num_seeds=2,
    num_envs=2,
    rollout_len=4,
    k_inner=2,
    l_target=3,
    fixed_epsilons=(0.0, 0.1),
)
TASKS = pathlib.Path(bmg.__file__).parent

bmg_env_step = jax.jit(bmg.env_step, static_argnums=3)


def bmg_state(agent, blue, red, blue_reward=1.0, t=0):
    return bmg.EnvState(
        jnp.int32(agent), jnp.int32(blue), jnp.int32(red), jnp.float32(blue_reward), jnp.int32(t)
    )


# ---------------------------------------------------------------- environment
def test_bmg_env_moves_and_walls():
    up, down, left, right = 0, 1, 2, 3
    state = bmg_state(12, 0, 24)  # agent in the centre (row 2, col 2)
    for action, expected in [(up, 7), (down, 17), (left, 11), (right, 13)]:
        new, reward = bmg_env_step(state, jnp.int32(action), jnp.float32(0.5), 1000)
        assert int(new.agent) == expected
        assert float(reward) == pytest.approx(bmg.STEP_COST)
    corner = bmg_state(0, 12, 24)  # top-left: up and left are walls
    for action in (up, left):
        new, _ = bmg_env_step(corner, jnp.int32(action), jnp.float32(0.5), 1000)
        assert int(new.agent) == 0


def test_bmg_env_collect_respawn_and_swap():
    # agent at 6, blue at 7 (right), red at 5 (left)
    state = bmg_state(6, 7, 5)
    for u in np.linspace(0, 0.999, 50):
        new, reward = bmg_env_step(state, jnp.int32(3), jnp.float32(u), 1000)
        assert float(reward) == 1.0  # blue pays +1 before the swap
        assert int(new.blue) not in (int(new.agent), int(new.red))  # respawned on a free cell
        assert int(new.red) == 5
    new, reward = bmg_env_step(state, jnp.int32(2), jnp.float32(0.3), 1000)
    assert float(reward) == -1.0 and int(new.blue) == 7 and int(new.red) not in (5, 7)
    # The swap: after swap_every steps blue pays -1 and red +1.
    state = bmg_state(6, 7, 5, t=9)
    new, _ = bmg_env_step(state, jnp.int32(0), jnp.float32(0.3), 10)
    assert float(new.blue_reward) == -1.0
    new, reward = bmg_env_step(new._replace(agent=jnp.int32(6)), jnp.int32(3), jnp.float32(0.3), 10)
    assert float(reward) == -1.0


def test_bmg_free_cell_is_uniform_over_free_cells():
    us = (np.arange(23 * 40) + 0.5) / (23 * 40)
    cells = np.asarray(jax.vmap(lambda u: bmg.free_cell(u, jnp.int32(17), jnp.int32(3)))(us))
    counts = np.bincount(cells, minlength=25)
    assert counts[3] == 0 and counts[17] == 0
    assert set(counts[np.arange(25) != 3][np.arange(24) != 16]) == {40}


def test_bmg_observation_is_egocentric():
    # agent at (1, 2), blue at (0, 0): offsets (-1, -2); red at (4, 4): offsets (3, 2)
    obs = np.asarray(bmg.observe(bmg_state(7, 0, 24)))
    assert obs.shape == (bmg.OBS_DIM,) and obs.sum() == 6
    offsets = obs[:36].reshape(4, 9).argmax(1) - 4
    np.testing.assert_array_equal(offsets, [-1, -2, 3, 2])
    np.testing.assert_array_equal(obs[36:].reshape(2, 5).argmax(1), [1, 2])
    # Translating everything by one column leaves the offsets unchanged.
    moved = np.asarray(bmg.observe(bmg_state(8, 1, 20)))  # red (4, 0) from (1, 3): (3, -3)
    assert moved[:18].tolist() == obs[:18].tolist()


# ---------------------------------------------------------------- meta-gradients
def bmg_tiny_carry(cfg=TINY, seed=0):
    return bmg.init_carry(jnp.int32(seed), cfg)


def test_bmg_meta_learner_starts_near_half_and_sees_normalised_rewards():
    carry = bmg_tiny_carry()
    assert abs(float(bmg.meta_epsilon(carry.meta_params, carry.inner)) - 0.5) < 0.05
    inner = carry.inner._replace(
        reward_stats=jnp.array([0.2] * 9 + [-0.9]), running=jnp.array([0.2, 0.2**2 + 0.01])
    )
    eye = jnp.eye(10)

    def meta_input(j):  # a probe meta-learner whose logit is input j: relu(x_j) - relu(-x_j)
        out = jnp.concatenate([eye[:, j], -eye[:, j]])[:, None]
        probe = [{"w": jnp.concatenate([eye, -eye], 1), "b": jnp.zeros(20)},
                 {"w": out, "b": jnp.zeros(1)}]  # fmt: skip
        eps = float(bmg.meta_epsilon(probe, inner))
        return np.log(eps / (1 - eps))

    x = np.array([meta_input(j) for j in range(10)])
    assert x.min() >= -1 and x.max() <= 1
    assert x[-1] < -0.99 and np.allclose(x[:-1], 0, atol=1e-5)  # a swap shows as -1


def test_bmg_mg_meta_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        cfg = dataclasses.replace(TINY, k_inner=3, lr=0.5)
        carry = jax.tree.map(
            lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, bmg_tiny_carry(cfg)
        )
        # At initialisation the meta-input is about 0 and the hidden biases are 0, so every
        # hidden ReLU of the meta-learner sits at its kink, where finite differences and the
        # gradient disagree: move the meta-parameters off it first.
        keys = iter(jax.random.split(jax.random.key(5), 8))
        offset = lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)  # noqa: E731
        carry = carry._replace(meta_params=jax.tree.map(offset, carry.meta_params))
        # One compiled function serves both the gradient and the shifted losses.
        loss_and_grad = jax.jit(
            jax.value_and_grad(lambda m: bmg.meta_loss(m, carry.inner, cfg, "mg")[0])
        )
        grads = loss_and_grad(carry.meta_params)[1]
        direction = jax.tree.map(
            lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), carry.meta_params
        )
        h = 1e-5
        shifted = [
            loss_and_grad(
                jax.tree.map(lambda p, d, s=s: p + s * h * d, carry.meta_params, direction)
            )[0]
            for s in (1, -1)
        ]
        numeric = (shifted[0] - shifted[1]) / (2 * h)
        analytic = sum(
            jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
        )
        assert abs(float(analytic)) > 1e-6  # the meta-gradient is not trivially zero
        assert float(analytic) == pytest.approx(float(numeric), rel=1e-4, abs=1e-9)


def test_bmg_no_gradient_through_target():
    carry = bmg_tiny_carry()
    params, ro = carry.inner.params, carry.inner.rollout
    # d/d(target's start) of the matching loss is exactly zero: the target is held constant.
    other = jax.tree.map(lambda x: 1.5 * x, params)
    g = jax.grad(lambda t: bmg.bmg_matching_loss(params, t, ro, 0.1))(other)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
    # The matching gradient is the same as with a constant target start.
    g_live = jax.grad(lambda p: bmg.bmg_matching_loss(p, p, ro, 0.1))(params)
    g_const = jax.grad(lambda p: bmg.bmg_matching_loss(p, params, ro, 0.1))(params)
    for a, b in zip(jax.tree.leaves(g_live), jax.tree.leaves(g_const)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # With K = 0 steps theta_K does not depend on w: the only path from w to the loss runs
    # through the target's L - 1 steps, so the meta-gradient must be exactly zero.
    cfg = dataclasses.replace(TINY, k_inner=0)
    meta_grad = jax.jit(jax.grad(lambda m: bmg.meta_loss(m, carry.inner, cfg, "bmg")[0]))(
        carry.meta_params
    )
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(meta_grad))


def test_bmg_kl_matching_zero_when_equal():
    # With lr = 0 the target is its start: the KL to itself is 0, and so is its gradient.
    carry = bmg_tiny_carry()
    params, ro = carry.inner.params, carry.inner.rollout
    assert float(bmg.bmg_matching_loss(params, params, ro, 0.0)) == pytest.approx(0.0, abs=1e-7)
    grads = jax.grad(lambda p: bmg.bmg_matching_loss(p, params, ro, 0.0))(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) < 1e-6
    other = jax.tree.map(lambda x: x, params)
    other["actor"][-1]["b"] = jnp.array([3.0, 0.0, 0.0, 0.0])  # prefers "up": a different policy
    assert float(bmg.bmg_matching_loss(params, other, ro, 0.0)) > 0.1


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "option, bad",
    [
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("meta_lr", 0.0),
        ("meta_lr", -1e-3),
        ("seed", -1),
        ("k_inner", -1),
        ("hidden", 0),
        ("num_seeds", 0),
        ("num_envs", 0),
        ("total_steps", 1024),  # cross-field: fewer than 3 swap periods
        ("swap_every", 510),  # cross-field: not a multiple of --rollout-len
        ("fixed_epsilons", (1.5,)),
        ("fixed_epsilons", (float("nan"),)),
        ("fixed_epsilons", ()),
    ],
)
def test_bmg_bad_option_names_itself(tmp_path, option, bad):
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path), **{option: bad})
    with pytest.raises(ValueError, match="--" + option.replace("_", "-")):
        bmg.validate(cfg)


def test_bmg_out_dir_that_is_a_file_is_rejected_by_main(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--out-dir"):
        bmg.main(dataclasses.replace(TINY, out_dir=str(blocker)))


def test_bmg_cli_bad_option_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(bmg.sys, "argv", ["bmg.py", "--lr", "nan"])
    with pytest.raises(SystemExit) as exit_info:
        bmg.run_cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lr nan") and "\n" not in err


def test_bmg_help_mentions_paper_preset(capsys):
    with pytest.raises(SystemExit):
        bmg.cli_config(["--help"])
    assert "paper" in capsys.readouterr().out
    assert bmg.cli_config(["--preset", "paper"]) == bmg.PRESETS["paper"]
    assert bmg.cli_config(["--preset", "paper", "--num-seeds", "2"]).num_seeds == 2
    bmg.validate(bmg.PRESETS["paper"])


# ---------------------------------------------------------------- training
def bmg_fixed_run(cfg, epsilons, n_rollouts):
    carry = jax.jit(jax.vmap(lambda s: bmg.init_carry(s, cfg)))(
        jnp.arange(cfg.num_seeds) + cfg.seed
    )
    logs, _ = bmg.train_arm("fixed", cfg, carry, jnp.array(epsilons), n_rollouts)
    return logs["reward"]  # (seeds, eps values, rollouts)


def test_bmg_fixed_eps_agent_learns_and_arms_share_the_stream():
    # No swap within 48k steps: A2C with eps = 0.1 on 8 grids must learn to collect blue (a
    # random policy earns about -0.03 per step, the "stand at a wall" collapse -0.04).
    # Calibration, reward per step over the last 12k steps, seeds 0-9: 0.173 to 0.262 (mean
    # 0.249). Arms whose eps differ by 1e-6 draw the same random numbers for every rollout, so
    # they act and earn the same until rounding flips an action: first at rollout 307 to 2353.
    cfg = dataclasses.replace(bmg.Config(), swap_every=10**9, num_seeds=3)
    reward = bmg_fixed_run(cfg, [0.1, 0.1 + 1e-6], 3000)
    rate = reward[:, 0, -750:].mean(-1) / cfg.rollout_len
    assert rate.min() > 0.1, rate
    np.testing.assert_array_equal(reward[:, 0, :200], reward[:, 1, :200])


SHARD_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, sys.argv[1])
import bmg
cfg = bmg.Config(num_seeds=3, num_envs=2, swap_every=64, rollout_len=4, hidden=8)
carry = jax.jit(jax.vmap(lambda s: bmg.init_carry(s, cfg)))(jnp.arange(3))
shard_seeds, seen = bmg.shard_seeds, set()
def spy(tree):  # the devices that train_arm's seed-sharded inputs live on
    out = shard_seeds(tree)
    seen.update(d.id for leaf in jax.tree.leaves(out) for d in leaf.sharding.device_set)
    return out
bmg.shard_seeds = spy
logs, carry = bmg.train_arm("fixed", cfg, carry, jnp.array([0.0, 0.2]), 40)
print(json.dumps({"reward": logs["reward"].tolist(), "devices": len(seen)}))
"""


@pytest.mark.slow  # two fresh JAX processes; hdqn's 2-device test runs in `make test`
def test_bmg_seeds_sharded_over_two_devices_match_one_device():
    # 3 seeds on 2 forced host devices (padded to 4) against 1 device: per-seed rewards of a
    # short run. Rounding may differ between layouts and a seed's outcome is chaotic in it, so
    # only 40 rollouts are compared, where the actions (argmax of logits + Gumbel noise) agree.
    out = {}
    for n in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run(
            [sys.executable, "-c", SHARD_SCRIPT, str(TASKS)],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[2]["devices"] == 2
    np.testing.assert_allclose(out[2]["reward"], out[1]["reward"], atol=1e-5)


def refuse_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_bmg_paper_preset_smoke_run_writes_a_whole_folder(tmp_path):
    # The paper preset (width 256, one grid, meta Adam 1e-4) for a few hundred steps.
    cfg = dataclasses.replace(
        bmg.PRESETS["paper"],
        total_steps=384,
        swap_every=128,
        num_seeds=2,
        rollout_len=4,
        k_inner=2,
        l_target=2,
        fixed_epsilons=(0.0, 0.4),
        out_dir=str(tmp_path / "run"),
    )
    bmg.validate(cfg)
    metrics = bmg.main(cfg)
    for name in ("bmg_cumulative_reward", "mg_cumulative_reward", "best_fixed_cumulative_reward",
                 "bmg_eps_before_swap", "bmg_eps_after_swap", "best_fixed_red_phase_reward",
                 "best_fixed_blue_phase_reward", "bmg_minus_mg", "bmg_minus_mg_se"):  # fmt: skip
        assert np.isfinite(metrics[name]), name
    assert metrics["num_seeds"] == 2 and metrics["preset"] == "paper"
    assert metrics["device"] and metrics["num_devices"] >= 1 and metrics["throughput"] > 0
    assert 0 <= metrics["bmg_wins_vs_mg"] <= 2
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text(), parse_constant=refuse_constant) == metrics
    assert json.loads((out / "config.json").read_text())["hidden"] == 256
    assert (out / "cumulative_reward.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left
    # Every bar of scripts/run_all.py sits beside its metric, and no other bar is written.
    bars = {k: v for k, v in metrics.items() if k.endswith(("_target", "_ceiling"))}
    assert bars == {
        "bmg_minus_mg_target": 0.0, "bmg_minus_best_fixed_target": 0.0,
        "bmg_eps_rise_target": 0.0, "best_fixed_red_phase_reward_target": 0.0,
        "best_fixed_blue_phase_reward_target": 0.0, "num_seeds_target": 10,
        "wall_time_s_ceiling": 300,
    }  # fmt: skip
    for key in bars:
        assert key.rsplit("_", 1)[0] in metrics, key
    rise = metrics["bmg_eps_after_swap"] - metrics["bmg_eps_before_swap"]
    assert metrics["bmg_eps_rise"] == pytest.approx(rise)
    assert set(metrics["time_split_s"]) == {"setup", "train", "evaluate", "figures"}
    # wall_time_s is the whole run: the phases add up to it
    assert metrics["wall_time_s"] == pytest.approx(sum(metrics["time_split_s"].values()), abs=0.02)
