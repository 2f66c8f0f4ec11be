"""The package's rows and predictions stay what they were before its layout moved (issue #34).

tests/fixtures/behaviour/ holds what the flat-module code (commit fd5f0c0) wrote for a small fixed
leave-one-out on the synthetic data (every method that needs no SimCLR pre-training, one seed, K
3 and 5, random weights, fp32) and for `predict` with the recommended method, the baseline and
fused-top5. The same commands must give the same rows and JSON lines. Floats are compared to 1e-6
(another CPU may round the last bits of fp32 differently); everything else exactly.
"""

import json
import math
from pathlib import Path

import pytest

from visinspect import cli, load_detector
from visinspect.backbones.store import STORE_ENV
from visinspect.data.synthetic import generate_synthetic_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "behaviour"
METHODS = ("baseline,baseline calibrated,reference,reference-top5,fused,fused-top5,reference-mobilenet,"
           "reference-mobilenet+patterns,fused-mobilenet,fused-learnt,residual,pseudo-defects")
RANDOM_FP32 = ("--backbone-weights", "random", "--precision", "fp32", "--device", "cpu")


def same(new, old, where: str = "") -> None:
    """Equal, floats within 1e-6 (relative or absolute), with the path of the first difference."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and sorted(new) == sorted(old), where
        for key in old:
            same(new[key], old[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and not isinstance(new, bool):
        assert math.isclose(new, old, rel_tol=1e-6, abs_tol=1e-6), f"{where}: {new} != {old}"
    else:
        assert new == old, f"{where}: {new!r} != {old!r}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The synthetic data the fixtures were made from: 64 px, seed 0."""
    root = tmp_path_factory.mktemp("behaviour")
    generate_synthetic_dataset(root / "data", seed=0, image_size=64)
    return root


@pytest.fixture
def in_run_dir(run_dir, monkeypatch) -> Path:
    """Relative paths, as the fixtures' commands used; fp32; a feature store of the run's own."""
    monkeypatch.chdir(run_dir)
    monkeypatch.setenv("VISINSPECT_PRECISION", "fp32")
    monkeypatch.setenv(STORE_ENV, str(run_dir / "store"))  # cli.main sets it again: restored after
    return run_dir


@pytest.mark.slow
def test_leave_one_out_rows_are_unchanged(in_run_dir):
    assert cli.main(["loo", "--data", "data", "--targets", "grain_wood,round_pill", "--models", METHODS,
                     "--seeds", "1", "--calibrate", "3,5", "--preset", "demo", "--source-cap", "20",
                     *RANDOM_FP32, "--feature-store", "store_loo", "--out", "loo"]) == 0
    new = json.loads((in_run_dir / "loo" / "rows.json").read_text())
    new["settings"].pop("machine")
    new.pop("provenance")  # command, commit, date, machine: where the rows come from, not what they are
    same(new, json.loads((FIXTURES / "loo_rows.json").read_text()))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_predict_lines_are_unchanged(in_run_dir):
    good, test = "data/hex_nut/train/good", "data/hex_nut/test"
    store = ("--feature-store", "store_pred")
    assert cli.main(["train", "--method", "reference-mobilenet+patterns", "--image-size", "64", "--seed", "0",
                     *RANDOM_FP32, *store, "--out", "ckpt/recommended.pt"]) == 0
    assert cli.main(["predict", "--checkpoint", "ckpt/recommended.pt", "--reference-dir", good,
                     "--precision", "fp32", *store, "--out", "pred_recommended", test]) == 0
    sources = "grain_wood,grain_leather,round_pill,bottle_top"
    assert cli.main(["train", "--method", "baseline", "--data", "data", "--categories", sources,
                     "--image-size", "64", "--epochs", "2", "--batch-size", "10", "--seed", "0",
                     *RANDOM_FP32, *store, "--out", "ckpt/baseline.pt"]) == 0
    assert cli.main(["predict", "--checkpoint", "ckpt/baseline.pt", "--precision", "fp32", *store,
                     "--out", "pred_baseline", test]) == 0
    assert cli.main(["predict", "--checkpoint", "ckpt/baseline.pt", "--method", "fused-top5",
                     "--reference-dir", good, "--precision", "fp32", *store, "--out", "pred_fused_top5",
                     test]) == 0
    for name in ("recommended", "baseline", "fused_top5"):
        new = lines(in_run_dir / f"pred_{name}" / "predictions.jsonl")
        same(new, lines(FIXTURES / f"predict_{name}.jsonl"), name)


def test_a_checkpoint_written_before_the_move_still_loads(run_dir):
    """`train` of the recommended method at fd5f0c0 (random weights): a settings checkpoint of a few
    KB, no weights (so not named *.pt). The same format is read today and the method adapts as it did."""
    detector = load_detector(FIXTURES / "recommended_fd5f0c0.settings",
                             reference=[run_dir / "data" / "hex_nut" / "train" / "good"])
    assert detector.name == "reference-mobilenet+patterns" and detector.product == "good"
