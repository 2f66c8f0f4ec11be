"""Dense contrastive adaptation of the patch network (visinspect.methods.simclr.patch_network)."""

import numpy as np
import torch

from visinspect.backbones.mobilenet import build_mobilenet
from visinspect.data.samples import build_sample_table, load_rgb
from visinspect.methods.registry import backbone_info, make_detector
from visinspect.methods.simclr.loss import dense_nt_xent_loss
from visinspect.methods.simclr.patch_network import (
    PatchContrastConfig,
    adapt_patch_network,
    adapted_state,
    load_adapted,
)

TINY = PatchContrastConfig(epochs=1, batch_size=4, image_size=64, max_images=8, precision="fp32")


def test_negatives_can_only_raise_the_dense_loss():
    torch.manual_seed(0)
    d1, d2, f1, f2 = (torch.randn(2, 8, 3, 3) for _ in range(4))
    plain = dense_nt_xent_loss(d1, d2, f1, f2)
    more = dense_nt_xent_loss(d1, d2, f1, f2, negatives=torch.randn(5, 8))
    assert more > plain
    assert torch.equal(dense_nt_xent_loss(d1, d2, f1, f2, negatives=torch.zeros(0, 8)), plain)


def test_only_the_last_blocks_move_and_the_original_is_kept(tiny_root):
    network, _ = build_mobilenet("random")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = [load_rgb(s.path) for s in build_sample_table(tiny_root).samples[:8]]
    adapted = adapt_patch_network(network, images, TINY)
    for k, v in network.state_dict().items():
        assert torch.equal(v, before[k]), k  # the given network is untouched
    moved = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(int(k.split(".")[2]) >= TINY.trainable_from for k in moved), sorted(moved)[:3]
    assert not any(p.requires_grad for p in adapted.parameters())
    # The state a checkpoint keeps puts the adapted network back on a fresh ImageNet one.
    fresh = load_adapted(build_mobilenet("random")[0], adapted_state(adapted, TINY))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(fresh(x), adapted(x))


def test_the_detector_adapts_on_the_sources_and_a_checkpoint_brings_it_back(tiny_root, pristine_model):
    samples = build_sample_table(tiny_root).samples
    train = [s for s in samples if s.split == "train" and s.category != "round_pill"]
    good = [s for s in samples if s.category == "round_pill" and s.split == "train"][:4]
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    info = backbone_info(64, {"source": "random"})
    detector = make_detector("reference-mobilenet+patterns+simclr", pristine_model, info, precision="fp32")
    detector.contrast = TINY
    learnt = detector.fit_sources(train[:6], train[6:8])
    assert set(learnt["patch_contrast"]) == {"blocks", "config"}
    detector.adapt(good)
    again = make_detector("reference-mobilenet+patterns+simclr", pristine_model, info | learnt,
                          precision="fp32")
    again.adapt(good)
    np.testing.assert_allclose(again.score(test).scores, detector.score(test).scores, rtol=1e-5, atol=1e-6)
