"""Strip what changes from run to run out of executed notebooks, keeping outputs and counts.

Re-execute every notebook in order and clean it, ready to commit, in one command (from the
repository root; CI's main run has the ImageNet weights, so give them)::

    VISINSPECT_BACKBONE_WEIGHTS=../shared/weights/vgg16_features_imagenet.pth \
        python notebooks/clean_notebooks.py --execute     # or name some notebooks

Without `--execute` it only cleans notebooks already executed top to bottom (e.g. with
`jupyter nbconvert --to notebook --execute --inplace`).

What it does: cell ids become "cell-01", "cell-02", ...; per-cell timing metadata goes; the
notebook metadata keeps only a stable `python3` kernelspec and the language name (no Python
version, no widget state); consecutive stream outputs are merged; widget views, whose state is
not stored, are replaced by a one-line note. It fails, naming the notebook, if an absolute path
of this machine is left in it, or if a cell tagged `nbval-ignore-output` does not say why in its
metadata (`"nbval-ignore-output-reason": "..."`); tests/test_notebooks_stored.py checks the same.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
VOLATILE_CELL_KEYS = ("execution", "ExecuteTime", "collapsed", "scrolled")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "[a widget: run this cell in Jupyter to see it]"
IGNORE_TAG = "nbval-ignore-output"
# Why nbval may not compare a cell's output: in the metadata, where a reader of the notebook does
# not have to read it, and where the tests and this script can insist on it.
REASON_KEY = "nbval-ignore-output-reason"
# Absolute paths of this machine: a POSIX path starting at a typical top-level folder, or a
# Windows drive. Relative paths such as data/synthetic/ are fine.
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.])/(?:work|tmp|root|home|Users|private|var|opt|mnt|srv)/|\b[A-Za-z]:\\\\"
)


def _merge_streams(outputs: list[dict]) -> list[dict]:
    """Join consecutive stream outputs of the same stream, as a front end shows them."""
    merged: list[dict] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out["output_type"] == "stream" and prev is not None
                and prev["output_type"] == "stream" and prev["name"] == out["name"]):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def _drop_widget_views(outputs: list[dict]) -> list[dict]:
    """Widget views (sliders, tqdm bars) point at widget state, which is not stored: their text
    form would show the widget as first drawn (a bar at 0 %), so a note replaces them."""
    for out in outputs:
        if WIDGET_VIEW in out.get("data", {}):
            out["data"] = {"text/plain": WIDGET_NOTE}
    return outputs


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The cleaned notebook (changed in place and returned)."""
    nb.metadata = nbformat.from_dict(
        {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    )
    for i, cell in enumerate(nb["cells"], 1):
        cell["id"] = f"cell-{i:02d}"
        for key in VOLATILE_CELL_KEYS:
            cell["metadata"].pop(key, None)
        if cell["cell_type"] == "code":
            cell["outputs"] = _drop_widget_views(_merge_streams(cell["outputs"]))
    return nb


def unexplained_ignores(nb: nbformat.NotebookNode) -> list[int]:
    """Numbers (1-based) of the code cells tagged nbval-ignore-output without a reason."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return [n for n, c in enumerate(code, 1) if IGNORE_TAG in c["metadata"].get("tags", [])
            and not str(c["metadata"].get(REASON_KEY, "")).strip()]


def execute(path: Path) -> None:
    """Run a notebook top to bottom in a fresh kernel, in its own folder, and store its outputs."""
    from nbclient import NotebookClient  # installed with jupyterlab (the dev extra)

    # The kernel runs in the notebook's folder: a file named relative to where this script was
    # started (VISINSPECT_BACKBONE_WEIGHTS=../shared/..., as the README writes it) is made absolute.
    for name, value in os.environ.items():
        if name.startswith("VISINSPECT_") and value and Path(value).exists():
            os.environ[name] = str(Path(value).resolve())
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=None, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


def main(args: list[str]) -> int:
    run = "--execute" in args
    paths = [a for a in args if a != "--execute"]
    notebooks = [Path(p) for p in paths] or sorted(Path(__file__).parent.glob("*.ipynb"))
    failed = False
    for path in notebooks:
        if run:
            print(f"executing {path} ...", file=sys.stderr)
            execute(path)
        nb = clean(nbformat.read(path, as_version=4))
        nbformat.write(nb, path)
        text = path.read_text(encoding="utf-8")
        if found := ABSOLUTE_PATH.search(text):
            line = text[: found.start()].count("\n") + 1
            print(f"{path}:{line}: absolute path {found.group()!r} in the notebook: print paths "
                  "relative to the data root or the repository", file=sys.stderr)
            failed = True
        for n in unexplained_ignores(nb):
            print(f"{path}: code cell {n} is tagged {IGNORE_TAG} without saying why: add "
                  f'"{REASON_KEY}": "<why>" to its metadata', file=sys.stderr)
            failed = True
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
