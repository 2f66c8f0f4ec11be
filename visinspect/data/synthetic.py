"""Embedded synthetic dataset in the MVTec AD layout: the default wherever no real data is given.

Six procedurally drawn categories (three textures, three objects), each with good images and three
defect types whose ground-truth masks are exact: a defect only ever changes the pixels its mask
marks. Every image comes from its own seed, split into one random stream for the scene and a
separate one for the defect, so `render_sample(..., defect_type=None)` with the same seed gives
the defect-free twin of a defective image.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from visinspect.data.drawing import CATEGORIES, TEXTURES, check_category, check_seed_and_size, render_sample
from visinspect.data.samples import default_synthetic_root
from visinspect.errors import VisinspectError

GENERATOR_VERSION = 1
STAMP_NAME = ".visinspect-synthetic.json"

# Settings of the default dataset (also what ensure_synthetic_dataset checks the stamp against).
_DEFAULTS = {"image_size": 128, "n_train_good": 24, "n_test_good": 10, "n_test_per_defect": 6}

def _image_seed(seed: int, category: str, folder: str, index: int) -> int:
    """Seed of one image from (seed, category, folder, index): independent of generation order."""
    key = zlib.crc32(f"{category}/{folder}".encode())
    return int(np.random.SeedSequence([seed, key, index]).generate_state(1, np.uint64)[0])


def _make_stamp(seed: int, categories: Sequence[str] | None, **settings: int) -> dict:
    """Check the generation settings and return them as the stamp that describes the dataset."""
    names = list(dict.fromkeys(CATEGORIES if categories is None else categories))
    for name in names:
        check_category(name)
    check_seed_and_size(seed, settings["image_size"])
    for key, value in settings.items():
        if int(value) < 1:
            raise VisinspectError(f"{key} must be a positive integer, got {value}")
    # "generator" is the dataset's kind, kept from before the data/ package: a stamp that names
    # another would make every dataset generated before look stale.
    return {"generator": "visinspect.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
            **{key: int(value) for key, value in settings.items()}, "categories": names}


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
    if not ok:
        raise VisinspectError(f"could not encode {path} as PNG")
    path.write_bytes(buf.tobytes())


def _readme(stamp: dict) -> str:
    rows = "\n".join(
        f"| {c} | {'texture' if c in TEXTURES else 'object'} | {stamp['n_train_good']} | "
        f"{stamp['n_test_good']} | {', '.join(CATEGORIES[c])} ({stamp['n_test_per_defect']} each) |"
        for c in stamp["categories"])
    total = sum(stamp["n_train_good"] + stamp["n_test_good"]
                + stamp["n_test_per_defect"] * len(CATEGORIES[c]) for c in stamp["categories"])
    size, seed = stamp["image_size"], stamp["seed"]
    return f"""# Synthetic defect-inspection dataset (made by visinspect)

Every image here is **synthetic**: drawn procedurally by `visinspect.data.synthetic` (generator
version {stamp["version"]}, seed {seed}, {size}×{size} px). No real product was photographed.

It is for learning and for checking the pipeline: the notebooks, the command line and the tests
run anywhere in seconds without a download. Scores measured on it say nothing about real
inspection performance. The layout is MVTec AD's (`train/good`, `test/<type>`,
`ground_truth/<type>/NNN_mask.png` with 0/255 masks), but the category names differ, so this
root can be combined with a real one.

| category | kind | train/good | test/good | test defects |
|---|---|---|---|---|
{rows}

{total} images in all. Regenerate the identical files with
`visinspect.data.synthetic.generate_synthetic_dataset(OUT, seed={seed})`.
"""


def _build(out: Path, stamp: dict) -> Path:
    """Write the whole dataset into a new hidden sibling folder of `out` and return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # unlike mkdtemp, keeps the user's umask for the final folder
    try:
        size = stamp["image_size"]
        for category in stamp["categories"]:
            jobs = [("train", "good", stamp["n_train_good"]), ("test", "good", stamp["n_test_good"])]
            jobs += [("test", d, stamp["n_test_per_defect"]) for d in CATEGORIES[category]]
            for split, kind, count in jobs:
                folder = tmp / category / split / kind
                folder.mkdir(parents=True)
                if kind != "good":
                    (tmp / category / "ground_truth" / kind).mkdir(parents=True)
                for i in range(count):
                    seed = _image_seed(stamp["seed"], category, f"{split}/{kind}", i)
                    defect = None if kind == "good" else kind
                    image, mask = render_sample(category, defect, seed, size)
                    _write_png(folder / f"{i:03d}.png", image)
                    if defect is not None:
                        _write_png(tmp / category / "ground_truth" / kind / f"{i:03d}_mask.png",
                                   mask.astype(np.uint8) * 255)
        (tmp / "README.md").write_text(_readme(stamp), encoding="utf-8")
        # The stamp goes last: a folder holding it is complete.
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, out: Path) -> bool:
    """Rename `tmp` to `out` in one step; False (tmp kept) if `out` is a non-empty folder."""
    try:
        os.rename(tmp, out)  # atomic, and also replaces an empty folder
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and out.is_dir():
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _swap(tmp: Path, out: Path) -> None:
    """Replace the folder `out` by `tmp`; readers see the old or the new dataset, never a mix."""
    for _ in range(3):  # a concurrent run may publish between our two renames: try again
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(out, old)
        published = _publish(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        if published:
            return
    shutil.rmtree(tmp, ignore_errors=True)
    raise VisinspectError(f"could not replace {out}: another process keeps writing to it")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def generate_synthetic_dataset(out: str | Path, seed: int = 0, *,
                               image_size: int = _DEFAULTS["image_size"],
                               n_train_good: int = _DEFAULTS["n_train_good"],
                               n_test_good: int = _DEFAULTS["n_test_good"],
                               n_test_per_defect: int = _DEFAULTS["n_test_per_defect"],
                               categories: Sequence[str] | None = None,
                               overwrite: bool = False) -> Path:
    """Write the synthetic dataset (MVTec AD layout) to `out` and return its path.

    The files are built in a temporary sibling folder and renamed into place, so `out` never
    holds a half-written dataset. An existing non-empty `out` is refused, or with overwrite=True
    replaced (its old contents are deleted).
    """
    out = Path(out)
    stamp = _make_stamp(seed, categories, image_size=image_size, n_train_good=n_train_good,
                        n_test_good=n_test_good, n_test_per_defect=n_test_per_defect)
    if out.exists() and not out.is_dir():
        raise VisinspectError(f"{out} is a file; give a folder path for the synthetic dataset")
    exists = (f"{out} already exists and is not empty; choose a new folder, or pass "
              "overwrite=True to replace it")
    if _is_nonempty_dir(out) and not overwrite:
        raise VisinspectError(exists)
    tmp = _build(out, stamp)
    if not _publish(tmp, out):
        if not overwrite:  # another process filled `out` meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            raise VisinspectError(exists)
        _swap(tmp, out)
    return out


def ensure_synthetic_dataset(root: str | Path, seed: int = 0) -> Path:
    """Return `root` holding the default synthetic dataset, generating it only if missing or stale.

    A stamp file records how the dataset was made; a matching stamp means nothing is written.
    Safe when several processes call it at once: the first rename wins and the others keep the
    finished dataset they find.
    """
    root = Path(root)
    want = _make_stamp(seed, None, **_DEFAULTS)
    found = _read_stamp(root)
    if found == want:
        return root
    if found is None and _is_nonempty_dir(root):
        raise VisinspectError(f"{root} is not empty and is not a visinspect synthetic dataset; "
                              "choose another folder or empty it")
    tmp = _build(root, want)
    if _publish(tmp, root):
        return root
    found = _read_stamp(root)
    if found == want:  # a concurrent call finished first
        shutil.rmtree(tmp, ignore_errors=True)
    elif found is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VisinspectError(f"{root} was filled by something other than visinspect while the "
                              "synthetic dataset was being written; choose another folder")
    else:  # an outdated synthetic dataset: ours replaces it
        _swap(tmp, root)
    return root


def data_roots(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """`roots` as paths or, when none is given, the embedded synthetic dataset (generated on first
    use): what the commands read without --data."""
    if roots:
        return [Path(r) for r in roots]
    return [ensure_synthetic_dataset(default_synthetic_root())]
