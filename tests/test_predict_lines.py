"""predict's JSON lines pinned byte for byte: the same inputs give the same lines as when the fixture
was written (tests/data/predict_lines.jsonl, made with the code before the overlapped pipeline)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visinspect.checkpoint import save_classifier
from visinspect.methods.registry import load_detector
from visinspect.predict import RESULTS_NAME, predict_images

FIXTURE = Path(__file__).parent / "data" / "predict_lines.jsonl"
IMAGE_SIZE = 128  # MobileNetV2 maps of 8 x 8: boxes with some shape
# The methods the fixture was written with (the recommended one then, and the baseline): the test
# keeps the JSON lines' format and numbers, whatever method is recommended now.
METHODS = ("reference-mobilenet+patterns", "baseline")


def write_image(path: Path, seed: int, size: tuple[int, int], blob: bool) -> None:
    """Smooth seeded noise (a textured part), with a bright blob (a defect) if asked."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(60, 200, (h // 8 + 1, w // 8 + 1, 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR)).copy()
    if blob:
        y, x = np.ogrid[:h, :w]
        cy, cx, r = h // 3, w // 2, max(4, min(h, w) // 8)
        image[(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = (250, 250, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def make_inputs(root: Path) -> tuple[Path, Path]:
    """K = 4 good reference images; 8 test images (sizes vary, 3 with a blob) and a corrupt one."""
    for i in range(4):
        write_image(root / "good" / f"g{i}.png", i, (64, 64), blob=False)
    for i in range(8):
        size = ((64, 64), (96, 72), (80, 80), (48, 64))[i % 4]
        write_image(root / "test" / ("sub" if i >= 6 else "") / f"t{i}.png", 100 + i, size, blob=i % 3 == 0)
    (root / "test" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    return root / "good", root / "test"


def lines(pristine_model, root: Path, out: Path) -> str:
    """Every method's JSON lines (overlays on, batches of 3, fp32), the root replaced by ROOT."""
    checkpoint = root / "random.pt"
    save_classifier(checkpoint, pristine_model, image_size=IMAGE_SIZE, threshold=0.0, normalizer=None,
                    backbone={"source": "random", "path": None, "sha256": None}, config={},
                    frozen_end=24)
    good, test = make_inputs(root)
    text = []
    for i, method in enumerate(METHODS):
        detector = load_detector(checkpoint, method=method, reference=[good] if i == 0 else None,
                                 precision="fp32")
        predict_images(detector, [test], out / str(i), batch_size=3, progress=False)
        text.append((out / str(i) / RESULTS_NAME).read_text())
    return "".join(text).replace(str(root), "ROOT")


def test_json_lines_unchanged(pristine_model, tmp_path):
    got = lines(pristine_model, tmp_path / "in", tmp_path / "out")
    if os.environ.get("VISINSPECT_WRITE_FIXTURE"):  # how the fixture was made (at the branch point)
        FIXTURE.write_text(got)
        pytest.skip("fixture written")
    assert got == FIXTURE.read_text()
