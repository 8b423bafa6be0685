"""Helpers copied between task files stay identical, source for source, so a fix lands in all.

A task imports no shared module (one file per task); instead every copy of each helper below must
be the same text. Edit one copy, then paste it into the others.
"""

import ast
import pathlib

import pytest

TASKS = pathlib.Path(__file__).resolve().parents[1] / "tasks"
JAX_TASKS = [
    "rand_transformer", "shakespeare_ppo", "cot", "flow_matching", "hdqn", "diffusion",
    "reverse_digits", "scaling_laws", "optimization", "interpret", "bmg",
]  # fmt: skip
TORCH_TASKS = ["llama3_sft", "beam_search", "red_team"]

# helper -> the tasks that must hold a copy (others may hold one too; every copy must match)
REQUIRED = {
    **{
        name: JAX_TASKS + TORCH_TASKS
        for name in [
            "option_error",
            "check_number",
            "check_out_dir",
            "staged_run",
            "write_metrics",
            "cli_config",
            "run_cli",
            "save_figure",
            "PhaseTimer",
        ]  # fmt: skip
    },
    "device_info": JAX_TASKS,
    "pick_device": TORCH_TASKS,
    "data_root": TORCH_TASKS + ["scaling_laws", "optimization", "interpret", "shakespeare_ppo"],
    "SMOLLM2_GGUF": TORCH_TASKS,
    "SMOLLM2_USED": TORCH_TASKS,
    "load_packaged_smollm2": TORCH_TASKS,
    "load_causal_lm": TORCH_TASKS,
    "MNIST_SHA256": ["scaling_laws", "optimization", "interpret"],
    "read_idx": ["scaling_laws", "optimization", "interpret"],
    "load_mnist": ["scaling_laws", "optimization", "interpret"],
    "SONNETS_SHA256": ["shakespeare_ppo", "llama3_sft"],
    "read_sonnets_text": ["shakespeare_ppo", "llama3_sft"],
    "shard_seeds": ["cot", "hdqn", "bmg", "shakespeare_ppo"],
}


def top_level_sources(path: pathlib.Path) -> dict[str, str]:
    """name -> source text of each top-level function, class or constant in a task file."""
    text = path.read_text()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = text.splitlines()[start - 1 : node.end_lineno]
            out[node.name] = "\n".join(lines)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name):
                out[target.id] = ast.get_source_segment(text, node)
    return out


SOURCES = {p.stem: top_level_sources(p) for p in sorted(TASKS.glob("*.py"))}


@pytest.mark.parametrize("helper", sorted(REQUIRED))
def test_helper_copies_are_identical(helper):
    missing = [t for t in REQUIRED[helper] if helper not in SOURCES.get(t, {})]
    assert not missing, f"{helper} is missing from {missing}"
    copies = {t: src[helper] for t, src in SOURCES.items() if helper in src}
    first_task, first = next(iter(copies.items()))
    differ = [t for t, src in copies.items() if src != first]
    assert not differ, f"{helper} in {differ} differs from its copy in {first_task}"


def test_every_task_has_presets_and_the_cli_entry():
    for task, src in SOURCES.items():
        for name in ("Config", "PRESETS", "validate", "main"):
            assert name in src, f"{task} has no top-level {name}"
        tail = (TASKS / f"{task}.py").read_text().rstrip().splitlines()[-2:]
        assert tail == ['if __name__ == "__main__":', "    run_cli()"], task
