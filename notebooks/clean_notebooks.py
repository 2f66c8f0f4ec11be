"""Re-execute the notebooks in order in one run and strip what changes from run to run.

Every notebook, in order, in one run, ready to commit (from the repository root)::

    python notebooks/clean_notebooks.py --execute     # or name some notebooks

Notebook 02 trains the checkpoint weights/demo_baseline.pt that every later notebook loads, so the
stored outputs of all notebooks come from one model (each prints its digest; the tests check that
they agree). The run has the environment of CI's run with ../shared (.ci/run), where nbval
compares the stored outputs: the ImageNet weights of VGG16 and MobileNetV2
(VISINSPECT_BACKBONE_WEIGHTS and VISINSPECT_MOBILENET_WEIGHTS if set, else
../shared/weights/vgg16_features_imagenet.pth and mobilenet_v2_imagenet.pth), fp32, no download,
the synthetic data (VISINSPECT_DATA is ignored), ../shared/data as VISINSPECT_SHARED_DATA when it is
there, and a fresh feature store. Without the weights it refuses and says what is missing. It
prints how long each notebook took (a Run All from a cold feature store).

Without `--execute` it only cleans notebooks already executed top to bottom.

What cleaning does: cell ids become "cell-01", "cell-02", ...; per-cell timing metadata goes; the
notebook metadata keeps only a stable `python3` kernelspec and the language name (no Python
version, no widget state); consecutive stream outputs are merged; widget views, whose state is
not stored, are replaced by a one-line note. It fails, naming the notebook, if an absolute path
of this machine is left in it, or if a cell tagged `nbval-ignore-output` does not say why in its
metadata (`"nbval-ignore-output-reason": "..."`); tests/test_notebooks_stored.py checks the same.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
VOLATILE_CELL_KEYS = ("execution", "ExecuteTime", "collapsed", "scrolled")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "[a widget: run this cell in Jupyter to see it]"
IGNORE_TAG = "nbval-ignore-output"
CELL_TIMEOUT = 900  # seconds
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


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHT_FILES = {  # the environment variable and where CI finds the file (.ci/run)
    "VISINSPECT_BACKBONE_WEIGHTS": SHARED / "weights" / "vgg16_features_imagenet.pth",
    "VISINSPECT_MOBILENET_WEIGHTS": SHARED / "weights" / "mobilenet_v2_imagenet.pth",
}


def run_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment of CI's run with ../shared, where the stored outputs are compared (see the
    module's docstring); a SystemExit that says what is missing when a weights file is."""
    env = {k: v for k, v in environ.items() if k != "VISINSPECT_DATA"}
    for name, default in WEIGHT_FILES.items():
        path = Path(env.get(name) or default).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(
                f"--execute needs the ImageNet weights the stored outputs come from: {name} "
                f"({path} is not a file). Set {name}=FILE or put the file there (weights/README.md "
                "says where to get it); without them every number would change."
            )
        env[name] = str(path)
    env.update(VISINSPECT_PRECISION="fp32", VISINSPECT_OFFLINE="1")
    if (SHARED / "data").is_dir():
        env.setdefault("VISINSPECT_SHARED_DATA", str(SHARED / "data"))
    return env


def execute(path: Path) -> float:
    """Run a notebook top to bottom in a fresh kernel, in its own folder, store its outputs and
    return the seconds it took (the kernel inherits this process's environment)."""
    from nbclient import NotebookClient  # installed with jupyterlab (the dev extra)

    nb = nbformat.read(path, as_version=4)
    start = time.monotonic()
    # A cell may run for minutes (02 trains), never for CELL_TIMEOUT: a kernel that stopped
    # answering then fails the run, naming the notebook, instead of waiting for ever.
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.monotonic() - start
    nbformat.write(nb, path)
    return seconds


def main(args: list[str]) -> int:
    run = "--execute" in args
    paths = [a for a in args if a != "--execute"]
    notebooks = [Path(p) for p in paths] or sorted(Path(__file__).parent.glob("*.ipynb"))
    failed = False
    store = None
    if run:
        env = run_environment(dict(os.environ))
        os.environ.pop("VISINSPECT_DATA", None)
        os.environ.update(env)
        store = tempfile.mkdtemp(prefix="visinspect-notebook-store-")
        os.environ["VISINSPECT_FEATURE_STORE"] = store  # every notebook's features computed here
        from visinspect.experiments.demo import outputs_not_reproducible

        if why := outputs_not_reproducible():  # the rule under which nbval compares (conftest.py)
            raise SystemExit(f"the stored outputs would not be compared in this environment: {why}")
    try:
        for path in notebooks:
            if run:
                print(f"executing {path} ...", file=sys.stderr)
                print(f"{path.name}: {execute(path):.0f} s", file=sys.stderr)
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
    finally:
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    return int(failed)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
