"""Tests for the command line: outputs, exit codes, one-line user errors, train -> evaluate -> predict."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_CATEGORIES, TINY_PER_CATEGORY

from visinspect.calibration import fit_calibration, save_calibration
from visinspect.checkpoint import load_classifier, save_classifier
from visinspect.cli import main
from visinspect.data.drawing import CATEGORIES
from visinspect.experiments.demo import unknown_context_images
from visinspect.methods.registry import backbone_info, load_detector

REQUIRED = {"n_images", "n_anomalous", "positive_class", "threshold", "accuracy", "balanced_accuracy",
            "precision", "recall", "f1", "image_auroc", "average_precision", "confusion_matrix",
            "per_category", "per_defect_type", "pixel_auroc", "aupro", "box_hit_rate"}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str) -> str:
    """Exit status 2 and exactly one line on stderr, `error: ...`; returns that line."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def fails(capsys, *argv) -> str:
    """Run a command that must fail as a user error; returns its one-line message."""
    code, _, err = run(capsys, *argv)
    return assert_user_error(code, err)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory) -> tuple[Path, str]:
    """`train` once for the module: (checkpoint path, what it printed)."""
    out = tmp_path_factory.mktemp("cli") / "model.pt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", "--data", str(tiny_root), "--image-size", "32", "--epochs", "1",
                     "--batch-size", "6", "--backbone-weights", "random", "--precision", "fp32",
                     "--method", "baseline", "--out", str(out)])
    assert code == 0
    return out, stdout.getvalue()


# ----------------------------------------------------------------------------- info and synth


def test_info_table(capsys, tiny_root):
    code, out, _ = run(capsys, "info", "--data", tiny_root)
    assert code == 0
    assert "positive class = anomaly" in out
    t = TINY_PER_CATEGORY
    for category in TINY_CATEGORIES:
        row = f"| {category} | {t['train_good']} | {t['test_good']} | {t['anomaly']} | {t['anomaly']} |"
        assert row in out
    assert f"{len(TINY_CATEGORIES) * sum(t.values())} images; 0 stray files ignored" in out


def test_info_json(capsys, tiny_root):
    code, out, _ = run(capsys, "info", "--data", tiny_root, "--json", "--categories", "round_pill")
    assert code == 0
    summary = json.loads(out)
    assert list(summary) == ["round_pill"]
    assert summary["round_pill"] == {
        "good": TINY_PER_CATEGORY["train_good"] + TINY_PER_CATEGORY["test_good"],
        "anomaly": TINY_PER_CATEGORY["anomaly"],
        "masks": TINY_PER_CATEGORY["anomaly"],
        "defect_types": dict.fromkeys(sorted(CATEGORIES["round_pill"]), 2),
    }


def test_info_check_names_a_corrupt_image(capsys, writable_root):
    bad = writable_root / "grain_wood" / "test" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    code, _, err = run(capsys, "info", "--data", writable_root, "--check")
    assert code == 1
    assert str(bad) in err and "1 unreadable" in err


def test_info_check_passes_on_a_clean_tree(capsys, tiny_root):
    code, _, err = run(capsys, "info", "--data", tiny_root, "--check")
    assert code == 0 and "0 unreadable" in err


def test_synth_writes_the_layout(capsys, tmp_path):
    code, out, _ = run(capsys, "synth", tmp_path / "synth", "--image-size", "32")
    assert code == 0 and "wrote the synthetic dataset" in out
    for category, defects in CATEGORIES.items():
        folder = tmp_path / "synth" / category
        assert any((folder / "train" / "good").glob("*.png"))
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted([*defects, "good"])
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(defects)
    assert "already exists" in fails(capsys, "synth", tmp_path / "synth")


# ----------------------------------------------------------------------------- user errors


def test_missing_root(capsys, tmp_path):
    line = fails(capsys, "info", "--data", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in line and "visinspect synth" in line


def test_unknown_category(capsys, tiny_root):
    line = fails(capsys, "info", "--data", tiny_root, "--categories", "bottle")
    assert "bottle" in line and "available: grain_wood, round_pill" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--dense-weight", "1.5"], "dense_weight"), (["--l2sp-weight", "-1"], "l2sp_weight"),
     (["--freeze-head-bn", "--mean-shifted"], "bypasses the projection head")],
)
def test_pretrain_lever_flags_reach_the_config(capsys, tiny_root, tmp_path, flags, message):
    assert message in fails(capsys, "pretrain", "--data", tiny_root, "--out", tmp_path / "s.pt", *flags)


@pytest.mark.parametrize("name", ["simclr-source", "simclr+l2sp calibrated", "fused+simclr"])
def test_train_of_a_simclr_method_says_to_pretrain_first(capsys, tiny_root, tmp_path, name):
    line = fails(capsys, "train", "--data", tiny_root, "--method", name, "--out", tmp_path / "m.pt")
    assert "`pretrain`" in line and "then `train --pretrained FILE` with the same --method" in line
    assert not (tmp_path / "m.pt").exists()


def test_train_refuses_a_simclr_encoder_for_a_method_that_trains_nothing(capsys, tmp_path):
    line = fails(capsys, "train", "--method", "reference", "--pretrained", tmp_path / "simclr.pt",
                 "--out", tmp_path / "m.pt")
    assert "'reference' trains nothing" in line and "--pretrained" in line
    assert not (tmp_path / "m.pt").exists()


def test_pretrain_sources_default_to_every_category_but_the_targets(tiny_root):
    source, target = unknown_context_images([tiny_root], target=["round_pill"])
    assert {s.category for s in source} == set(TINY_CATEGORIES) - {"round_pill"}
    assert {s.category for s in target} == {"round_pill"}


@pytest.fixture
def calibration(tmp_path) -> Path:
    """A calibration file for product "x" (what `evaluate --calibrate K` writes)."""
    cams = torch.rand(10, 4, 4, generator=torch.Generator().manual_seed(0))
    images = [f"x/train/good/{i:03d}.png" for i in range(10)]
    return save_calibration(tmp_path / "x.json", [fit_calibration(np.arange(10.0), cams, category="x",
                                                                   images=images)])


@pytest.mark.parametrize(("name", "twin"), [("simclr-source", "simclr-source calibrated"),
                                            ("baseline calibrated", "baseline calibrated")])
def test_predict_calibration_takes_the_calibrated_twin_of_the_checkpoints_method(
    pristine_model, tmp_path, calibration, name, twin
):
    checkpoint = save_classifier(tmp_path / "m.pt", pristine_model, **backbone_info(32, {}), method=name)
    detector = load_detector(checkpoint, calibration=calibration)
    assert detector.name == twin and detector.product == "x"


def test_predict_calibration_refuses_a_method_without_a_calibrated_twin(capsys, pristine_model, tmp_path,
                                                                         calibration):
    checkpoint = save_classifier(tmp_path / "m.pt", pristine_model, **backbone_info(32, {}), method="fused")
    line = fails(capsys, "predict", "--checkpoint", checkpoint, "--calibration", calibration, tmp_path,
                 "--out", tmp_path / "out")
    assert "'fused' has no form calibrated on good images; leave --calibration out" in line


def test_missing_checkpoint(capsys, tiny_root, tmp_path):
    missing = tmp_path / "missing.pt"
    assert str(missing) in fails(capsys, "evaluate", "--checkpoint", missing, "--data", tiny_root)


def test_file_that_is_not_a_checkpoint(capsys, tiny_root, tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are my notes\n")
    assert str(notes) in fails(capsys, "evaluate", "--checkpoint", notes, "--data", tiny_root)


@pytest.mark.slow
@pytest.mark.parametrize("threshold", ["1.5", "half"])
def test_bad_threshold(capsys, tiny_root, trained, threshold):
    line = fails(capsys, "evaluate", "--checkpoint", trained[0], "--data", tiny_root,
                 "--threshold", threshold)
    assert threshold in line


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    done = subprocess.run([sys.executable, "-m", "visinspect", "predict", "--checkpoint", str(missing),
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert str(missing) in assert_user_error(done.returncode, done.stderr)


# ----------------------------------------------------------------------------- train, evaluate, predict


@pytest.mark.slow
def test_train_writes_a_checkpoint(trained):
    path, out = trained
    _, info = load_classifier(path, image_size=32)
    assert info["backbone"]["source"] == "random" and info["history"]["epochs_run"] == 1
    assert info["train_categories"] == sorted(TINY_CATEGORIES)
    assert not Path(str(path) + ".state").exists()  # the resumable state goes once training is done
    assert "RANDOM initialisation" in out and f"saved {path}" in out


@pytest.mark.slow
def test_evaluate_json_has_every_metric(capsys, tiny_root, trained, tmp_path):
    report_path = tmp_path / "report" / "metrics.json"
    code, out, _ = run(capsys, "evaluate", "--checkpoint", trained[0], "--data", tiny_root, "--quiet",
                       "--precision", "fp32", "--json", report_path)
    assert code == 0 and "positive class = anomaly" in out
    report = json.loads(report_path.read_text())
    assert set(report) >= REQUIRED
    n = len(TINY_CATEGORIES) * sum(TINY_PER_CATEGORY.values())
    assert report["n_images"] == n
    assert report["n_anomalous"] == len(TINY_CATEGORIES) * TINY_PER_CATEGORY["anomaly"]
    assert set(report["per_category"]) == set(TINY_CATEGORIES)
    assert report["backbone"]["source"] == "random"


@pytest.mark.slow
def test_predict_writes_a_line_per_image_and_fails_on_a_corrupt_one(capsys, tiny_root, trained, tmp_path):
    images = tmp_path / "incoming"
    images.mkdir()
    shutil.copy(tiny_root / "grain_wood" / "test" / "good" / "000.png", images / "a.png")
    shutil.copy(tiny_root / "round_pill" / "test" / "crack" / "000.png", images / "b.png")
    (images / "c.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "predict", "--checkpoint", trained[0], images, "--out", out,
                          "--no-overlays")
    assert code == 1
    assert "3 images" in stdout and "1 failed" in stdout
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "c.png"]
    assert str(images / "c.png") in rows[2]["error"]
    for row in rows[:2]:
        assert "error" not in row and row["label"] == int(row["score"] > row["threshold"])
        assert row["method"] == "baseline" and isinstance(row["boxes"], list)
    assert not (out / "overlays").exists()


def test_loo_help_points_to_the_method_table_whose_defaults_it_runs(capsys):
    from visinspect.methods.registry import DEFAULT_MODELS

    with pytest.raises(SystemExit) as done:
        main(["loo", "--help"])
    assert done.value.code == 0
    assert "python -m visinspect methods" in " ".join(capsys.readouterr().out.split())
    assert main(["methods"]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    assert [row.split("|")[1].strip(" *`").removesuffix("`** (recommended)").strip("`*")
            for row in table if row.split("|")[4].strip() == "yes"] == list(DEFAULT_MODELS)
