"""The SimCLR methods' training: contrastive pre-training of the backbone on unlabelled images,
then the seed's classifier on the labelled source images, as one step of `train`, `compare`
and `loo`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visinspect.backbones.vgg16 import FROZEN_END, VGG16CAM
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError
from visinspect.methods.simclr.checkpoints import save_pretrained
from visinspect.methods.simclr.levers import LEVERS
from visinspect.methods.simclr.pretrain import PretrainConfig, build_simclr_model, pretrain, pretrain_samples
from visinspect.training import SourceImages, TrainingRun, train_baseline
from visinspect.utils import resolve_device


@dataclass(frozen=True)
class SimCLRTraining:
    """SimCLR with some `levers` (levers.LEVER_SETS) on the source images, and on the target's
    good train/ images too when `with_target_good`, then the seed's classifier on the encoder."""

    name: str
    levers: dict = field(default_factory=dict)
    with_target_good: bool = True

    def __call__(
        self, source: SourceImages, run: TrainingRun, encoder: tuple[VGG16CAM, dict] | None = None
    ) -> tuple[VGG16CAM, dict]:
        model, provenance = encoder or self.pretrained(source, run)
        return train_baseline(
            source.train, source.val, run.config, model=model, provenance=provenance,
            progress=run.progress, device=run.device, checkpoint_path=run.state, resume=run.resume,
        )

    def pretrained(self, source: SourceImages, run: TrainingRun) -> tuple[VGG16CAM, dict]:
        """The encoder after pre-training on the run's images, with what it was trained on."""
        if run.pretrain is None:
            raise ConfigError(
                f"the {self.name!r} training starts with SimCLR pre-training: run `pretrain` (with "
                "--include-target-good for the +target-good and simclr+LEVER methods, and the lever's "
                "flag, e.g. --l2sp-weight 100 for simclr+l2sp), then `train --pretrained FILE` with the "
                "same --method"
            )
        config = PretrainConfig(**{**run.pretrain.to_dict(), **self.levers, "seed": run.config.seed,
                                   "precision": run.config.precision})
        simclr, backbone = build_simclr_model(config, run.weights)
        simclr.to(resolve_device(run.device))
        images = pretrain_samples(source.source, source.target, include_target_good=self.with_target_good)
        state = run.pretrain_state
        history = pretrain(simclr, images, config, progress=run.progress, checkpoint_path=state,
                           resume=state if state is not None and state.is_file() else None)
        model = simclr.encoder
        model.set_frozen(FROZEN_END)  # downstream: the seed's recipe, whatever pre-training trained
        provenance = {"source": f"simclr ({self.name})", "backbone": backbone,
                      "pretrain_images": len(images), "pretrain_loss": history["loss"]}
        return model, provenance


def pretrain_to_file(
    out: str | Path,
    source: Sequence[Sample],
    target: Sequence[Sample],
    config: PretrainConfig,
    *,
    include_target_good: bool = False,
    weights: str | Path | None = "auto",
    device: str | torch.device = "auto",
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """SimCLR on the source images (and the target's good train/ images if asked), saved to `out`
    (`train --pretrained` reads it); a resumable state is kept at OUT.state meanwhile. Returns
    the history (loss and images/s per epoch)."""
    images = pretrain_samples(source, target, include_target_good=include_target_good)
    levers = ", ".join(f"{k}={getattr(config, k)}" for k in LEVERS if getattr(config, k))
    log(f"SimCLR pre-training on {len(images)} unlabeled images ({config.image_size} px, {config.epochs} "
        f"epochs, temperature {config.temperature}{', levers: ' + levers if levers else ''})")
    model, provenance = build_simclr_model(config, weights)
    model.to(resolve_device(device))
    state = Path(f"{out}.state")
    history = pretrain(model, images, config, checkpoint_path=state, resume=resume)
    save_pretrained(out, model, config, history, provenance)
    state.unlink(missing_ok=True)
    log(f"loss per epoch {history['loss']}; {history['images_per_s'][-1]:.1f} images/s")
    return history
