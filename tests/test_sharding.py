"""The seed axis split over devices (issue 14): tasks/hdqn.py run on 2 forced host devices gives
the same per-seed results as on 1, and its arrays really are split over the 2 devices.

Each run is a subprocess, since XLA reads the device count once, at start. What is compared: the
per-seed rewards of both agents at full precision, the Q-values of the flat DQN, and the headline
metrics, after a short run (1000 steps). Every seed's computation is its own (vmap), so splitting
the seeds over devices changes only where each runs and how many run side by side. That count can
change float rounding, and RL trajectories amplify any difference: measured, 3 and 5 seeds side by
side give bitwise-equal 20k-step trajectories, but 40 and 80 do not. A short run compares the
sharding itself, not that chaos. 3 seeds on 2 devices also exercises the padding (to 4)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
sys.path.insert(0, "tasks")
import jax
import numpy as np
import hdqn

cfg = hdqn.Config(
    num_steps=1000, num_seeds=3, target_period=100, out_dir=sys.argv[1]
)
metrics = hdqn.main(cfg)
result = {"metrics": metrics}
for agent in ("hdqn", "dqn"):  # compiled already: make_train is cached per (cfg, agent)
    log = hdqn.train(cfg, agent).log
    result[agent] = hdqn.last_episodes_mean(log.reward, log.count).tolist()
carry = hdqn.init_carry(cfg, "dqn")
after = hdqn.make_train(cfg, "dqn")[1](carry)  # one jitted chunk: does it keep the split?
result["rows"] = int(carry.key.shape[0])
result["devices_before"] = min(len(x.sharding.device_set) for x in jax.tree.leaves(carry))
result["devices_after"] = min(len(x.sharding.device_set) for x in jax.tree.leaves(after))
print("RESULT " + json.dumps(result))
"""


def _start(devices: int, out_dir: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1800)  # a guard against a hang only
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_hdqn_seeds_sharded_over_two_devices_match_one(tmp_path):
    procs = {n: _start(n, tmp_path / f"devices{n}") for n in (1, 2)}  # both at once
    one, two = (_result(procs[n]) for n in (1, 2))
    # really split: 3 seeds padded to 4 rows, every array of the carry on both devices, before
    # and after a jitted chunk
    assert two["metrics"]["num_devices"] == 2 and one["metrics"]["num_devices"] == 1
    assert two["rows"] == 4 and one["rows"] == 3
    assert two["devices_before"] == 2 and two["devices_after"] == 2
    assert one["devices_before"] == 1 and one["devices_after"] == 1
    # the same per-seed results (the padded seed dropped)
    for agent in ("hdqn", "dqn"):
        assert len(two[agent]) == 3
        np.testing.assert_allclose(two[agent], one[agent], rtol=1e-6, atol=1e-9)
    for name in ("hdqn_reward_per_seed", "dqn_reward_per_seed"):
        assert two["metrics"][name] == one["metrics"][name]
    for name in ("hdqn_reward", "dqn_reward", "dqn_q_s2_left", "dqn_q_s2_right"):
        assert two["metrics"][name] == pytest.approx(one["metrics"][name], rel=1e-5, abs=1e-7)
    assert (tmp_path / "devices2" / "metrics.json").exists()
