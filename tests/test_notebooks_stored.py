"""The committed notebooks are stored executed, clean and honest about what nbval ignores.

`pytest --nbval` compares fresh outputs with the stored ones, so a notebook committed without
outputs would pass vacuously, and one with an error, a path of the author's machine or widget
state would mislead its readers. These checks read the JSON only (no kernel): they are fast.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IGNORE_TAG = "nbval-ignore-output"
REASON = re.compile(rf"# {IGNORE_TAG}: \S.*")  # the cell's first line says why
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.])/(?:work|tmp|root|home|Users|private|var|opt|mnt|srv)/|\b[A-Za-z]:\\\\"
)
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def problems(nb: dict, text: str) -> list[str]:
    """Everything wrong with a stored notebook (`text` is its JSON as written on disk)."""
    found = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        found.append(f"not executed top to bottom once: execution counts {counts}")
    for n, cell in enumerate(code, 1):
        tags = cell.get("metadata", {}).get("tags", [])
        first_line = _source(cell).split("\n", 1)[0]
        if IGNORE_TAG in tags and not REASON.fullmatch(first_line):
            found.append(f"code cell {n} is tagged {IGNORE_TAG} but its first line is not "
                         f"'# {IGNORE_TAG}: <why>': {first_line!r}")
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                found.append(f"code cell {n} stored an error: {out.get('ename')}: {out.get('evalue')}")
            elif out["output_type"] == "stream" and out["name"] == "stderr" and IGNORE_TAG not in tags:
                found.append(f"code cell {n} is checked by nbval but wrote to stderr: "
                             f"{''.join(out['text'])[:120]!r}")
    if "widgets" in nb.get("metadata", {}) or WIDGET_STATE in text:
        found.append("widget state is stored (run notebooks/clean_notebooks.py)")
    if match := ABSOLUTE_PATH.search(text):
        found.append(f"an absolute path of the machine that ran it is stored: {match.group()!r}...")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the course notebooks in notebooks/; found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_and_clean(path):
    text = path.read_text(encoding="utf-8")
    assert problems(json.loads(text), text) == []


def _notebook(cells: list[dict], metadata: dict | None = None) -> tuple[dict, str]:
    nb = {"cells": cells, "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}
    return nb, json.dumps(nb)


def _code(count, source="x = 1", outputs=(), tags=()):
    return {"cell_type": "code", "execution_count": count, "source": source,
            "outputs": list(outputs), "metadata": {"tags": list(tags)} if tags else {}}


def test_a_clean_executed_notebook_has_no_problems():
    ignored = _code(2, f"# {IGNORE_TAG}: timings vary\nrun()", tags=[IGNORE_TAG],
                    outputs=[{"output_type": "stream", "name": "stderr", "text": "50%|##"}])
    nb, text = _notebook([{"cell_type": "markdown", "source": "# hi", "metadata": {}},
                          _code(1), ignored])
    assert problems(nb, text) == []


@pytest.mark.parametrize(
    ("cells", "metadata", "expected"),
    [
        ([_code(None), _code(None)], None, "not executed"),
        ([_code(2), _code(1)], None, "not executed"),
        ([_code(1), _code(3)], None, "not executed"),
        ([_code(1, outputs=[{"output_type": "error", "ename": "ValueError", "evalue": "bad",
                             "traceback": []}])], None, "stored an error"),
        ([_code(1, outputs=[{"output_type": "stream", "name": "stderr", "text": "warn"}])], None,
         "wrote to stderr"),
        ([_code(1, outputs=[{"output_type": "stream", "name": "stdout",
                             "text": "saved /home/ann/visinspect/weights/x.pt"}])], None,
         "absolute path"),
        ([_code(1, "print('C:\\\\Users\\\\ann')")], None, "absolute path"),
        ([_code(1)], {"widgets": {WIDGET_STATE: {"state": {}}}}, "widget state"),
        ([_code(1, "run()", tags=[IGNORE_TAG])], None, "first line"),
        ([_code(1, f"# {IGNORE_TAG}:\nrun()", tags=[IGNORE_TAG])], None, "first line"),
    ],
    ids=["unexecuted", "out-of-order", "gap", "error", "stderr", "posix-path", "windows-path",
         "widget-state", "no-reason", "empty-reason"],
)
def test_each_problem_is_caught(cells, metadata, expected):
    nb, text = _notebook(cells, metadata)
    found = problems(nb, text)
    assert len(found) == 1 and expected in found[0], found
