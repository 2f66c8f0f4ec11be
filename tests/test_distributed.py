"""Data-parallel runs with 2 CPU processes (gloo): N ranks with batch B compute what one process
computes with batch N * B, a killed run resumes to an unbroken run's checkpoint, and predict under
torchrun writes what one process writes. The ranks are started by torch.multiprocessing (library
calls) or by torchrun (the command line)."""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from visinspect import distributed
from visinspect.backbones.store import MARKER, FeatureStore
from visinspect.backbones.vgg16 import VGG16CAM, build_model
from visinspect.checkpoint import load_checkpoint, save_classifier
from visinspect.data.samples import build_sample_table
from visinspect.errors import ConfigError
from visinspect.methods.registry import load_detector
from visinspect.methods.simclr.loss import nt_xent_loss
from visinspect.methods.simclr.model import ProjectionHead, SimCLRModel
from visinspect.methods.simclr.pretrain import PretrainConfig, pretrain
from visinspect.predict import RESULTS_NAME, predict_images
from visinspect.training import TrainConfig, train_classifier

pytestmark = pytest.mark.distributed
WORLD = 2
# Every augmentation off: both views are the image, so batches of the same images are the same.
NO_AUGMENT = {"min_scale": 1.0, "hf_prob": 0.0, "vf_prob": 0.0, "rr_prob": 0.0, "cj_prob": 0.0,
              "random_gray_scale": 0.0, "gaussian_blur": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn, args: tuple) -> None:
    """One rank: torchrun's environment, one thread (2 ranks share 2 cores), the process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        fn(*args)
    finally:
        distributed.destroy()


def on_ranks(fn, *args) -> None:
    """Run fn(*args) in WORLD processes joined into one gloo process group."""
    mp.spawn(_rank_main, args=(free_port(), fn, args), nprocs=WORLD, join=True)


def _jobs(jobs: list[tuple]) -> None:
    """fn(*args) for each (fn, *args), in order: starting a pair of processes (importing torch and
    visinspect twice on 2 cores) costs more than these tiny runs, so one pair runs them all."""
    for fn, *args in jobs:
        fn(*args)


# ----------------------------------------------------------------------------- NT-Xent and batch norm


def _embeddings(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h of both views of 2b images and their extra negatives (the same on every rank), a head."""
    torch.manual_seed(0)
    h = torch.randn(2 * b, 2, 16)  # image, view, dim
    return h, torch.randn(2 * b, 16), ProjectionHead(16, 32, 8)


def _step(h: torch.Tensor, negatives: torch.Tensor, head: torch.nn.Module, rows) -> torch.Tensor:
    """pretrain's loss on views h: one batch-norm batch [views 1, views 2, negatives], gathered."""
    n = len(h)
    z = head(torch.cat([h[:, 0], h[:, 1], negatives]))
    every = distributed.gather(z)
    z1, z2 = (torch.cat([g[k * n : (k + 1) * n] for g in every]) for k in (0, 1))
    return nt_xent_loss(z1, z2, 0.2, negatives=torch.cat([g[2 * n :] for g in every]), rows=rows)


def _nt_xent_ranks(out: Path, b: int) -> None:
    h, negatives, head = _embeddings(b)
    head = distributed.data_parallel(distributed.sync_batch_norm(head))
    mine = distributed.own_rows(b)
    loss = _step(h[mine], negatives[mine], head, mine)
    loss.backward()
    grads = [p.grad for p in head.parameters()]  # averaged over the ranks by DDP
    if distributed.is_main():
        torch.save({"loss": distributed.mean(loss), "grads": grads}, out)
    else:
        distributed.mean(loss)


def test_nt_xent_and_head_batch_norm_on_two_ranks_equal_one_process_with_the_whole_batch(two_ranks):
    h, negatives, head = _embeddings(B)
    loss = _step(h, negatives, head, None)
    loss.backward()
    ranks = torch.load(two_ranks / "nt_xent.pt", weights_only=True)
    assert ranks["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for got, expected in zip(ranks["grads"], [p.grad for p in head.parameters()], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SimCLR pre-training


def simclr_model() -> SimCLRModel:
    torch.manual_seed(0)
    return SimCLRModel(VGG16CAM(), ProjectionHead(512, 64, 32))


def _pretrain_ranks(samples, runs: list[tuple[PretrainConfig, Path, Path | None, int | None]]) -> None:
    """Pre-train once per run (config, state file, state to resume, epoch whose end kills rank 1),
    in one pair of processes: starting them costs more than these tiny runs."""
    for config, state, resume, kill_at in runs:

        def die(epoch: int, record: dict, kill_at=kill_at) -> None:
            if epoch == kill_at and distributed.rank() == 1:  # before epoch kill_at's state is written
                os.kill(os.getpid(), signal.SIGKILL)

        history = pretrain(simclr_model(), samples, config, progress=False, checkpoint_path=state,
                           resume=resume, on_epoch_end=die)
        if distributed.is_main():
            torch.save(history["loss"], state.with_suffix(".losses"))


# Batch 8 in one process, 4 per rank on two; every augmentation off, so both see the same batches.
SAME_BATCH = PretrainConfig(epochs=2, batch_size=8, image_size=32, warmup_epochs=0, augment_kwargs=NO_AUGMENT,
                            precision="fp32")
# Augmenting: each rank's random state must come back on resume.
KILLED = PretrainConfig(epochs=3, batch_size=2, image_size=32, warmup_epochs=0, precision="fp32")


B = 3  # images per rank in the NT-Xent test
# The classifier: batch 6 in one process, 3 per rank on two, 12 images (global batches 6, 6).
TRAIN = TrainConfig(epochs=3, batch_size=6, image_size=32, precision="fp32", target_accuracy=1.01)


@pytest.fixture(scope="module")
def two_ranks(tiny_root, tmp_path_factory) -> Path:
    """Every library-level run on two ranks, in one pair of processes: the NT-Xent test; the
    classifier (TRAIN at batch 3) after racing to fill an empty feature store; SAME_BATCH at
    batch 4; KILLED unbroken; KILLED with rank 1 killed (SIGKILL) at the end of epoch 2, then
    resumed by two new processes. Returns the folder of their outputs."""
    tmp = tmp_path_factory.mktemp("ranks")
    table = build_sample_table(tiny_root).samples
    runs = [(dataclasses.replace(SAME_BATCH, batch_size=4), tmp / "two.state", None, None),
            (KILLED, tmp / "unbroken.state", None, None),
            (KILLED, tmp / "killed.state", None, 2)]
    jobs = [(_nt_xent_ranks, tmp / "nt_xent.pt", B),
            (_train_ranks, table[::2], dataclasses.replace(TRAIN, batch_size=3), tmp / "train.state",
             tmp / "race"),
            (_pretrain_ranks, table[:8], runs)]
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        on_ranks(_jobs, jobs)
    assert load_checkpoint(tmp / "killed.state")["epoch"] == 1  # what the kill left
    on_ranks(_pretrain_ranks, table[:8], [(KILLED, tmp / "killed.state", tmp / "killed.state", None)])
    return tmp


def test_pretraining_on_two_ranks_trains_like_one_process_with_twice_the_batch(two_ranks, tiny_root):
    expected = pretrain(simclr_model(), build_sample_table(tiny_root).samples[:8], SAME_BATCH,
                        progress=False)["loss"]
    first, second = torch.load(two_ranks / "two.losses")
    # Step 1: the same weights on the same global batch (NT-Xent over both ranks' views, head
    # batch norm over both ranks' rows): fp32 rounding only.
    assert first == pytest.approx(expected[0], rel=1e-5)
    # Step 2 follows one AdamW step, whose first update is about lr * sign(gradient): gradient
    # components near 0 turn rounding differences into differences of up to 2 lr.
    assert second == pytest.approx(expected[1], rel=2e-3)


def test_a_killed_rank_resumes_to_the_checkpoint_of_an_unbroken_run(two_ranks):
    unbroken, resumed = (load_checkpoint(two_ranks / f"{n}.state") for n in ("unbroken", "killed"))
    assert resumed["epoch"] == 3 and resumed["history"]["loss"] == unbroken["history"]["loss"]
    for name, weights in unbroken["model"].items():
        assert torch.equal(resumed["model"][name], weights), name
    assert len(resumed["torch_rng_ranks"]) == WORLD


# ----------------------------------------------------------------------------- classifier training


def classifier() -> VGG16CAM:
    torch.manual_seed(0)
    return build_model("random")[0]


def _train_ranks(samples, config: TrainConfig, out: Path, race: Path) -> None:
    model = classifier()
    # Both ranks fill one empty store with the same entries at once: what many writers do.
    FeatureStore(race).fetch_samples(model, samples, config.image_size, precision="fp32")
    history = train_classifier(model, samples, config, progress=False, checkpoint_path=out)
    if distributed.is_main():
        torch.save(history["loss"], out.with_suffix(".losses"))


@pytest.fixture(scope="module")
def one_process(tiny_root, tmp_path_factory) -> dict:
    """TRAIN in one process, and the feature store one process fills for it."""
    store = tmp_path_factory.mktemp("alone")
    samples = build_sample_table(tiny_root).samples[::2]
    model = classifier()
    history = train_classifier(model, samples, TRAIN, progress=False)
    FeatureStore(store).fetch_samples(model, samples, TRAIN.image_size, precision="fp32")
    return {"model": model, "history": history, "store": store, "n": len(samples)}


def test_classifier_on_two_ranks_has_the_loss_curve_of_one_process(two_ranks, one_process):
    losses = torch.load(two_ranks / "train.losses")
    assert losses == pytest.approx(one_process["history"]["loss"], rel=1e-4)
    two = load_checkpoint(two_ranks / "train.state")["state_dict"]
    for name, weights in one_process["model"].state_dict().items():
        torch.testing.assert_close(two[name], weights, rtol=1e-4, atol=1e-5, msg=name)


def test_two_ranks_filling_one_feature_store_write_what_one_process_writes(two_ranks, one_process):
    race, alone, n = two_ranks / "race", one_process["store"], one_process["n"]
    entries = sorted(p.relative_to(race) for p in race.rglob("*.npy"))
    assert len(entries) == n
    assert entries == sorted(p.relative_to(alone) for p in alone.rglob("*.npy"))
    assert all((race / e).read_bytes() == (alone / e).read_bytes() for e in entries)
    assert not list(race.rglob("*.tmp"))  # no temporary file left behind
    info = FeatureStore(race).info()  # each image once, though both ranks indexed it
    assert info["entries"] == n
    assert sum(d["entries"] for d in info["namespaces"][0]["datasets"].values()) == n


def test_a_store_another_process_is_creating_is_not_refused_as_a_foreign_folder(tmp_path):
    # Between the marker's temporary file and its rename, a second rank starting at that moment
    # would read the folder as "not empty and not a store": the temporary file marks a store in making.
    (tmp_path / f".{MARKER}.x1y2.tmp").write_text("")
    FeatureStore(tmp_path)
    (tmp_path / "foreign.txt").write_text("")
    with pytest.raises(ConfigError, match="not a visinspect feature store"):
        FeatureStore(tmp_path)


# ----------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pristine_model) -> tuple[Path, Path]:
    """A checkpoint and 7 images in nested folders (one of them unreadable)."""
    tmp = tmp_path_factory.mktemp("predict")
    checkpoint = tmp / "random.pt"
    save_classifier(checkpoint, pristine_model, image_size=32, threshold=0.0, normalizer=None,
                    backbone={"source": "random", "path": None, "sha256": None}, config={}, frozen_end=24)
    root = tmp / "in"
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/b.png", "sub/deep/d.png", "e.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40, 30 + i, 3), np.uint8)
        Image.fromarray(pixels).save(root / name)
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    return checkpoint, root


def torchrun_predict(checkpoint: Path, root: Path, out: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
               f"--master_port={free_port()}", "-m", "visinspect", "predict", "--checkpoint",
               str(checkpoint), str(root), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr  # 1: the broken file failed, as in one process
    return run.stdout


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_predict_under_torchrun_writes_what_one_process_writes_and_resumes(folder, tmp_path):
    checkpoint, root = folder
    predict_images(load_detector(checkpoint), [root], tmp_path / "one", progress=False)
    expected = files(tmp_path / "one")
    assert len(expected) == 1 + 6  # the JSON lines and an overlay per readable image
    stdout = torchrun_predict(checkpoint, root, tmp_path / "two", "--batch-size", "16")
    assert stdout.count("world size 2, backend gloo, global batch 32 (16 per process)") == 1
    assert files(tmp_path / "two") == expected  # the same bytes in the same order: no part left
    # A killed run: a third of the results, a line cut in half, and a part of a 3-process run.
    lines = expected[RESULTS_NAME].decode().splitlines(keepends=True)
    resumed = Path(shutil.copytree(tmp_path / "one", tmp_path / "resumed"))
    (resumed / RESULTS_NAME).write_text(lines[0] + lines[1][:20])
    (resumed / distributed.part_name(2)).write_text(lines[2])
    torchrun_predict(checkpoint, root, resumed, "--resume")
    assert files(resumed) == expected  # the cut line and the old part's are scored again or kept
