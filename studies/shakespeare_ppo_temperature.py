"""Does PPO add anything that a lower sampling temperature does not? (shakespeare_ppo study)

The KL-regularised objective's optimum is pi*(x) ∝ pi_ref(x) exp(R(x) / beta); when R is a
likelihood under an n-gram fitted on the same sonnets as pi_ref, exp(R / beta) largely re-weights
pi_ref by a power of itself, as a lower temperature does. This study trains exactly what
`tasks/shakespeare_ppo.py` trains (same config, same seed, same keys), then samples the reference
at the temperature whose distinct-2 matches PPO's (bisection, the same key at every step) and
scores that "cooled" reference with every metric of the task (reward and its parts, the
independent judge, the copy check) and of the diagnostics study (KL to the reference, ...).

    python studies/shakespeare_ppo_temperature.py   # writes runs/shakespeare_ppo/study/temperature/
    python studies/shakespeare_ppo_temperature.py --help    # the task's options

It writes samples.txt and metrics.json (last, atomically) into --out-dir.
"""

import dataclasses
import pathlib
import sys
from functools import partial

import jax
import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tasks"))
sys.path.insert(0, str(ROOT / "studies"))
import shakespeare_ppo as sp  # noqa: E402
import shakespeare_ppo_diagnostics as diag  # noqa: E402

OUT_DIR = "runs/shakespeare_ppo/study/temperature"


def matched_temperature(sample, ref_params, key, num: int, target: float) -> float:
    """The temperature at which the reference's distinct-2 equals `target` (bisection with the
    same key at every step): the cheapest way to trade diversity for likelihood, no training."""
    low, high = 0.3, 1.0
    for _ in range(8):
        mid = (low + high) / 2
        too_cold = sp.distinct2(np.asarray(sample(ref_params, key, num, mid))) < target
        low, high = (mid, high) if too_cold else (low, mid)
    return (low + high) / 2


def cooled_sample(cfg: sp.Config, graphdef, ref_params, target: float, key) -> tuple:
    """The reference at the temperature matching PPO's distinct-2 `target`: (temperature, its
    eval_samples verses). `key` is the task's evaluation key."""
    _, k_ref, _, k_cool = jax.random.split(key, 4)  # as in sp.sample_policies
    sample = jax.jit(partial(sp.sample_verses, graphdef), static_argnums=2)
    temp = matched_temperature(sample, ref_params, k_cool, cfg.eval_samples, target)
    return temp, sample(ref_params, k_ref, cfg.eval_samples, temp)


def main(cfg: sp.Config) -> dict:
    """The task's run (its metrics.json's numbers), then the cooled reference beside it."""
    sp.validate(cfg)
    data, judge = sp.prepare_data(cfg.vocab_size), sp.load_judge()
    key, k_ref, k_ppo, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    graphdef, ref_params = sp.pretrain_reference(cfg, data["mle_pairs"], k_ref)
    ppo_params, _ = sp.train_ppo(cfg, data, graphdef, ref_params, k_ppo)
    policies = sp.sample_policies(cfg, data, graphdef, ref_params, ppo_params, k_eval)
    target = float(np.mean([sp.distinct2(np.asarray(t)) for t in policies["ppo"]]))  # as evaluate
    temp, cooled = cooled_sample(cfg, graphdef, ref_params, target, k_eval)
    # One evaluation, the cooled reference beside the task's policies (keys named `cooled`).
    task, text = sp.evaluate(cfg, data, judge, policies | {"cooled": [cooled]})
    corpus = diag.corpus_statistics(data)
    per_seed = [jax.tree.map(lambda x, s=s: x[s], ppo_params) for s in range(cfg.num_seeds)]
    ppo_kl = [
        diag.diagnostics(data, corpus, graphdef, ref_params, tokens, params)
        for tokens, params in zip(policies["ppo"], per_seed)
    ]
    task["ppo_kl_to_reference"] = float(np.mean([d["kl_to_reference"] for d in ppo_kl]))
    m = {"study": "shakespeare_ppo_temperature", "seed": cfg.seed, "num_seeds": cfg.num_seeds}
    keep = ["judge_reference", "judge_ppo", "judge_ppo_std", "reference_reward", "ppo_reward"]
    keep += ["reward_lm_ppo", "reward_metre_ppo", "ppo_distinct2", "ppo_kl_to_reference"]
    keep += ["ppo_longest_copy_words", "reference_distinct2"]
    m.update({k: task[k] for k in keep})
    m["cooled_temperature"] = temp
    m |= {k: v for k, v in task.items() if "cooled" in k}
    extra = diag.diagnostics(data, corpus, graphdef, ref_params, cooled, ref_params, temp)
    m |= {f"cooled_{k}": v for k, v in extra.items()}
    m["judge_gain_over_cooled"] = m["judge_ppo"] - m["judge_cooled"]  # a finding, not a bar
    m["reward_gain_over_cooled"] = m["ppo_reward"] - m["cooled_reward"]
    with sp.staged_run(cfg.out_dir) as out:
        (out / "samples.txt").write_text(text[-1])  # the cooled reference's
        sp.write_metrics(out, cfg, m)
    print(" ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    return m


if __name__ == "__main__":
    main(tyro.cli(sp.Config, default=dataclasses.replace(sp.Config(), out_dir=OUT_DIR)))
