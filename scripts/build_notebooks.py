"""Build notebooks/<task>.ipynb from the task files (jupytext) and execute them (nbclient).

    python scripts/build_notebooks.py                    # all 14, executed at their defaults
    python scripts/build_notebooks.py cot hdqn           # just these
    python scripts/build_notebooks.py --no-execute       # convert only
    python scripts/build_notebooks.py rand_transformer --args "--steps 20" --out-dir /tmp/nb

The task file is the source: its `# %% [markdown]` cells become markdown cells, its `# %%` cells
code cells, in the file's order, and its module docstring becomes the first markdown cell. The
kernel runs in the repository root, so `runs/<task>/` is where the figures go; the last cell calls
`run_cli()`, which in a kernel reads its flags from $TOY_EXAMPLES_ARGS (never the kernel's argv).
"""

import argparse
import ast
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (ROOT / "tasks").glob("*.py"))


def to_notebook(task: str):
    """The task file as a notebook, with the module docstring as a markdown cell."""
    import jupytext
    import nbformat

    text = (ROOT / "tasks" / f"{task}.py").read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "code":
        tree = ast.parse(first.source) if first.source.strip() else None
        doc = ast.get_docstring(tree) if tree else None
        if doc is not None:
            rest = "\n".join(first.source.splitlines()[tree.body[0].end_lineno :]).strip()
            title, _, body = doc.partition("\n")
            cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\n{body.strip()}")]
            cells += [nbformat.v4.new_code_cell(rest)] if rest else []
            nb.cells = cells + nb.cells[1:]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata.pop("jupytext", None)
    return nb


def execute(nb, task: str, args: str, timeout: int):
    from nbclient import NotebookClient

    os.environ["TOY_EXAMPLES_ARGS"] = args  # the kernel inherits it; run_cli reads it there
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return nb


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK", help=f"default: all of {TASKS}")
    parser.add_argument("--no-execute", action="store_true", help="convert only")
    parser.add_argument("--args", default="", help="flags for every task, e.g. '--steps 20'")
    parser.add_argument("--out-dir", default=str(ROOT / "notebooks"), help="where .ipynb go")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {TASKS}")
    import nbformat

    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for task in args.tasks or TASKS:
        start = time.perf_counter()
        nb = to_notebook(task)
        try:
            if not args.no_execute:
                nb = execute(nb, task, args.args, args.timeout)
        except Exception as err:  # report, keep going with the other notebooks
            failed.append(task)
            print(f"{task}: FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1]}")
            continue
        tmp = out_dir / f".{task}.ipynb.tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, out_dir / f"{task}.ipynb")
        size = (out_dir / f"{task}.ipynb").stat().st_size / 1e6
        took = time.perf_counter() - start
        print(f"{task}: {out_dir / f'{task}.ipynb'} ({size:.2f} MB, {took:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
