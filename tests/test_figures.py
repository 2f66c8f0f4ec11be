"""The figures command draws every documented figure, and the docs' image links resolve."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from visinspect.backbones.cam import anomaly_cam

REPO = Path(__file__).resolve().parents[1]


def _load_script(path: Path):
    """docs/figures.py is a script beside the pages it draws, not a library module."""
    spec = importlib.util.spec_from_file_location("docs_figures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_figures = _load_script(REPO / "docs" / "figures.py")
FIGURE_NAMES, add_arguments, cam_pieces, run = (
    _figures.FIGURE_NAMES, _figures.add_arguments, _figures.cam_pieces, _figures.run)
# Every figure is at least 6 x 4.4 inches at plots.DPI = 120 (save_figure crops only margins).
MIN_WIDTH, MIN_HEIGHT = 600, 400
# ![alt](path), ![alt](<path with spaces>) and ![alt](path "title")
MARKDOWN_IMAGE = re.compile(
    r"!\[[^\]]*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+[\"'][^\"']*[\"'])?\s*\)"
)
HTML_IMAGE = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


@pytest.fixture(scope="module")
def figures_dir(tmp_path_factory) -> Path:
    """The figures command in small mode (random weights, tiny data): seconds, nothing trained."""
    out = tmp_path_factory.mktemp("figures")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(out), "--small"])) == 0
    return out


@pytest.mark.slow
def test_figures_command_writes_every_figure(figures_dir):
    assert sorted(p.name for p in figures_dir.iterdir()) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        path = figures_dir / name
        assert path.stat().st_size > 0, name
        with Image.open(path) as img:
            img.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as img:
            assert img.format == "PNG", name
            assert img.width >= MIN_WIDTH and img.height >= MIN_HEIGHT, (name, img.size)


def test_figure_names_are_the_documented_pngs():
    assert FIGURE_NAMES == (
        "model_train_pipeline.png",
        "model_inference_pipeline.png",
        "classification_head_detailed.png",
        "heatmap_calculation.png",
        "heatmap_to_bbox.png",
        "results_grid.png",
        "confusion_matrix.png",
    )


def test_cam_pieces_add_up_to_the_cam(pristine_model):
    torch.manual_seed(0)
    with torch.no_grad():
        maps = pristine_model.feature_maps(torch.randn(1, 3, 64, 64))
    channels, terms, rest, cam = cam_pieces(pristine_model, maps, n=3)
    w = pristine_model.fc.weight[1].detach()
    contribution = (w * maps[0].mean(dim=(1, 2))).abs()
    assert len(set(channels)) == 3
    assert contribution[channels].min() >= contribution.topk(3).values.min()
    torch.testing.assert_close(terms[0], w[channels[0]] * maps[0, channels[0]])
    torch.testing.assert_close(terms.sum(0) + rest, anomaly_cam(pristine_model, maps)[0])
    torch.testing.assert_close(cam, anomaly_cam(pristine_model, maps)[0])


def _image_links(text: str) -> list[str]:
    """Local image targets of markdown `![..](..)` and HTML `<img src=..>` (URLs left out)."""
    targets = [a or b for a, b in MARKDOWN_IMAGE.findall(text)] + HTML_IMAGE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_image_link_parser():
    text = ('![a](docs/x.png) ![b](<docs/y z.png> "title") <img width=3 src="docs/w.png"> '
            "![c](https://example.com/badge.svg)")
    assert _image_links(text) == ["docs/x.png", "docs/y z.png", "docs/w.png"]


def test_docs_image_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    links = [(page, t) for page in pages if page.is_file() for t in _image_links(page.read_text())]
    assert links, "README.md and docs/*.md link no image: add the figures from docs/"
    broken = []
    for page, target in links:
        path = (page.parent / unquote(target.split("#")[0])).resolve()
        if not path.is_file() or not path.is_relative_to(REPO):
            broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"image links to files missing from the repo: {broken}"
