"""The committed notebooks are stored executed, clean and honest about what nbval ignores.

`pytest --nbval` compares fresh outputs with the stored ones, so a notebook committed without
outputs would pass vacuously, and one with an error, a path of the author's machine or widget
state would mislead its readers. nbval never compares Markdown, so a number typed into prose can
drift from the run: a person writes the prose, each number it rests on is printed by a code cell
next to it (which nbval compares) or asserted, and no Markdown cell of a results section holds a
decimal number. The notebooks are one run of one model: every notebook that trains or loads the
course's checkpoint stores the digest of its weights, and the digests agree. These checks read the
JSON only (no kernel): they are fast.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IGNORE_TAG = "nbval-ignore-output"
REASON_KEY = "nbval-ignore-output-reason"  # why nbval may not compare it: metadata, not a comment
REASON_COMMENT = re.compile(rf"^\s*# {IGNORE_TAG}", re.MULTILINE)
HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.MULTILINE)
RESULTS_HEADING = re.compile(r"what the numbers show|results", re.IGNORECASE)
DECIMAL = re.compile(r"(?<![\w.])\d*\.\d+")
EXERCISE = re.compile(r"^\d+\.\s", re.MULTILINE)
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.])/(?:work|tmp|root|home|Users|private|var|opt|mnt|srv)/|\b[A-Za-z]:\\\\"
)
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CHECKPOINT = "weights/demo_baseline.pt"  # trained by notebook 02, loaded by the later ones
DIGEST = re.compile(r"(\S+\.pt) \(weights digest ([0-9a-f]{12})\)")  # demo.checkpoint_line
USES_CHECKPOINT = re.compile(r"model=True|course\.checkpoint|demo_baseline\.pt")


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
        metadata = cell.get("metadata", {})
        tags = metadata.get("tags", [])
        if IGNORE_TAG in tags and not str(metadata.get(REASON_KEY, "")).strip():
            found.append(f"code cell {n} is tagged {IGNORE_TAG} but its metadata does not say why "
                         f"({REASON_KEY!r})")
        if REASON_KEY in metadata and IGNORE_TAG not in tags:
            found.append(f"code cell {n} gives a reason to ignore its output but is not tagged {IGNORE_TAG}")
        if REASON_COMMENT.search(_source(cell)):
            found.append(f"code cell {n} explains {IGNORE_TAG} in a comment: move the reason to its "
                         f"metadata ({REASON_KEY!r})")
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                found.append(f"code cell {n} stored an error: {out.get('ename')}: {out.get('evalue')}")
            elif out["output_type"] == "stream" and out["name"] == "stderr" and IGNORE_TAG not in tags:
                found.append(f"code cell {n} is checked by nbval but wrote to stderr: "
                             f"{''.join(out['text'])[:120]!r}")
    found += results_problems(nb["cells"])
    if "widgets" in nb.get("metadata", {}) or WIDGET_STATE in text:
        found.append("widget state is stored (run notebooks/clean_notebooks.py)")
    if match := ABSOLUTE_PATH.search(text):
        found.append(f"an absolute path of the machine that ran it is stored: {match.group()!r}...")
    return found


def _outputs_text(cell: dict) -> str:
    """What a code cell printed or displayed, as text."""
    parts = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        texts = [out.get("text", ""), data.get("text/plain", ""), data.get("text/markdown", "")]
        parts += ["".join(t) if isinstance(t, list) else t for t in texts]
    return "\n".join(parts)


def checkpoint_problems(notebooks: dict[str, dict]) -> list[str]:
    """The course is one run of one model: every notebook that trains or loads the course's
    checkpoint prints its digest (demo.checkpoint_line), and all the stored digests agree."""
    found, names_by_digest = [], {}
    for name, nb in notebooks.items():
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        digests = {d for c in code for path, d in DIGEST.findall(_outputs_text(c)) if path == CHECKPOINT}
        if any(USES_CHECKPOINT.search(_source(c)) for c in code) and not digests:
            found.append(f"{name} trains or loads {CHECKPOINT} but its stored outputs show no digest "
                         "of it (print demo.checkpoint_line)")
        for digest in digests:
            names_by_digest.setdefault(digest, []).append(name)
    if len(names_by_digest) > 1:
        found.append("the stored outputs come from different checkpoints ("
                     + "; ".join(f"{d}: {', '.join(n)}" for d, n in sorted(names_by_digest.items()))
                     + "): re-execute them in one run, python notebooks/clean_notebooks.py --execute")
    return found


def results_sections(cells: list[dict]) -> list[tuple[str, list[dict]]]:
    """(heading, cells) of each results section: from a Markdown heading that names results
    ("What the numbers show", "Results") to the next heading of the same or a higher level
    (a cell with text before that heading still belongs to the section)."""
    sections, level, current = [], None, None
    for cell in cells:
        source = _source(cell) if cell["cell_type"] == "markdown" else ""
        headings = list(HEADING.finditer(source))
        if current is not None and (not headings or source[: headings[0].start()].strip()):
            current.append(cell)
        for heading in headings:
            hashes, title = heading.groups()
            if level is not None and len(hashes) <= level:
                level = current = None
            if level is None and RESULTS_HEADING.search(title):
                level, current = len(hashes), [cell]
                sections.append((title.strip(), current))
        if current is not None and current[-1] is not cell:  # a subsection's heading
            current.append(cell)
    return sections


def results_problems(cells: list[dict]) -> list[str]:
    """A results section states its numbers from code: it has a code cell, and its Markdown
    cells hold no decimal number (a typed number is never compared with the run)."""
    found = []
    for title, section in results_sections(cells):
        if not any(c["cell_type"] == "code" for c in section):
            found.append(f"results section {title!r} has no code cell stating its results")
        for cell in section:
            if cell["cell_type"] == "markdown" and (match := DECIMAL.search(_source(cell))):
                found.append(f"results section {title!r}: a Markdown cell states the number "
                             f"{match.group()!r}; print it from a code cell next to the prose")
    return found


def ending_problems(cells: list[dict]) -> list[str]:
    """A chapter ends with two or three exercises (a numbered list) and its references."""
    titles = {title.strip().lower(): cell for cell in cells if cell["cell_type"] == "markdown"
              for _, title in HEADING.findall(_source(cell))}
    found = []
    exercises = titles.get("exercises")
    if exercises is None:
        found.append("no '## Exercises' section")
    elif not 2 <= len(EXERCISE.findall(_source(exercises))) <= 3:
        found.append("the exercises are not a numbered list of two or three")
    if "references" not in titles:
        found.append("no '## References' section")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the course notebooks in notebooks/; found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_and_clean(path):
    text = path.read_text(encoding="utf-8")
    assert problems(json.loads(text), text) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_exercises_and_references(path):
    assert ending_problems(json.loads(path.read_text(encoding="utf-8"))["cells"]) == []


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if not p.name.startswith("01_")],
                         ids=lambda p: p.name)
def test_notebooks_that_measure_state_their_results_from_code(path):
    # 01 only looks at the data; every later notebook trains or scores models, and says what its
    # numbers show in a results section (its Markdown is checked in problems()).
    assert results_sections(json.loads(path.read_text(encoding="utf-8"))["cells"])


def test_the_notebooks_show_one_checkpoint():
    notebooks = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in NOTEBOOKS}
    assert checkpoint_problems(notebooks) == []


def _notebook(cells: list[dict], metadata: dict | None = None) -> tuple[dict, str]:
    nb = {"cells": cells, "metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}
    return nb, json.dumps(nb)


def _code(count, source="x = 1", outputs=(), tags=(), reason=None):
    metadata = {"tags": list(tags)} if tags else {}
    if reason is not None:
        metadata[REASON_KEY] = reason
    return {"cell_type": "code", "execution_count": count, "source": source,
            "outputs": list(outputs), "metadata": metadata}


def _md(source):
    return {"cell_type": "markdown", "source": source, "metadata": {}}


def test_a_clean_executed_notebook_has_no_problems():
    ignored = _code(2, "run()", tags=[IGNORE_TAG], reason="timings vary",
                    outputs=[{"output_type": "stream", "name": "stderr", "text": "50%|##"}])
    results = [_md("## 5. What the numbers show\n\nThe run below says it (chance is 0.5 elsewhere?)"
                   .replace("0.5", "one half")), _code(3, "display(Markdown(f'{auroc:.3f}'))"),
               _md("## Next\n\nNotebook 0.4 and 3.2 px may follow a results section.")]
    nb, text = _notebook([_md("# hi"), _code(1), ignored, *results])
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
        ([_code(1, "run()", tags=[IGNORE_TAG])], None, "does not say why"),
        ([_code(1, "run()", tags=[IGNORE_TAG], reason=" ")], None, "does not say why"),
        ([_code(1, f"# {IGNORE_TAG}: timings\nrun()", tags=[IGNORE_TAG], reason="timings")], None,
         "in a comment"),
        ([_code(1, "run()", reason="timings")], None, "not tagged"),
        ([_md("### What the numbers show\n\nAUROC about 0.64 against 0.69."), _code(1)], None,
         "'0.64'"),
        ([_md("## Results"), _code(1), _md("### the table\n\nrecall .5 here")], None, "'.5'"),
        ([_md("## 6. What the numbers show\n\nSimCLR did not help."), _md("## Next")], None,
         "no code cell"),
    ],
    ids=["unexecuted", "out-of-order", "gap", "error", "stderr", "posix-path", "windows-path",
         "widget-state", "no-reason", "empty-reason", "reason-as-comment", "reason-without-tag",
         "decimal-in-results", "decimal-in-results-subsection", "results-without-code"],
)
def test_each_problem_is_caught(cells, metadata, expected):
    nb, text = _notebook(cells, metadata)
    found = problems(nb, text)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ([_md("## Exercises\n\n1. one\n2. two"), _md("## References\n\n- a")], []),
        ([_md("## Exercises\n\n1. one\n2. two\n3. three\n\n## References\n\n- a")], []),
        ([_md("## Exercises\n\n1. only one"), _md("## References")], ["two or three"]),
        ([_md("## Exercises\n\n1. a\n2. b\n3. c\n4. d"), _md("## References")], ["two or three"]),
        ([_md("## References")], ["Exercises"]),
        ([_md("## Exercises\n\n1. one\n2. two")], ["References"]),
    ],
    ids=["separate-cells", "one-cell", "too-few", "too-many", "no-exercises", "no-references"],
)
def test_ending_problems(cells, expected):
    found = ending_problems(cells)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True))


def test_results_sections_end_at_the_next_heading_of_their_level():
    cells = [_md("## 3. Results\n\ntext"), _code(1), _md("### detail"),
             _md("the end of section 3, 0.5\n\n## 4. Next"), _md("# Top\n\n## What the numbers show")]
    (first, section), (second, rest) = results_sections(cells)
    assert (first, second) == ("3. Results", "What the numbers show")
    assert section == cells[:4] and rest == cells[4:]
    assert "'0.5'" in results_problems(cells)[0]


def _printed(count, source, text):
    return _code(count, source, outputs=[{"output_type": "stream", "name": "stdout", "text": text}])


SAVED = "weights/demo_baseline.pt (weights digest 0123456789ab)"


@pytest.mark.parametrize(
    ("notebooks", "expected"),
    [
        ({"01": [_code(1, "course = demo.course_setup()")],
          "02": [_printed(1, "save(course.checkpoint)", SAVED)],
          "03": [_printed(1, "demo.course_setup(model=True)",
                          "loaded: weights/demo_baseline.pt (weights digest 0123456789ab)\n")]}, []),
        ({"02": [_printed(1, "save(course.checkpoint)", SAVED)],
          "03": [_printed(1, "demo.course_setup(model=True)",
                          "loaded: weights/demo_baseline.pt (weights digest ba9876543210)")]},
         ["different checkpoints (0123456789ab: 02; ba9876543210: 03)"]),
        ({"04": [_printed(1, "demo.course_setup(model=True)", "loaded weights/demo_baseline.pt")]},
         ["04 trains or loads weights/demo_baseline.pt but its stored outputs show no digest"]),
    ],
    ids=["one-model", "two-models", "no-digest"],
)
def test_checkpoint_problems(notebooks, expected):
    found = checkpoint_problems({name: {"cells": cells} for name, cells in notebooks.items()})
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True)), found
