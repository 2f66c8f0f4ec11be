"""Property tests for data.build_sample_table on random MVTec-style folder trees.

Each example builds a small tree (random categories, good and defective images, masks present or
missing, stray files, odd and unicode names, one or two roots) and checks the table against what
was written: counts, labels, masks, stray files, sorted order.
"""

import io
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visinspect.data.samples import SPLITS, build_sample_table

_buf = io.BytesIO()
Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(_buf, "PNG")
TINY_PNG = _buf.getvalue()  # the table never decodes images: one 4 x 4 PNG serves every name

NAMES = ["img", "défaut 01", "画像", "with space", "UPPER", "a.b", "-dash", "x" * 60]
EXTENSIONS = [".png", ".PNG", ".jpg", ".JPEG", ".bmp", ".tif", ".Tiff"]
STRAY_NAMES = [".DS_Store", "notes.txt", "Thumbs.db", "README", "image.png.bak", ".hidden.png",
               "desktop.ini", "scan.webp"]
CATEGORY_NAMES = ["bottle", "écrou", "tile 2", "木材", "zz"]
DEFECT_NAMES = ["crack", "défaut", "scratch mark", "color"]


@dataclass
class Category:
    name: str
    root: int  # which of the two data roots holds it
    train_good: list[str]
    test_good: list[str]
    defects: dict[str, list[tuple[str, bool]]]  # defect type -> (file name, has a mask)
    strays: list[tuple[str, str]] = field(default_factory=list)  # (folder inside category, name)


def file_names(draw, n_max: int) -> list[str]:
    """Distinct image file names: a random stem (made unique by an index) and extension."""
    n = draw(st.integers(0, n_max))
    stems = [f"{draw(st.sampled_from(NAMES))}_{i}" for i in range(n)]
    return [stem + draw(st.sampled_from(EXTENSIONS)) for stem in stems]


@st.composite
def categories(draw) -> list[Category]:
    names = draw(st.lists(st.sampled_from(CATEGORY_NAMES), min_size=1, max_size=3, unique=True))
    out = []
    for name in names:
        defects = {}
        for d in draw(st.lists(st.sampled_from(DEFECT_NAMES), max_size=2, unique=True)):
            images = file_names(draw, 3) or [f"only_0{draw(st.sampled_from(EXTENSIONS))}"]
            defects[d] = [(f, draw(st.booleans())) for f in images]
        root = draw(st.integers(0, 1))
        cat = Category(name, root, file_names(draw, 3), file_names(draw, 3), defects)
        if not (cat.train_good or cat.test_good or defects):
            cat.train_good = ["lonely.png"]  # a category without images is an error (test_data)
        folders = ["train/good", "test/good", "test", "train", "ground_truth"]
        folders += [f"{top}/{d}" for d in defects for top in ("test", "ground_truth")]
        stray = st.tuples(st.sampled_from(folders), st.sampled_from(STRAY_NAMES))
        cat.strays = draw(st.lists(stray, max_size=4, unique=True))
        out.append(cat)
    return out


def write_tree(roots: list[Path], cats: list[Category]) -> dict:
    """Write the tree; return what the table should hold."""
    expected = {"samples": [], "strays": set(), "missing_masks": set()}
    for root in roots:
        root.mkdir()
        (root / "notes.txt").write_text("not a category")  # files at root level are ignored
        (root / "misc").mkdir()  # nor is a folder without train/ or test/
    for cat in cats:
        base = roots[cat.root] / cat.name
        groups = [("train", "good", [(f, False) for f in cat.train_good]),
                  ("test", "good", [(f, False) for f in cat.test_good])]
        groups += [("test", d, images) for d, images in cat.defects.items()]
        for split, kind, images in groups:
            folder = base / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for name, has_mask in images:
                (folder / name).write_bytes(TINY_PNG)
                mask = base / "ground_truth" / kind / f"{Path(name).stem}_mask.png"
                if has_mask:
                    mask.parent.mkdir(parents=True, exist_ok=True)
                    mask.write_bytes(TINY_PNG)
                elif kind != "good":
                    expected["missing_masks"].add(folder / name)
                expected["samples"].append(
                    (cat.name, split, kind, folder / name, mask if has_mask else None))
        for folder, name in cat.strays:
            path = base / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"stray")
            expected["strays"].add(path)
    # The order promised: category, split (train before test), defect type, file name.
    expected["samples"].sort(key=lambda s: (s[0], SPLITS.index(s[1]), s[2], s[3].name))
    return expected


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(cats=categories())
def test_table_matches_the_tree(cats):
    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(tmp) / "root one", Path(tmp) / "root 2"]
        expected = write_tree(roots, cats)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = build_sample_table(roots)
        got = [(s.category, s.split, s.defect_type, s.path, s.mask_path) for s in table.samples]
        assert got == expected["samples"]
        assert all(s.label == int(s.defect_type != "good") for s in table.samples)
        assert table.categories == sorted(c.name for c in cats)
        assert len(table.stray_files) == len(set(table.stray_files)) == len(expected["strays"])
        assert set(table.stray_files) == expected["strays"]
        assert set(table.missing_masks) == expected["missing_masks"]
        # One warning about missing masks exactly when some are missing.
        mask_warnings = [w for w in caught if "no mask" in str(w.message)]
        assert len(mask_warnings) == bool(expected["missing_masks"])

        # The split filter partitions the table; a subset of categories is that subset.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same mask warning again
            parts = [build_sample_table(roots, split=split).samples for split in SPLITS]
            first = build_sample_table(roots, [cats[0].name]).samples
        by_path = lambda samples: sorted(samples, key=lambda s: str(s.path))  # noqa: E731
        assert by_path(parts[0] + parts[1]) == by_path(table.samples)
        assert first == [s for s in table.samples if s.category == cats[0].name]
