"""The leave-one-out command: jobs, resuming after a kill to the same rows, model choice, errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import visinspect.training as train_module
from visinspect import cli
from visinspect.backbones.store import STORE_ENV, FeatureStore
from visinspect.data.samples import build_sample_table, target_test_images
from visinspect.errors import ConfigError
from visinspect.experiments.compare import ComparePreset
from visinspect.experiments.loo import LeaveOneOut, default_targets, plan_jobs
from visinspect.experiments.tables import (
    chosen_on_all_targets,
    chosen_on_other_targets,
    paired_against,
    switches,
    tables_markdown,
)
from visinspect.methods.registry import DEFAULT_MODELS, METHODS
from visinspect.methods.simclr.pretrain import PretrainConfig

TINY = ComparePreset(
    "tiny", image_size=32, epochs=2, precision="fp32",
    pretrain=PretrainConfig.demo(epochs=1, image_size=32, batch_size=4, max_images=8),
)


def run_loo(root, out, store, **kw):
    options = {"seeds": 1, "calibrate": [2], "preset": TINY, "weights": "random", "log": lambda m: None}
    return LeaveOneOut([root], out, store=store, **(options | kw)).run()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FeatureStore(tmp_path_factory.mktemp("store") / "features")


@pytest.fixture(scope="module")
def uninterrupted(tiny_root, tmp_path_factory, store):
    out = tmp_path_factory.mktemp("loo") / "clean"
    return out, run_loo(tiny_root, out, store)


def test_plan_trains_before_scoring_and_orders_by_seed():
    jobs = plan_jobs(["a", "b"], ["fused", "reference", "baseline"], [0, 1])
    assert [str(j) for j in jobs[:4]] == [
        "train a seed 0 baseline", "score a seed 0 fused", "score a seed 0 reference",
        "score a seed 0 baseline",
    ]
    assert [j.seed for j in jobs] == [0] * 8 + [1] * 8
    assert METHODS["simclr-source calibrated"].trains.name == "simclr-source"
    assert METHODS["reference"].trains is None
    # The fused score over a SimCLR classifier trains that classifier once, shared with its own rows.
    jobs = plan_jobs(["a"], ["simclr-source+target-good", "fused+simclr"], [0])
    assert [str(j) for j in jobs] == [
        "train a seed 0 simclr-source+target-good", "score a seed 0 simclr-source+target-good",
        "score a seed 0 fused+simclr",
    ]


@pytest.mark.slow
def test_rows_cover_every_target_model_and_k(uninterrupted, tiny_root):
    out, rows = uninterrupted
    assert {r["target"] for r in rows} == {"grain_wood", "round_pill"}  # each is the unknown once
    assert {r["model"] for r in rows} == {f"{m} k=2" if METHODS[m].detector.uses_good else m
                                          for m in DEFAULT_MODELS}
    assert "baseline" in DEFAULT_MODELS and "reference-mobilenet+patterns" in DEFAULT_MODELS
    assert all(r["positive_class"] == "anomaly" for r in rows)
    saved = json.loads((out / "rows.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["image_size"] == 32
    # Where the rows come from, for the pages that quote them; not a setting (a resumed run may differ).
    assert sorted(saved["provenance"]) == ["command", "commit", "date", "machine", "precision"]
    provenance = saved["provenance"]
    assert provenance["precision"] == saved["settings"]["precision"] and provenance["command"]
    tables = (out / "tables.md").read_text()
    assert "positive class = anomaly" in tables and "| grain_wood |" in tables
    budget = json.loads((out / "budget.json").read_text())
    assert budget["all_runs"]["train_jobs"] == 2 and budget["this_run"]["frozen_pass"]["images"] > 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "loo_balanced_accuracy.png", "loo_balanced_accuracy_vs_k.png", "loo_image_auroc.png",
        "loo_image_auroc_vs_k.png",
    ]


@pytest.mark.slow
def test_a_second_run_does_nothing_again(uninterrupted, tiny_root, store):
    out, rows = uninterrupted
    before = {p: p.stat().st_mtime_ns for p in (out / "rows").rglob("*.json")}
    assert run_loo(tiny_root, out, store) == rows
    assert {p: p.stat().st_mtime_ns for p in (out / "rows").rglob("*.json")} == before


@pytest.mark.slow
def test_killed_mid_training_resumes_to_the_same_rows(uninterrupted, tiny_root, tmp_path, store, monkeypatch):
    """Interrupted after the first epoch of the second training: the next run continues from
    that epoch's state and ends with the rows of an uninterrupted run."""
    saves = []
    real_save = train_module._save_resumable

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == TINY.epochs + 1:  # the first epoch of the second classifier
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_resumable", save_then_die)
    monkeypatch.setattr(train_module, "STATE_EVERY_S", 0.0)  # a state after every epoch
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_loo(tiny_root, out, store)
    assert list(out.glob("models/*/seed0/*.train-state"))  # the state after epoch 1 is there
    monkeypatch.setattr(train_module, "_save_resumable", real_save)
    assert run_loo(tiny_root, out, store) == uninterrupted[1]
    assert not list(out.rglob("*-state"))


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_gives_the_same_rows(tiny_root, tmp_path, store):
    def command(out):
        # Scoring jobs only (killing a training half-way is the test above): quick, and what
        # matters here is a real SIGKILL at whatever point the process has reached.
        return [sys.executable, "-m", "visinspect", "loo", "--data", str(tiny_root), "--seeds", "2",
                "--models", "reference", "--calibrate", "2,3", "--preset", "demo", "--out", str(out),
                "--backbone-weights", "random", "--precision", "fp32"]

    out, clean = tmp_path / "sigkill", tmp_path / "clean"
    env = {**os.environ, STORE_ENV: str(store.root)}
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("rows/*/*/*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed half-way, not finished
    assert len(list(out.glob("rows/*/*/*.json"))) >= 1 and not (out / "rows.json").exists()
    assert subprocess.run(command(out), env=env, capture_output=True).returncode == 0
    assert subprocess.run(command(clean), env=env, capture_output=True).returncode == 0
    assert json.loads((out / "rows.json").read_text())["rows"] == json.loads(
        (clean / "rows.json").read_text())["rows"]


@pytest.mark.slow
def test_models_choose_what_runs(tiny_root, tmp_path, store):
    rows = run_loo(tiny_root, tmp_path / "ref", store, models=["reference"], targets=["round_pill"])
    assert {r["model"] for r in rows} == {"reference k=2"}
    assert not (tmp_path / "ref" / "models").exists()  # the reference score trains nothing
    # A SimCLR lever is a row like any other: its pre-training is the split's one training job.
    rows = run_loo(tiny_root, tmp_path / "lever", store, models=["simclr+defect-negatives calibrated"],
                   targets=["round_pill"])
    assert {r["model"] for r in rows} == {"simclr+defect-negatives calibrated k=2"}
    assert [p.name for p in (tmp_path / "lever" / "models").rglob("*.pt")] == ["simclr+defect-negatives.pt"]


@pytest.mark.slow
def test_the_frozen_pass_fills_only_the_layers_the_models_read(tiny_root, tmp_path):
    store = FeatureStore(tmp_path / "features")
    run_loo(tiny_root, tmp_path / "mobile", store, models=["reference-mobilenet"], targets=["round_pill"])
    layers = {ns["layer"]: ns["entries"] for ns in store.info()["namespaces"]}
    # No VGG16 pass at all; MobileNetV2's maps of the target's test images and K = 2 good ones only.
    table = build_sample_table(tiny_root).samples
    test = target_test_images([s for s in table if s.category == "round_pill"])
    assert layers == {"mobilenet_v2": len(test) + 2}
    budget = json.loads((tmp_path / "mobile" / "budget.json").read_text())["this_run"]["frozen_pass"]
    assert budget["computed"] == layers["mobilenet_v2"] and budget["from_store"] == 0


def test_bad_settings_are_refused(tiny_root, tmp_path, store):
    assert default_targets(build_sample_table(tiny_root).samples) == ["grain_wood", "round_pill"]
    with pytest.raises(ConfigError, match="unknown model"):
        LeaveOneOut([tiny_root], tmp_path, models=["baseline", "magic"], store=store)
    with pytest.raises(ConfigError, match="no good and defective test"):
        LeaveOneOut([tiny_root], tmp_path, targets=["hex_nut"], store=store)
    with pytest.raises(ConfigError, match="--calibrate"):
        LeaveOneOut([tiny_root], tmp_path, models=DEFAULT_MODELS, calibrate=[], store=store)
    with pytest.raises(ConfigError, match="K >= 2"):
        LeaveOneOut([tiny_root], tmp_path, calibrate=[1, 2], store=store)
    with pytest.raises(ConfigError, match="seeds"):
        LeaveOneOut([tiny_root], tmp_path, seeds=0, store=store)


def test_cli_errors_are_one_line(tiny_root, tmp_path, capsys):
    code = cli.main(["loo", "--data", str(tiny_root), "--models", "magic", "--out", str(tmp_path)])
    assert code == 2 and "unknown model(s) magic" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_cli_info_and_clear(tiny_root, tmp_path, capsys, pristine_model, monkeypatch):
    monkeypatch.setenv(STORE_ENV, os.environ[STORE_ENV])  # --feature-store sets it: restore it after
    root = tmp_path / "store"
    # One precision throughout (VISINSPECT_PRECISION may make "auto" bf16): one namespace.
    FeatureStore(root).fetch_samples(pristine_model, [], 32, precision="fp32")  # nothing yet
    assert cli.main(["cache", "info", "--feature-store", str(root)]) == 0
    assert "0 entries" in capsys.readouterr().out
    samples = build_sample_table(tiny_root).samples[:3]
    FeatureStore(root).fetch_samples(pristine_model, samples, 32, precision="fp32")
    assert cli.main(["cache", "info", "--feature-store", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 3 and info["namespaces"][0]["datasets"]
    assert cli.main(["cache", "clear", "--feature-store", str(root)]) == 0
    assert "cleared" in capsys.readouterr().out
    assert FeatureStore(root).info()["entries"] == 0


@pytest.mark.slow
def test_new_methods_join_the_earlier_rows_of_the_same_settings(uninterrupted, tiny_root, store, tmp_path):
    out, rows = uninterrupted
    work = tmp_path / "more"
    shutil.copytree(out, work)
    more = run_loo(tiny_root, work, store, models=["reference-top5"])
    assert [r for r in more if r["model"] != "reference-top5 k=2"] == rows  # earlier rows kept
    assert {r["target"] for r in more if r["model"] == "reference-top5 k=2"} == {"grain_wood", "round_pill"}
    other = dataclasses.replace(TINY, image_size=64)
    with pytest.raises(ConfigError, match="other settings"):
        run_loo(tiny_root, work, store, models=["reference"], preset=other)
    # A folder of runs made before the threshold rule was recorded (its thresholds differ).
    settings = json.loads((work / "settings.json").read_text())
    del settings["threshold_rule"]
    (work / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=r"other settings \(threshold_rule\)"):
        run_loo(tiny_root, work, store, models=["reference"])


@pytest.mark.slow
def test_every_pass_of_a_run_goes_through_its_store(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "default"))
    run_loo(tiny_root, tmp_path / "out", FeatureStore(tmp_path / "mine"), models=["baseline", "reference"],
            targets=["round_pill"])
    assert not (tmp_path / "default").exists()  # training and scoring too, not only the frozen pass
    assert FeatureStore(tmp_path / "mine").info()["entries"] > 0


def test_the_method_chosen_on_the_other_targets():
    """Nested leave-one-out: each target gets the method best on the others, not on itself."""
    def row(target, model, auroc, seed=0, **more):
        return {"target": target, "model": model, "image_auroc": auroc, "seed": seed, **more}

    rows = [row(t, "a k=20", 0.9) for t in ("t1", "t2", "t3")] + [row("t4", "a k=20", 0.5, pixel_auroc=0.7)]
    rows += [row(t, "b k=20", 0.8) for t in ("t1", "t2", "t3", "t4")]
    rows += [row("t1", "c k=20", 1.0), row("t1", "a k=5", 1.0), row("solo", "baseline", 0.7)]
    chosen = {c["target"]: c for c in chosen_on_other_targets(rows, 20)}
    assert set(chosen) == {"t1", "t2", "t3", "t4"}  # "solo" has no K good images; c misses targets
    assert chosen["t4"]["chosen"] == "a" and chosen["t4"]["auroc"] == 0.5 and chosen["t4"]["k"] == 20
    assert chosen["t4"]["best"] == "b" and chosen["t4"]["best_auroc"] == 0.8
    assert chosen["t4"]["pixel_auroc"] == 0.7 and chosen["t3"]["pixel_auroc"] is None
    # On t1 the others prefer b (a: 0.9, 0.9, 0.5 against b: 0.8, 0.8, 0.8), though a is better here.
    assert chosen["t1"]["chosen"] == "b" and chosen["t1"]["best"] == "a"
    assert chosen["t1"]["tied"] == {"b": 0.8}  # nothing else as good on the others
    rows.append(row("t4", "b k=20", 0.9, seed=1))  # b: 0.8, 0.8, 0.8, 0.85 against a's mean 0.8
    assert chosen_on_all_targets(rows, 20) == "b"
    # A product with fewer good images than K counts at the largest K it has.
    few = [*rows, row("t5", "a k=4", 0.95), row("t5", "b k=4", 0.6)]
    chosen = {c["target"]: c for c in chosen_on_other_targets(few, 20)}
    assert chosen["t5"]["k"] == 4 and chosen["t5"]["chosen"] == "b" and chosen["t5"]["auroc"] == 0.6
    assert chosen_on_other_targets([row("t1", "a k=20", 0.9)], 20) == []  # one target: nothing to nest


def test_a_rule_for_one_target_alone_is_a_tie_on_the_other_targets():
    """`b` is `a` plus a rule that fires on t3 alone: the other targets cannot choose between them."""
    def row(target, model, auroc, seed=0):
        return {"target": target, "model": model, "image_auroc": auroc, "seed": seed}

    plain = {"t1": 0.9, "t2": 0.8, "t3": 0.5}
    rows = [row(t, "a k=20", v) for t, v in plain.items()]
    rows += [row(t, "b k=20", 0.95 if t == "t3" else v) for t, v in plain.items()]
    rows += [row(t, "c k=20", 0.6) for t in plain]
    assert switches(rows, 20) == [{"methods": ("a", "b"), "fires_on": ["t3"]}]
    chosen = {c["target"]: c for c in chosen_on_other_targets(rows, 20)}
    assert chosen["t3"]["tied"] == {"a": 0.5, "b": 0.95}  # the tie decides t3's figure
    assert chosen["t3"]["chosen"] == "a"  # a tie goes to the method listed first (here by name)
    assert chosen["t1"]["tied"] == {"b": 0.9}  # on t1 the rule's product speaks for b


def test_a_rule_for_one_target_is_noted_where_the_headline_carries_it():
    """`a+rule` fires on t3 alone, and `a+rule+x` (chosen everywhere) carries it: the note gives the
    mean without it; `a+other` fires on t3 alone too, but no chosen method carries it: no note."""
    from visinspect.experiments.report import switch_notes

    def row(target, model, auroc):
        return {"target": target, "model": f"{model} k=20", "image_auroc": auroc, "seed": 0}

    plain = {"t1": 0.9, "t2": 0.8, "t3": 0.5}
    rows = [row(t, "a", v) for t, v in plain.items()]
    rows += [row(t, "a+rule", 0.9 if t == "t3" else v) for t, v in plain.items()]
    rows += [row(t, "a+rule+x", v + 0.05 if t != "t3" else 0.9) for t, v in plain.items()]
    rows += [row(t, "a+other", 0.4 if t == "t3" else v) for t, v in plain.items()]
    (note,) = switch_notes(rows, 20)
    assert note.startswith("- `a` and `a+rule` differ on t3 alone (0.500 and 0.900 there)")
    assert note.endswith(f"the mean above is {(0.95 + 0.85 + 0.5) / 3:.3f}.")


def test_paired_against_the_baseline():
    """Differences are taken on the same target and seed; unpaired and K-dependent rows are left out."""
    def row(target, model, auroc, seed):
        return {"target": target, "model": model, "image_auroc": auroc, "seed": seed, "n_images": 4}

    rows = [row("t1", "baseline", 0.5, 0), row("t1", "baseline", 0.7, 1), row("t2", "baseline", 0.6, 0)]
    rows += [row("t1", "s", 0.6, 0), row("t1", "s", 0.6, 1), row("t2", "s", 0.9, 0), row("t2", "s", 0.1, 1)]
    rows += [row("t1", "s k=20", 1.0, 0), row("t1", "baseline", None, 2), row("t1", "s", 0.9, 2)]
    (p,) = paired_against(rows)
    assert p["model"] == "s"
    assert p["per_target"] == pytest.approx({"t1": 0.0, "t2": 0.3})  # (+0.1 - 0.1) / 2; t2 seed 1 unpaired
    assert p["seeds_per_target"] == {"t1": 2, "t2": 1}
    assert p["over"] == ["t1"]  # t2 lacks seed 1: left out of the means, so seeds compare
    assert p["per_seed"] == pytest.approx({0: 0.1, 1: -0.1})
    assert p["mean"] == pytest.approx(0.0)
    settings = {"preset": "tiny", "image_size": 64, "epochs": 1, "precision": "fp32",
                "max_source_per_category": None, "max_test_per_category": None, "calibrate": [20],
                "machine": "test"}
    line = "| s | +0.000 (2) | +0.300 (1) | +0.000 | 0: +0.100, 1: -0.100 |"
    assert line in tables_markdown(rows, settings)
    # A method run with one seed on both targets is averaged over the targets the other one has
    # on all its seeds, so that the two means compare.
    (s, u) = paired_against([*rows, row("t1", "u", 0.7, 0), row("t2", "u", 0.7, 0)])
    assert s["over"] == u["over"] == ["t1"] and u["mean"] == pytest.approx(0.2)


def test_rows_keep_what_a_method_learnt_on_the_sources_without_its_weights():
    from visinspect.experiments.loo import _without_tensors

    learnt = {"patch_contrast": {"blocks": {"a": torch.zeros(2, 3), "b": torch.zeros(4)},
                                 "config": {"epochs": 2}}, "weights": [torch.zeros(1)], "w": 0.5}
    assert _without_tensors(learnt) == {"patch_contrast": {"blocks": "2 tensors, 10 numbers",
                                                           "config": {"epochs": 2}},
                                        "weights": ["tensor [1]"], "w": 0.5}
    json.dumps(_without_tensors(learnt))


def test_a_tie_goes_to_the_method_the_registry_lists_first():
    """The binary-drawing rule fires on one product alone: with that product left out, the others
    cannot tell `reference-mobilenet` from `reference-mobilenet+patterns`, and the tie goes to the
    method without the rule (listed first), not to the name that sorts last."""
    def row(target, model, auroc):
        return {"target": target, "model": model, "image_auroc": auroc, "seed": 0}

    rows = [row(t, f"{m} k=20", 0.9) for t in ("a", "b") for m in ("reference-mobilenet+patterns",
                                                                  "reference-mobilenet")]
    rows += [row("pcb", "reference-mobilenet k=20", 0.5),
             row("pcb", "reference-mobilenet+patterns k=20", 0.9)]
    chosen = {c["target"]: c for c in chosen_on_other_targets(rows, 20)}
    assert chosen["pcb"]["chosen"] == "reference-mobilenet" and chosen["pcb"]["auroc"] == 0.5
    assert chosen_on_all_targets(rows, 20) == "reference-mobilenet+patterns"  # pcb's own rows decide


def test_the_recorded_command_names_the_weights_and_precision_it_ran_with(monkeypatch):
    from visinspect.experiments import loo

    monkeypatch.setattr(sys, "argv", ["/x/visinspect/__main__.py", "loo", "--data", "a b"])
    for name in ("VISINSPECT_BACKBONE_WEIGHTS", "VISINSPECT_MOBILENET_WEIGHTS", "VISINSPECT_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert loo.command_line() == "python -m visinspect loo --data 'a b'"
    monkeypatch.setenv("VISINSPECT_MOBILENET_WEIGHTS", "../w/m.pth")
    monkeypatch.setenv("VISINSPECT_FEATURE_STORE", "/tmp/s")  # where features are kept: no number changes
    expected = "VISINSPECT_MOBILENET_WEIGHTS=../w/m.pth python -m visinspect loo --data 'a b'"
    assert loo.command_line() == expected
