"""NT-Xent and the anomaly levers' terms: the mean-shifted and dense losses, L2-SP, and the shifted
negatives (defect and rotated views) that join a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visinspect.data.samples import IMAGENET_MEAN, IMAGENET_STD
from visinspect.methods.pseudo_defects import pseudo_defect


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.2,
    negatives: torch.Tensor | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy), the SimCLR loss.

    z1[i] and z2[i] are projections of two views of image i. Each of the 2N views is an anchor
    whose positive is the other view of its image and whose negatives are the other 2N - 2
    views; the loss is the cross entropy of cosine similarity / temperature, averaged over all
    2N anchors. tau = 0.2 is Chen's advice for small batches (google-research/simclr#166); the
    paper's 0.1 is tuned for batch 4096, where many more negatives share the probability mass.

    `negatives` (M, D): extra views that are only negatives (never anchors), in every anchor's
    denominator: CSI's shifted copies, e.g. a defective or rotated copy of each image
    (PretrainConfig.defect_negatives, rotation_negatives), so that anchor i must also tell its
    own image from that image with a defect.

    `rows` (images i0..i1): only their 2 (i1 - i0) views are anchors, the loss is the mean over
    them; the others are still positives and negatives. Under torchrun each rank passes the
    global batch gathered with its gradient (distributed.gather) and its own images: the mean
    over ranks is the loss of one process with the whole batch, and so is the gradient, because
    the gather's backward sums the ranks' gradients (N times the whole loss's) and DDP divides by N.
    Each rank so computes a (2B x 2NB) similarity, not the whole (2NB x 2NB) one.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D) with the same shape; got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"NT-Xent needs N >= 2 images (the others are the negatives); got N = "
                         f"{z1.shape[0]}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != z1.shape[1]):
        raise ValueError(f"negatives must be (M, D) with D = {z1.shape[1]}; got {tuple(negatives.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    images = torch.arange(n)[rows if rows is not None else slice(None)]
    if len(images) == 0:
        raise ValueError(f"rows {rows} select none of the {n} images")
    anchors = torch.cat([images, images + n]).to(z.device)  # both views of each chosen image
    za = z if rows is None else z[anchors]
    logits = za @ z.T / temperature
    self_pairs = anchors[:, None] == torch.arange(2 * n, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))  # a view is not its own negative
    if negatives is not None:
        logits = torch.cat([logits, za @ F.normalize(negatives.float(), dim=1).T / temperature], dim=1)
    positives = (anchors + n) % (2 * n)  # the other view of the same image
    return F.cross_entropy(logits, positives)


def mean_shift(h: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Reiss & Hoshen's mean-shifted representation: normalise h (N, D), subtract the normal
    data's center (D,) or (N, D) (the mean of normalised h of normal images), normalise again.

    Plain NT-Xent on the unit sphere pushes all views apart, uniformly over the sphere; but the
    pretrained features of one product's good images sit in a small cap of it, so spreading them
    destroys what made them good. Measured as angles around the cap's center, uniformity no
    longer pulls the normal images away from each other's neighbourhood.
    """
    if h.ndim != 2 or center.shape not in (h.shape, h.shape[1:]):
        raise ValueError(f"h must be (N, D) and center (D,) or (N, D); got {tuple(h.shape)} and "
                         f"{tuple(center.shape)}")
    return F.normalize(F.normalize(h.float(), dim=1) - center.float(), dim=1)


def dense_nt_xent_loss(
    d1: torch.Tensor,
    d2: torch.Tensor,
    f1: torch.Tensor,
    f2: torch.Tensor,
    temperature: float = 0.2,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense (patch-level) NT-Xent on maps of two views, DenseCL's loss without its queue.

    d1, d2 (N, D, h, w): dense projections of the two views of N images; f1, f2 (N, C, h, w):
    the backbone maps used to match positions. Each position p of view 1 of image i is an anchor;
    its positive is the position of view 2 of image i whose backbone vector is most similar
    (cosine) to f1[i, :, p] (DenseCL's correspondence: no crop geometry is needed, and flips and
    rotations are matched too); its negatives are every other position of every view-2 map of
    the batch, those of its own image included, so a defect's patch must differ from the rest
    of its part. The same with the views swapped; the loss is the mean over all 2 N h w anchors.
    Cost: two (N h w) x (N h w) similarity matrices (39 M entries for 32 images at 224 px).
    `negatives` (M, D): more dense projections (e.g. of a pseudo-defect's positions) that join
    every anchor's negatives, of both views.
    """
    same_grid = f1.ndim == 4 and f1.shape[0] == d1.shape[0] and f1.shape[2:] == d1.shape[2:]
    if d1.ndim != 4 or d1.shape != d2.shape or f1.shape != f2.shape or not same_grid:
        raise ValueError(f"d1, d2 must be (N, D, h, w) and f1, f2 (N, C, h, w) of the same N, h, w; got "
                         f"{tuple(d1.shape)}, {tuple(d2.shape)}, {tuple(f1.shape)}, {tuple(f2.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    n, _, h, w = d1.shape

    def positions(maps: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, h w, C), unit vectors
        return F.normalize(maps.flatten(2).transpose(1, 2).float(), dim=2)

    with torch.no_grad():
        match = positions(f1) @ positions(f2).transpose(1, 2)  # (N, h w, h w): cosine, view 1 to 2
        offset = (torch.arange(n, device=d1.device) * h * w)[:, None]
        to2 = (match.argmax(dim=2) + offset).flatten()  # view-1 position -> its view-2 match
        to1 = (match.argmax(dim=1) + offset).flatten()  # view-2 position -> its view-1 match
    q1, q2 = positions(d1).flatten(0, 1), positions(d2).flatten(0, 1)  # (N h w, D)
    logits = q1 @ q2.T / temperature
    if negatives is None or not len(negatives):
        return 0.5 * (F.cross_entropy(logits, to2) + F.cross_entropy(logits.T, to1))
    extra = F.normalize(negatives.float(), dim=1).T / temperature
    return 0.5 * (F.cross_entropy(torch.cat([logits, q1 @ extra], 1), to2)
                  + F.cross_entropy(torch.cat([logits.T, q2 @ extra], 1), to1))


def l2sp_penalty(parameters: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al., ICML 2018): the squared L2 distance sum ||w - w0||^2 of the parameters
    from their starting (ImageNet) values, instead of weight decay's distance from zero."""
    if len(parameters) != len(start) or any(
        p.shape != s.shape for p, s in zip(parameters, start, strict=False)
    ):
        raise ValueError("parameters and start must be lists of tensors of the same shapes")
    return sum(((p.float() - s.float()) ** 2).sum() for p, s in zip(parameters, start, strict=True))


# ----------------------------------------------------------------------------- shifted negatives


def defect_views(views: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each ImageNet-normalised view (N, 3, S, S) with one pseudo-defect drawn on it
    (pseudo_defects.pseudo_defect: CutPaste, a scar or one of the synthetic dataset's defects).

    The defect is drawn on the view, after its augmentations, so that no crop can remove it
    and the copy differs from the view only inside the defect (outside it, the values are equal).
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((views.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    defective = torch.stack([
        torch.from_numpy(pseudo_defect(p.permute(1, 2, 0).contiguous().numpy(), rng)[0]).permute(2, 0, 1)
        for p in pixels
    ])
    delta = (defective.float() - pixels.float()) / 255.0 / std
    return views + delta.to(views.device, views.dtype)


def rotated_views(views: torch.Tensor) -> torch.Tensor:
    """Each view (N, C, S, S) rotated by 90, 180 or 270 degrees, drawn per view from torch's
    generator: CSI's rotations (one of the three per image, to cost one view, not three)."""
    turns = torch.randint(1, 4, (len(views),)).tolist()
    return torch.stack([torch.rot90(v, k, dims=(-2, -1)) for v, k in zip(views, turns, strict=True)])
