"""Tests for SimCLR pre-training: the NT-Xent loss, the augmentations, training and checkpoints."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visinspect.backbones.vgg16 import FROZEN_END, VGG16CAM, sha256_file
from visinspect.checkpoint import save_checkpoint
from visinspect.data.samples import DefectDataset, build_sample_table, denormalize, to_tensor
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.errors import CheckpointError, DataError, VisinspectError
from visinspect.methods.simclr.augment import (
    SimCLRTransform,
    TwoViewDataset,
    aligned_views,
    defect_left,
    views_on,
)
from visinspect.methods.simclr.checkpoints import load_pretrained_encoder, save_pretrained
from visinspect.methods.simclr.levers import LEVERS
from visinspect.methods.simclr.loss import (
    defect_views,
    dense_nt_xent_loss,
    l2sp_penalty,
    mean_shift,
    nt_xent_loss,
    rotated_views,
)
from visinspect.methods.simclr.model import DenseProjectionHead, ProjectionHead, SimCLRModel
from visinspect.methods.simclr.monitor import knn_monitor
from visinspect.methods.simclr.pretrain import (
    PretrainConfig,
    _anchors,
    build_simclr_model,
    pretrain,
    pretrain_samples,
    warmup_cosine,
)
from visinspect.utils import autocast, resolve_precision

SOURCE, TARGET = ("grain_wood", "round_pill"), ("hex_nut",)
# Every augmentation off: the transform only normalises (the crop covers the whole image).
NO_AUGMENT = {"min_scale": 1.0, "hf_prob": 0.0, "vf_prob": 0.0, "rr_prob": 0.0, "cj_prob": 0.0,
              "random_gray_scale": 0.0, "gaussian_blur": 0.0}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(root, image_size=64, n_train_good=4, n_test_good=2,
                               n_test_per_defect=2, categories=[*SOURCE, *TARGET])
    return build_sample_table(root).samples


@pytest.fixture(scope="module")
def encoder():
    """One randomly initialised VGG16CAM to copy (building torchvision's VGG16 takes seconds)."""
    torch.manual_seed(0)
    return VGG16CAM()


def small_model(encoder: VGG16CAM, trainable_from: int = FROZEN_END) -> SimCLRModel:
    torch.manual_seed(1)
    return SimCLRModel(copy.deepcopy(encoder), ProjectionHead(512, 64, 32), trainable_from)


def test_augmenting_on_a_device_draws_the_same_views_as_the_dataset(samples):
    """pretrain() augments on the GPU when it trains there; with the same seed those views must
    be the CPU loader's views (same random draws, same order), up to float rounding."""
    transform = SimCLRTransform.inspection(32)
    dataset = TwoViewDataset(samples[:3], transform)
    torch.manual_seed(5)
    expected = [dataset[i] for i in range(3)]
    torch.manual_seed(5)
    view1, view2 = views_on(torch.device("cpu"), transform, [dataset.image(i) for i in range(3)])
    torch.testing.assert_close(view1, torch.stack([a for a, _ in expected]))
    torch.testing.assert_close(view2, torch.stack([b for _, b in expected]))


def test_transform_refuses_a_float_tensor():
    with pytest.raises(DataError, match="uint8 tensor"):
        SimCLRTransform(32)(torch.zeros(3, 40, 40))


def test_aligned_views_show_what_an_augmentation_leaves_of_a_defect():
    rng = np.random.default_rng(0)
    good = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    defective = good.copy()
    defective[4:10, 4:10] = 255  # a small defect in a corner
    # Identical images: identical views, whatever the draws.
    assert not defect_left(SimCLRTransform(48), good, good, draws=5).any()
    # A view that changes nothing keeps the whole defect.
    identity = SimCLRTransform(64, min_scale=1.0, hf_prob=0, cj_prob=0, random_gray_scale=0, gaussian_blur=0)
    views = aligned_views(identity, [good, defective], seed=3)
    np.testing.assert_allclose(defect_left(identity, good, defective, draws=3),
                               (255 - good[4:10, 4:10].min()) / 255, rtol=1e-5)
    assert views.shape == (2, 3, 64, 64)
    # The paper's crops (down to 8 % of the area) cut a corner defect out of more views than the
    # inspection preset's (at least half): the invariance notebook 05 shows.
    gone = {name: (defect_left(t, good, defective, draws=100) < 0.05).mean()
            for name, t in (("paper", SimCLRTransform(48)), ("inspection", SimCLRTransform.inspection(48)))}
    assert gone["paper"] > gone["inspection"] + 0.1, gone
    with pytest.raises(DataError, match="one size"):
        aligned_views(identity, [good, good[:32]], seed=0)


# ----------------------------------------------------------------------------- NT-Xent


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def loop_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, negatives=()) -> float:
    """The loss written out anchor by anchor, straight from the paper's definition; `negatives`
    are added to every anchor's denominator."""
    z = torch.cat([z1, z2]).double()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sim = [cosine(z[i], z[k]) for k in range(2 * n)]
        denominator = sum(math.exp(sim[k] / temperature) for k in range(2 * n) if k != i)
        denominator += sum(math.exp(cosine(z[i], m) / temperature) for m in negatives)
        total += -math.log(math.exp(sim[positive] / temperature) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_the_per_pair_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temperature in (0.1, 0.2, 1.0):
        assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(
            loop_nt_xent(z1, z2, temperature), rel=1e-5
        )


def test_nt_xent_is_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = nt_xent_loss(z1, z2).item()
    assert nt_xent_loss(z2, z1).item() == pytest.approx(loss, rel=1e-6)
    assert nt_xent_loss(3.0 * z1, 0.01 * z2).item() == pytest.approx(loss, rel=1e-5)


def test_nt_xent_is_lowest_for_identical_views_of_orthogonal_items():
    n, temperature = 4, 0.2
    z = torch.eye(n, 8)  # identical views, every pair of items orthogonal
    # Positive similarity 1, the 2n - 2 negatives 0: the closed form of the best case here.
    best = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * n - 2))
    assert nt_xent_loss(z, z.clone(), temperature).item() == pytest.approx(best, rel=1e-6)
    random_views = torch.randn(n, 8, generator=torch.Generator().manual_seed(2))
    assert nt_xent_loss(z, random_views, temperature).item() > best + 1.0


def test_nt_xent_with_extra_negatives_matches_the_per_pair_definition():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    negatives = torch.randn(5, 6, generator=g)
    for temperature in (0.1, 0.5):
        assert nt_xent_loss(z1, z2, temperature, negatives=negatives).item() == pytest.approx(
            loop_nt_xent(z1, z2, temperature, negatives), rel=1e-5
        )


def test_an_own_defective_copy_in_the_denominator_costs_what_the_hand_computation_says():
    n, t = 3, 0.2
    z = torch.eye(n, 8)  # identical views, items orthogonal
    # The "defective copy" of each item is the item itself (the encoder ignores the defect):
    # each anchor's denominator gains e^(1/t) for its own copy and n - 1 zeros for the others.
    loss = nt_xent_loss(z, z.clone(), t, negatives=z.clone()).item()
    e = math.exp(1 / t)
    assert loss == pytest.approx(-math.log(e / (2 * e + 2 * n - 2 + n - 1)), rel=1e-6)
    # A copy the encoder tells apart (orthogonal to everything) costs only e^0 = 1 per negative.
    apart = torch.eye(2 * n, 8)[n:]
    assert nt_xent_loss(z, z.clone(), t, negatives=apart).item() == pytest.approx(
        -math.log(e / (e + 2 * n - 2 + n)), rel=1e-6)


def test_nt_xent_rejects_negatives_of_another_width():
    with pytest.raises(ValueError, match="negatives"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), negatives=torch.randn(4, 7))


@pytest.mark.parametrize(
    ("shape1", "shape2", "temperature"),
    [((4, 8), (4, 9), 0.2), ((4, 8), (3, 8), 0.2), ((8,), (8,), 0.2), ((1, 8), (1, 8), 0.2),
     ((4, 8), (4, 8), 0.0), ((4, 8), (4, 8), -0.5), ((4, 8), (4, 8), float("nan"))],
)
def test_nt_xent_rejects_bad_shapes_and_temperatures(shape1, shape2, temperature):
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(shape1), torch.randn(shape2), temperature)


# ----------------------------------------------------------------------------- the levers' losses


def test_mean_shift_by_hand():
    h = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    shifted = mean_shift(h, torch.tensor([0.5, 0.5]))  # normalised: (1, 0) and (0, 1); minus c
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(shifted, torch.tensor([[r, -r], [-r, r]]))
    # Per-row centers: each row around its own category's mean.
    per_row = mean_shift(h, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(per_row, torch.tensor([[r, -r], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="center"):
        mean_shift(h, torch.zeros(3))


def test_mean_shifted_nt_xent_is_nt_xent_of_the_angles_around_the_center():
    g = torch.Generator().manual_seed(4)
    h1, h2 = torch.rand(5, 6, generator=g) + 1, torch.rand(5, 6, generator=g) + 1  # one cap of the sphere
    center = F.normalize(torch.cat([h1, h2]), dim=1).mean(dim=0)
    shifted = [F.normalize(F.normalize(h, dim=1) - center, dim=1) for h in (h1, h2)]
    t = 0.25
    loss = nt_xent_loss(mean_shift(h1, center), mean_shift(h2, center), t).item()
    assert loss == pytest.approx(loop_nt_xent(*shifted, t), rel=1e-5)
    # Around the origin, the mean shift is plain NT-Xent.
    zero = torch.zeros(6)
    assert nt_xent_loss(mean_shift(h1, zero), mean_shift(h2, zero), t).item() == pytest.approx(
        nt_xent_loss(h1, h2, t).item(), rel=1e-6)


def loop_dense(d1, d2, f1, f2, temperature: float) -> float:
    """The dense loss anchor by anchor: every position of each view against every position of
    the other view of every image; the positive is the position whose backbone vector is closest."""
    n, _, h, w = d1.shape
    cells = [(i, y, x) for i in range(n) for y in range(h) for x in range(w)]
    total = 0.0
    for da, db, fa, fb in ((d1, d2, f1, f2), (d2, d1, f2, f1)):
        for i, y, x in cells:
            same_image = [(i, yy, xx) for yy in range(h) for xx in range(w)]
            match = max(same_image, key=lambda c: cosine(fa[i, :, y, x], fb[c[0], :, c[1], c[2]]))
            anchor = da[i, :, y, x]
            sims = {c: math.exp(cosine(anchor, db[c[0], :, c[1], c[2]]) / temperature) for c in cells}
            total += -math.log(sims[match] / sum(sims.values()))
    return total / (2 * len(cells))


def test_dense_loss_matches_the_per_position_definition():
    g = torch.Generator().manual_seed(5)
    d1, d2 = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 4, 2, 3, generator=g)
    f1 = torch.randn(3, 5, 2, 3, generator=g)
    # View 2: view 1 shifted cyclically (not its own inverse, so the two matching directions differ).
    f2 = f1.roll(1, dims=-1) + 0.1 * torch.randn(3, 5, 2, 3, generator=g)
    for temperature in (0.2, 1.0):
        assert dense_nt_xent_loss(d1, d2, f1, f2, temperature).item() == pytest.approx(
            loop_dense(d1, d2, f1, f2, temperature), rel=1e-5)


def test_dense_loss_by_hand_and_its_errors():
    t = 0.5
    # One image, two positions; the second view is the first mirrored and matched through it:
    # positive similarity 1, the other position 0.
    d = torch.eye(2).view(1, 2, 1, 2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    loss = dense_nt_xent_loss(d, d.flip(-1), f, f.flip(-1), t).item()
    assert loss == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + 1)), rel=1e-6)
    with pytest.raises(ValueError, match="same N, h, w"):
        dense_nt_xent_loss(d, d, f[..., :1], f[..., :1], t)
    with pytest.raises(ValueError, match="temperature"):
        dense_nt_xent_loss(d, d, f, f, 0.0)


def test_l2sp_penalty_by_hand():
    parameters = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    start = [torch.zeros(2), torch.tensor([[1.0]])]
    assert l2sp_penalty(parameters, start).item() == pytest.approx(1 + 4 + 4)
    with pytest.raises(ValueError, match="same shapes"):
        l2sp_penalty(parameters, start[:1])


def normalised_views(n: int = 4, size: int = 32) -> torch.Tensor:
    images = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return torch.stack([to_tensor(image.numpy(), size) for image in images])


def test_defect_views_change_a_local_part_of_each_view_only():
    views = normalised_views()
    defective = defect_views(views, np.random.default_rng(0))
    assert defective.shape == views.shape
    changed = (defective != views).any(dim=1)  # (N, S, S): where a defect was drawn
    fractions = changed.flatten(1).float().mean(dim=1)
    assert (fractions > 0).all() and (fractions < 0.5).all()  # every view got a local defect
    torch.testing.assert_close(defect_views(views, np.random.default_rng(0)), defective)


def test_rotated_views_are_rotations_but_never_the_view_itself():
    views = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    rotated = rotated_views(views)
    turns = []
    for v, r in zip(views, rotated, strict=True):
        matches = [k for k in range(4) if torch.equal(torch.rot90(v, k, dims=(-2, -1)), r)]
        assert len(matches) == 1 and matches[0] != 0
        turns.append(matches[0])
    assert set(turns) == {1, 2, 3}


def test_frozen_head_batch_norm_keeps_the_estimated_statistics():
    torch.manual_seed(0)
    head = ProjectionHead(8, 6, 4)
    h = torch.randn(20, 8) * 3 + 1
    head.estimate_batch_norm(h)
    bn = head.batch_norms[0]
    hidden = head.layers[0](h)
    torch.testing.assert_close(bn.running_mean, hidden.mean(dim=0).detach())
    torch.testing.assert_close(bn.running_var, hidden.var(dim=0).detach())  # unbiased, as BatchNorm keeps it
    assert bn.momentum == 0.1  # restored
    head.train()
    head.freeze_batch_norm()
    mean = bn.running_mean.clone()
    head(torch.randn(5, 8) + 10)
    assert not bn.training and torch.equal(bn.running_mean, mean)
    with pytest.raises(ValueError, match="no batch norm"):
        ProjectionHead(8, 6, 4, batch_norm=False).estimate_batch_norm(h)


def test_dense_projection_head_keeps_the_grid():
    assert DenseProjectionHead(512, 16, 8)(torch.randn(2, 512, 3, 4)).shape == (2, 8, 3, 4)


# ----------------------------------------------------------------------------- augmentations


def tiny_image(size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def view(image, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return SimCLRTransform(**kwargs)(image)


def test_transform_gives_normalised_float_views_of_the_asked_size():
    image = tiny_image(48)
    for source in (image, Image.fromarray(image)):
        x = view(source, input_size=32)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert SimCLRTransform.inspection(32)(image).shape == (3, 32, 32)
    with pytest.raises(DataError, match="load_rgb"):
        SimCLRTransform(32)(image.astype(np.float32))


def test_transform_is_seeded_by_torch():
    image = tiny_image(48)
    assert torch.equal(view(image, seed=3, input_size=32), view(image, seed=3, input_size=32))
    assert not torch.equal(view(image, seed=3, input_size=32), view(image, seed=4, input_size=32))


def test_transform_with_everything_off_only_normalises():
    image = tiny_image()
    x = view(image, input_size=16, **NO_AUGMENT)
    np.testing.assert_allclose(denormalize(x), image / 255.0, atol=1e-5)


@pytest.mark.parametrize(
    ("option", "expected"),
    [("hf_prob", lambda x: x.flip(-1)), ("vf_prob", lambda x: x.flip(-2)),
     ("rr_prob", lambda x: torch.rot90(x, 1, dims=(-2, -1)))],
)
def test_flips_and_rotation_do_what_they_say(option, expected):
    image = tiny_image()
    plain = view(image, input_size=16, **NO_AUGMENT)
    changed = view(image, input_size=16, **{**NO_AUGMENT, option: 1.0})
    assert torch.allclose(changed, expected(plain))
    assert not torch.allclose(changed, plain)


def test_grayscale_makes_the_channels_equal():
    image = tiny_image()
    x = denormalize(view(image, input_size=16, **{**NO_AUGMENT, "random_gray_scale": 1.0}))
    np.testing.assert_allclose(x[..., 0], x[..., 1], atol=1e-5)
    np.testing.assert_allclose(x[..., 1], x[..., 2], atol=1e-5)


def test_blur_smooths_a_checkerboard():
    board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((2, 2))).astype(np.uint8)
    image = np.repeat(board[..., None], 3, axis=2)
    plain = denormalize(view(image, input_size=16, **NO_AUGMENT))
    blurred = denormalize(view(image, input_size=16, **{**NO_AUGMENT, "gaussian_blur": 1.0,
                                                         "sigmas": (1.0, 1.0)}))
    assert blurred.std() < 0.5 * plain.std()
    assert blurred.mean() == pytest.approx(plain.mean(), abs=0.05)


def test_colour_jitter_changes_colours():
    image = tiny_image()
    plain = view(image, input_size=16, **NO_AUGMENT)
    assert not torch.allclose(plain, view(image, input_size=16, **{**NO_AUGMENT, "cj_prob": 1.0}))


def test_inspection_preset_is_milder_and_can_be_overridden():
    crop = SimCLRTransform.inspection(32).pipeline.transforms[0]
    assert crop.scale == (0.5, 1.0)
    assert SimCLRTransform.inspection(32, min_scale=0.3).pipeline.transforms[0].scale == (0.3, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"hf_prob": 1.5}, {"rr_prob": -0.1}, {"min_scale": 0.0}, {"cj_hue": 0.3, "cj_strength": 2.0},
     {"sigmas": (2.0, 1.0)}, {"input_size": 8}],
)
def test_transform_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SimCLRTransform(**kwargs)


def test_two_view_dataset_decodes_each_image_once_and_shrinks_it(samples, monkeypatch):
    from visinspect.methods.simclr import augment

    calls = []
    monkeypatch.setattr(augment, "load_rgb", lambda path: calls.append(path) or tiny_image(64))
    dataset = TwoViewDataset(samples[:3], SimCLRTransform(32), cache_side=40)
    v1, v2 = dataset[1]
    dataset[1]
    assert len(calls) == 1 and len(dataset) == 3
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)
    assert dataset.image(1).shape == (40, 40, 3)


# ----------------------------------------------------------------------------- model


def test_projection_head_layers():
    assert ProjectionHead(512, 64, 16)(torch.randn(4, 512)).shape == (4, 16)
    v2 = ProjectionHead(512, 64, 16, num_layers=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in v2.modules()) == 3
    no_bn = ProjectionHead(512, 64, 16, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("trainable_from", [FROZEN_END, 17])
def test_simclr_model_trains_only_the_chosen_blocks(encoder, trainable_from):
    model = small_model(encoder, trainable_from)
    x = torch.randn(4, 3, 32, 32)
    assert model.representation(x).shape == (4, 512)
    model(x).sum().backward()
    for i, layer in enumerate(model.encoder.features):
        for p in layer.parameters():
            assert (p.grad is not None) == (i >= trainable_from)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.encoder.features[trainable_from].weight) in trainable
    assert id(model.encoder.fc.weight) not in trainable  # the CAM head is not SimCLR's business
    assert all(id(p) in trainable for p in model.head.parameters())


def test_build_simclr_model_follows_the_config():
    config = PretrainConfig(trainable_from=17, proj_output_dim=16)
    model, provenance = build_simclr_model(config, weights="random")
    assert provenance["source"] == "random" and model.trainable_from == 17
    assert model.head.config["output_dim"] == 16


# ----------------------------------------------------------------------------- configuration


def test_config_presets_and_validation():
    demo, full = PretrainConfig.demo(), PretrainConfig.full(epochs=2)
    assert demo.image_size < full.image_size and full.epochs == 2
    assert PretrainConfig(**full.to_dict()) == full
    assert full.make_transform().input_size == full.image_size
    for bad in ({"batch_size": 1}, {"augment": "strong"}, {"trainable_from": 31}, {"lr": 0.0},
                {"warmup_epochs": 9, "epochs": 2}, {"max_images": 4, "batch_size": 8}):
        with pytest.raises(VisinspectError):
            PretrainConfig(**bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"dense_weight": 1.5}, "dense_weight"), ({"dense_weight": -0.1}, "dense_weight"),
     ({"l2sp_weight": -1.0}, "l2sp_weight"), ({"l2sp_weight": float("nan")}, "l2sp_weight"),
     ({"defect_negatives": "yes"}, "True or False"), ({"mean_shifted": 1}, "True or False"),
     ({"rotation_negatives": True, "augment_kwargs": {"rr_prob": 0.5}}, "rr_prob"),
     ({"freeze_head_bn": True, "mean_shifted": True}, "bypasses the projection head"),
     ({"freeze_head_bn": True, "proj_layers": 1}, "batch norm")],
)
def test_config_refuses_bad_levers(bad, message):
    with pytest.raises(VisinspectError, match=message):
        PretrainConfig(**bad)


def test_levers_are_off_by_default_and_rotation_negatives_take_rotations_out_of_the_views():
    plain = PretrainConfig()
    switches = (plain.defect_negatives, plain.rotation_negatives, plain.mean_shifted, plain.freeze_head_bn)
    assert not any(switches) and plain.dense_weight == 0.0 and plain.l2sp_weight == 0.0
    transform = PretrainConfig(rotation_negatives=True).make_transform()
    steps = {type(t).__name__: t for t in transform.pipeline.transforms}
    assert steps["RandomVerticalFlip"].p == 0.0 and steps["RandomRotate90"].p == 0.0
    assert steps["RandomHorizontalFlip"].p == 0.5  # a flip alone is no rotation
    plain_steps = {type(t).__name__: t for t in plain.make_transform().pipeline.transforms}
    assert plain_steps["RandomRotate90"].p == 0.5


def test_config_repr_names_the_levers_that_are_on():
    plain = PretrainConfig()
    assert all(not getattr(plain, name) for name in LEVERS)
    assert not any(name in repr(plain) for name in LEVERS)  # reads as before the levers existed
    assert repr(plain).startswith("PretrainConfig(epochs=7, ") and "num_workers=0)" in repr(plain)
    on = repr(PretrainConfig(dense_weight=0.5, freeze_head_bn=True))
    assert on.endswith("num_workers=0, dense_weight=0.5, freeze_head_bn=True)")


def test_warmup_then_cosine_schedule():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))


# ----------------------------------------------------------------------------- data selection


def test_pretrain_samples_never_include_target_test_images(samples):
    source = [s for s in samples if s.category in SOURCE]
    target = [s for s in samples if s.category in TARGET]
    with_good = pretrain_samples(source, target, include_target_good=True)
    added = [s for s in with_good if s.category in TARGET]
    assert added and all(s.split == "train" and s.label == 0 for s in added)
    assert len(added) == sum(s.split == "train" and s.label == 0 for s in target)
    assert set(source) <= set(with_good)
    assert pretrain_samples(source, target, include_target_good=False) == sorted(
        source, key=lambda s: (s.category, str(s.path))
    )
    with pytest.raises(DataError, match="both source and target"):
        pretrain_samples(source, source, include_target_good=True)


# ----------------------------------------------------------------------------- training


def fixed_batch_loss(model: SimCLRModel, x: torch.Tensor, temperature: float, precision: str) -> float:
    """The NT-Xent loss of one batch, computed as pretrain() computes it: channels_last, autocast
    in `precision`, the loss itself in float32."""
    # Train mode (batch statistics) but no gradients: after a few steps the head's batch-norm
    # running statistics are not yet meaningful, so eval mode would measure them, not learning.
    model.train().to(memory_format=torch.channels_last)
    with torch.no_grad(), autocast("cpu", precision):
        z = model(x.contiguous(memory_format=torch.channels_last))
    return nt_xent_loss(*z.float().chunk(2), temperature=temperature).item()


@pytest.mark.precision
def test_pretraining_lowers_the_loss_on_its_images(samples, encoder):
    images = [s for s in samples if s.category in SOURCE][:8]
    config = PretrainConfig(epochs=2, batch_size=8, image_size=32, warmup_epochs=0,
                            augment_kwargs=NO_AUGMENT)
    # What "auto" means on this machine (bf16 on a CPU with native bf16 or a GPU, else fp32;
    # VISINSPECT_PRECISION forces it): the reference loss must be computed in that precision too.
    # bf16 keeps 8 mantissa bits (relative rounding up to 2**-9 ≈ 0.2 %), so an fp32 reference
    # is 0.5 % away from pre-training's first bf16 loss; in the same precision and the same layout
    # both are the same computation and agree far within 0.1 %.
    precision = resolve_precision(config.precision)
    model = small_model(encoder)
    # With augmentation off both views are the image itself, and one batch holds all images:
    # every step trains on exactly this fixed batch.
    dataset = TwoViewDataset(images, config.make_transform())
    x = torch.stack([dataset[i][0] for i in range(len(images))]).repeat(2, 1, 1, 1)
    before = fixed_batch_loss(model, x, config.temperature, precision)
    history = pretrain(model, images, config, progress=False)
    assert history["epoch"] == [1, 2]
    assert history["loss"][0] == pytest.approx(before, rel=1e-3)  # the first step saw this batch
    assert fixed_batch_loss(model, x, config.temperature, precision) < 0.8 * before


@pytest.mark.precision
def test_pretraining_is_seeded_and_leaves_frozen_layers_alone(samples, encoder):
    images = [s for s in samples if s.category in SOURCE][:8]
    config = PretrainConfig(epochs=1, batch_size=4, image_size=32)
    runs = []
    for _ in range(2):
        model = small_model(encoder)
        history = pretrain(model, images, config, progress=False,
                           on_epoch_end=lambda epoch, record: record.update(seen=epoch))
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert h1["loss"] == h2["loss"] and h1["seen"] == [1]
    assert set(h1) == {"epoch", "loss", "lr", "images_per_s", "seconds", "seen"}
    weights = zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)
    before = encoder.features.state_dict()
    after = m1.encoder.features.state_dict()
    assert torch.equal(after["21.weight"], before["21.weight"])  # conv4_3: frozen
    assert not torch.equal(after["28.weight"], before["28.weight"])  # conv5_3: trained
    assert torch.equal(m1.encoder.fc.weight, encoder.fc.weight)


def test_pretrain_refuses_too_few_images_and_a_mismatched_model(samples, encoder):
    with pytest.raises(DataError, match="fewer than one batch"):
        pretrain(small_model(encoder), samples[:3], PretrainConfig(batch_size=4), progress=False)
    with pytest.raises(VisinspectError, match="trainable_from"):
        pretrain(small_model(encoder, 17), samples, PretrainConfig(), progress=False)


def test_knn_monitor_finds_each_image_itself(samples, encoder):
    model = small_model(encoder).train()
    images = [s for s in samples if s.category in SOURCE][:10]
    assert knn_monitor(model, images, images, k=1, image_size=32) == 1.0
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="k must be"):
        knn_monitor(model, images[:2], images, k=3, image_size=32)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path, encoder):
    model = small_model(encoder)
    with torch.no_grad():
        model.encoder.features[28].weight.add_(1.0)  # differs from any fresh model
    config = PretrainConfig.demo()
    backbone = {"source": "random", "path": None, "sha256": None}
    path = save_pretrained(tmp_path / "simclr.pt", model, config, {"loss": [2.5]}, backbone)
    classifier = copy.deepcopy(encoder)
    provenance = load_pretrained_encoder(path, classifier)
    for key, value in model.encoder.features.state_dict().items():
        assert torch.equal(classifier.features.state_dict()[key], value)
    assert provenance["source"] == f"simclr:{path}" and provenance["sha256"] == sha256_file(path)
    assert provenance["backbone"] == backbone and provenance["config"] == config.to_dict()


def test_loading_the_wrong_checkpoint_is_refused(tmp_path, encoder):
    save_checkpoint(tmp_path / "classifier.pt", {"kind": "classifier"})
    with pytest.raises(CheckpointError, match="simclr"):
        load_pretrained_encoder(tmp_path / "classifier.pt", copy.deepcopy(encoder))
    save_checkpoint(tmp_path / "bad.pt", {"kind": "simclr", "encoder": {"0.weight": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="VGG16 conv weights"):
        load_pretrained_encoder(tmp_path / "bad.pt", copy.deepcopy(encoder))


@pytest.mark.precision
def test_interrupted_pretraining_resumes_to_the_same_weights(samples, encoder, tmp_path):
    images = [s for s in samples if s.category in SOURCE][:8]
    full = small_model(encoder)
    pretrain(full, images, PretrainConfig(epochs=2, batch_size=4, image_size=32), progress=False)
    # "Interrupted" after epoch 1: a one-epoch run writes the state, a new process resumes it.
    state = tmp_path / "simclr.pt.state"
    first = small_model(encoder)
    with pytest.raises(_Interrupt):  # like Ctrl-C during epoch 2: epoch 1's state is on disk
        pretrain(first, images, PretrainConfig(epochs=2, batch_size=4, image_size=32), progress=False,
                 checkpoint_path=state, on_epoch_end=_stop_after_first_epoch)
    resumed = small_model(encoder)
    torch.manual_seed(123)  # the resume must restore the random state itself
    history = pretrain(resumed, images, PretrainConfig(epochs=2, batch_size=4, image_size=32),
                       progress=False, resume=state)
    assert history["epoch"] == [1, 2]
    pairs = zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
    with pytest.raises(CheckpointError, match="seed"):
        pretrain(small_model(encoder), images, PretrainConfig(epochs=2, batch_size=4, image_size=32, seed=1),
                 progress=False, resume=state)


# Every lever at least once; mean_shifted excludes freeze_head_bn (no head), hence two sets.
LEVER_SETS = [
    {"defect_negatives": True, "rotation_negatives": True, "dense_weight": 0.5, "l2sp_weight": 1.0,
     "freeze_head_bn": True},
    {"mean_shifted": True, "defect_negatives": True},
]


def lever_model(encoder: VGG16CAM, config: PretrainConfig) -> SimCLRModel:
    torch.manual_seed(1)
    dense = DenseProjectionHead(512, 64, 32) if config.dense_weight > 0 else None
    return SimCLRModel(copy.deepcopy(encoder), ProjectionHead(512, 64, 32), FROZEN_END, dense)


@pytest.mark.precision
@pytest.mark.parametrize("levers", LEVER_SETS)
def test_pretraining_with_levers_is_seeded_and_resumes_to_the_same_weights(samples, encoder, tmp_path,
                                                                           levers):
    # Two categories' images (the mean-shifted loss has one center per category).
    source, target = ([s for s in samples if s.category in names] for names in (SOURCE, TARGET))
    images = source[:6] + target[:2]
    config = PretrainConfig(epochs=2, batch_size=4, image_size=32, **levers)
    full = lever_model(encoder, config)
    history = pretrain(full, images, config, progress=False)
    again = lever_model(encoder, config)
    assert pretrain(again, images, config, progress=False)["loss"] == history["loss"]
    start = dict(lever_model(encoder, config).named_parameters())
    bypassed = "head." if config.mean_shifted else "no part"  # the mean-shifted loss reads h
    trained = {id(p) for p in full.trainable_parameters()}
    for name, p in full.named_parameters():
        if id(p) in trained and not name.startswith(bypassed):
            assert not torch.equal(p, start[name]), f"{name} did not train"
    # conv1_1 .. conv4_3 stay ImageNet's with every lever: the good-reference score (conv4_3) is
    # the same on a SimCLR backbone, so pre-training cannot lower it.
    frozen = {n: p for n, p in full.named_parameters() if n.startswith("encoder.features.")
              and int(n.split(".")[2]) < FROZEN_END}
    assert frozen and all(torch.equal(p, start[n]) for n, p in frozen.items())
    state = tmp_path / "state.pt"
    with pytest.raises(_Interrupt):
        pretrain(lever_model(encoder, config), images, config, progress=False, checkpoint_path=state,
                 on_epoch_end=_stop_after_first_epoch)
    resumed = lever_model(encoder, config)
    torch.manual_seed(123)
    assert pretrain(resumed, images, config, progress=False, resume=state)["epoch"] == [1, 2]
    pairs = zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
    with pytest.raises(CheckpointError, match="defect_negatives"):
        pretrain(lever_model(encoder, config), images, PretrainConfig(epochs=2, batch_size=4, image_size=32),
                 progress=False, resume=state)


def test_mean_shift_centers_are_each_categorys_mean_normalised_h(samples, encoder):
    images = [s for s in samples if s.split == "train"]
    config = PretrainConfig(image_size=32, batch_size=4, mean_shifted=True)
    model = small_model(encoder)
    centers = _anchors(model, images, config)["centers"]
    names = sorted({s.category for s in images})
    assert centers.shape == (len(names), 512)
    for k, name in enumerate(names):
        mine = [s for s in images if s.category == name]
        x = torch.stack([DefectDataset(mine, 32)[i]["image"] for i in range(len(mine))])
        with torch.no_grad():
            expected = F.normalize(model.representation(x), dim=1).mean(dim=0)
        torch.testing.assert_close(centers[k], expected, atol=1e-5, rtol=1e-4)


def test_frozen_head_batch_norm_stays_at_the_starting_statistics(samples, encoder):
    images = [s for s in samples if s.category in SOURCE][:8]
    config = PretrainConfig(epochs=1, batch_size=4, image_size=32, freeze_head_bn=True)
    start = small_model(encoder)
    _anchors(start, images, config)  # the statistics pretrain() estimates first
    model = small_model(encoder)
    pretrain(model, images, config, progress=False)
    for a, b in zip(start.head.batch_norms, model.head.batch_norms, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert not torch.equal(start.head.layers[0].weight, model.head.layers[0].weight)  # the head trained


def test_l2sp_keeps_block_5_closer_to_its_start(samples, encoder):
    images = [s for s in samples if s.category in SOURCE][:8]
    drift = {}
    for weight in (0.0, 100.0):
        model = small_model(encoder)
        pretrain(model, images, PretrainConfig(epochs=2, batch_size=4, image_size=32, l2sp_weight=weight),
                 progress=False)
        start = small_model(encoder).encoder_parameters()
        drift[weight] = l2sp_penalty(model.encoder_parameters(), start).item()
    assert 0 < drift[100.0] < 0.5 * drift[0.0]


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch, record):
    if epoch == 1:
        return
    raise _Interrupt
