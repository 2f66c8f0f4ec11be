"""Docs that cannot drift: the results page and the README's results and method tables are what the
code writes from committed rows; every `python -m visinspect` line parses; the README names the
JSON-line fields that `predict` writes."""

import json
import re
import shlex
from pathlib import Path

import pytest

from visinspect import cli
from visinspect.backbones.store import STORE_ENV
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.experiments import report
from visinspect.experiments.tables import chosen_on_all_targets, headline_k
from visinspect.methods.registry import DEFAULT_MODELS, METHODS, RECOMMENDED, methods_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ROWS = sorted((REPO / "docs" / "rows").glob("*.json"))
SYNTHETIC_ROWS = Path(__file__).parent / "fixtures" / "report_rows.json"  # a synthetic loo with provenance
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "CHANGELOG.md"]
METHODS_START, METHODS_END = "<!-- methods:start -->", "<!-- methods:end -->"
PREFIX = "python -m visinspect "


def test_results_page_is_what_report_writes_from_the_committed_rows():
    assert ROWS, "docs/rows/ holds no rows file: the results page must come from one"
    page = report.report_markdown(ROWS, REPO / "docs", REPO / "docs" / "anchors.json")
    assert page == (REPO / "docs" / "results.md").read_text(), (
        "docs/results.md differs from its rows: run `python -m visinspect report --rows docs/rows/*.json "
        "--out docs/results.md --readme README.md`")


def test_readme_results_block_is_what_report_writes():
    text = README.read_text()
    assert report.replace_block(text, report.readme_block(ROWS)) == text


def test_report_command_writes_page_and_readme_block(tmp_path):
    rows = [SYNTHETIC_ROWS]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nend\n")
    out = tmp_path / "docs" / "results.md"
    assert cli.main(["report", "--rows", *map(str, rows), "--out", str(out), "--readme", str(readme),
                     "--anchors", str(REPO / "docs" / "anchors.json")]) == 0
    assert out.read_text().startswith("# Results\n")
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(report.FIGURES)
    assert readme.read_text() == f"intro\n{report.readme_block(rows)}\nend\n"
    page = out.read_text()
    assert "`python -m visinspect loo --data /tmp/s" in page and "No classifier pre-trained by SimCLR" in page
    assert "| mean | | | | **" in page  # the nested figure's mean, the headline


def test_the_shipped_method_is_the_one_the_protocol_chooses_on_every_product():
    """`train` without --method sets up RECOMMENDED: the method with the best mean image AUROC over
    all the products of the committed rows (each scored as the unknown one), at the headline K."""
    rows, _ = report.load_rows(ROWS)
    k = headline_k(sorted({int(r["model"].rsplit(" k=", 1)[1]) for r in rows if " k=" in r["model"]}))
    assert chosen_on_all_targets(rows, k) == RECOMMENDED


def test_results_pages_are_short():
    assert len(README.read_text().splitlines()) <= 250
    assert len((REPO / "docs" / "results.md").read_text().splitlines()) <= 250


def test_readme_method_table_is_methods_markdown_of_the_defaults():
    text = README.read_text()
    block = text[text.index(METHODS_START) + len(METHODS_START):text.index(METHODS_END)]
    assert block.strip() == methods_markdown(defaults_only=True)
    names = [line.split("|")[1].strip(" *`").removesuffix("`** (recommended)").strip("`*")
             for line in block.strip().splitlines()[2:]]
    assert names == list(DEFAULT_MODELS)
    assert len(methods_markdown().splitlines()) == len(METHODS) + 2


def commands(text: str) -> list[str]:
    """Every `python -m visinspect ...` command of a page: code-block lines (with `\\` continuations
    joined and any `VAR=value` prefix) and inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if PREFIX in line:
                found.append(line[line.index(PREFIX):])
    outside = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    found += [" ".join(span.split()) for span in re.findall(r"`(python -m visinspect [^`]+)`", outside)]
    return found


def test_commands_finder():
    text = ("```bash\nA=1 python -m visinspect loo --data x \\\n    --seeds 3  # note\n```\n"
            "and `python -m visinspect info\n  --check`")
    assert commands(text) == ["python -m visinspect loo --data x      --seeds 3  # note",
                              "python -m visinspect info --check"]


# Placeholders: they name no command (the README's help line and its library table's `cli` row),
# and the top-level help, which argparse answers by exiting.
GENERIC = {"python -m visinspect COMMAND --help", "python -m visinspect ...", "python -m visinspect --help"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_parses(page):
    parser = cli.build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    bad = []
    for command in commands(page.read_text()):
        argv = shlex.split(command, comments=True)[3:]
        if command in GENERIC:
            continue
        if len(argv) == 1:  # a command named in the prose, not run: it must exist
            bad += [] if argv[0] in names else [command]
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            bad.append(command)
    assert not bad, f"{page.name}: commands the parser refuses: {bad}"


@pytest.mark.slow
def test_readme_names_the_fields_predict_writes(tmp_path, monkeypatch):
    line = next(x for x in README.read_text().splitlines() if x.startswith("Each JSON line holds"))
    named = re.findall(r"`([a-z_]+)`", line)
    root = generate_synthetic_dataset(tmp_path / "data", image_size=64, n_train_good=4, n_test_good=1,
                                      n_test_per_defect=1, categories=["hex_nut"])
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "store"))
    weights = ("--backbone-weights", "random", "--precision", "fp32", "--device", "cpu")
    assert cli.main(["train", "--image-size", "64", *weights, "--out", str(tmp_path / "m.pt")]) == 0
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--reference-dir",
                     str(root / "hex_nut" / "train" / "good"), "--precision", "fp32", "--out",
                     str(tmp_path / "out"), str(root / "hex_nut" / "test")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(list(r) == named for r in rows)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(<?([^)>#\s]+)", page.read_text())
    local = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links files that are not in the repository: {missing}"


def test_every_figure_in_docs_is_linked():
    text = "".join(page.read_text() for page in PAGES)
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.png")) if p.name not in text]
    assert not unlinked, f"figures no page links (remove them or link them): {unlinked}"


@pytest.mark.parametrize(("script", "result", "page"), [
    ("bench_predict.py", "predict.json", "performance.md"),
    ("bench_distributed.py", "distributed.json", "scaling.md"),
])
def test_benchmark_blocks_are_what_the_benchmark_writes_from_its_committed_result(script, result, page):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(script[:-3], REPO / "benchmarks" / script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    measured = json.loads((REPO / "docs" / "benchmarks" / result).read_text())
    for path, markers, body in ((REPO / "docs" / page, bench.PAGE_BLOCK, bench.markdown(measured)),
                                (README, bench.README_BLOCK, bench.summary(measured))):
        text = path.read_text()
        assert report.replace_between(text, markers, body) == text, f"{path.name}: rerun benchmarks/{script}"
