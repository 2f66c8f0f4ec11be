"""SimCLR's views: the augmentations (milder for inspection than the paper's), and the datasets that
decode each image once and draw two views of it per step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import Dataset

from visinspect.data.samples import IMAGENET_MEAN, IMAGENET_STD, Sample, load_rgb
from visinspect.errors import DataError


class RandomRotate90:
    """Rotate a (..., H, W) tensor by 90 degrees counter-clockwise with probability p.

    With horizontal and vertical flips at p = 0.5 and this at p = 0.5, all 8 flips/rotations
    of the square are equally likely (the two flips together make the 180-degree rotation).
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, 1, dims=(-2, -1)) if torch.rand(1).item() < self.p else x


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability and must be in [0, 1]; got {p}")


class SimCLRTransform:
    """One random SimCLR view of an image: RGB uint8 array (H, W, 3), PIL image or uint8 tensor
    (3, H, W) on any device in, ImageNet-normalised float tensor (3, input_size, input_size) out
    (on the input's device: on a GPU the augmentations run there).

    Defaults are the paper's (google-research/simclr, lightly's SimCLRTransform): random resized
    crop of scale (min_scale, 1) and aspect ratio (3/4, 4/3), horizontal flip, colour jitter
    (brightness/contrast/saturation 0.8 * cj_strength, hue 0.2 * cj_strength, random order) with
    probability cj_prob, grayscale with probability random_gray_scale, and a Gaussian blur
    (sigma uniform in `sigmas`, kernel about 10 % of the side, odd) with probability gaussian_blur.
    Industrial images have no canonical orientation, hence the optional vertical flip (vf_prob)
    and 90-degree rotation (rr_prob). All randomness comes from torch's global generator, so
    `torch.manual_seed` makes the views reproducible.
    """

    def __init__(
        self,
        input_size: int = 224,
        min_scale: float = 0.08,
        hf_prob: float = 0.5,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        rr_prob: float = 0.0,
    ) -> None:
        if input_size < 16:
            raise ValueError(f"input_size must be at least 16 pixels; got {input_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale is a fraction of the image area in (0, 1]; got {min_scale}")
        probabilities = {"hf_prob": hf_prob, "vf_prob": vf_prob, "rr_prob": rr_prob, "cj_prob": cj_prob,
                         "random_gray_scale": random_gray_scale, "gaussian_blur": gaussian_blur}
        for name, p in probabilities.items():
            _check_probability(name, p)
        if not 0.0 <= cj_hue * cj_strength <= 0.5:
            raise ValueError(f"cj_hue * cj_strength must be in [0, 0.5]; got {cj_hue * cj_strength}")
        if not 0.0 < sigmas[0] <= sigmas[1]:
            raise ValueError(f"sigmas must be (low, high) with 0 < low <= high; got {sigmas}")
        self.input_size = input_size
        s = cj_strength
        kernel = max(3, int(0.1 * input_size) // 2 * 2 + 1)  # odd, as a Gaussian kernel must be
        self.pipeline = T.Compose(
            [
                T.RandomResizedCrop(input_size, scale=(min_scale, 1.0), antialias=True),
                T.RandomHorizontalFlip(hf_prob),
                T.RandomVerticalFlip(vf_prob),
                RandomRotate90(rr_prob),
                T.RandomApply(
                    [T.ColorJitter(cj_bright * s, cj_contrast * s, cj_sat * s, cj_hue * s)],
                    p=cj_prob,
                ),
                T.RandomGrayscale(random_gray_scale),
                T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(sigmas))], p=gaussian_blur),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @classmethod
    def inspection(cls, input_size: int = 224, **overrides) -> SimCLRTransform:
        """Milder views for defect images: a defect covering 1 % of a part must stay visible.

        Crops keep at least half of the image (the paper's 8 % would often crop the defect
        out, making the two views disagree about it); any flip or rotation (parts have no
        up); half-strength colour jitter, since colour itself can be the defect (stains); and a
        blur of at most sigma = 1 pixel, which leaves thin scratches and cracks visible.
        """
        preset = {"min_scale": 0.5, "vf_prob": 0.5, "rr_prob": 0.5, "cj_strength": 0.5, "sigmas": (0.1, 1.0)}
        return cls(input_size=input_size, **{**preset, **overrides})

    def __call__(self, image: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise DataError(f"SimCLRTransform needs a uint8 tensor (3, H, W); got {image.dtype} "
                                f"{tuple(image.shape)}")
            return self.pipeline(image.float().div(255.0))
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise DataError(
                f"SimCLRTransform needs an RGB uint8 array (H, W, 3) or a PIL image, got "
                f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
                "; read images with visinspect.data.samples.load_rgb"
            )
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)  # copy: may be read-only
        return self.pipeline(x)


def aligned_views(transform: SimCLRTransform, images: Sequence[np.ndarray], seed: int) -> torch.Tensor:
    """The same random view of several images of one size (N, 3, S, S): one crop, flip, jitter and
    blur for all, since the view's random draws depend on the image size only. Of a good part and
    its defective twin, their difference is what the augmentation left of the defect. (It seeds
    torch's global generator with `seed`.)"""
    if len({im.shape for im in images}) > 1:
        raise DataError(f"aligned views need images of one size; got {sorted({im.shape for im in images})}")
    views = []
    for image in images:
        torch.manual_seed(seed)  # the same draws for each image
        views.append(transform(image))
    return torch.stack(views)


def defect_left(
    transform: SimCLRTransform, good: np.ndarray, defective: np.ndarray, draws: int = 200, seed: int = 0
) -> np.ndarray:
    """What each of `draws` views keeps of a defect: the largest change between the view of the good
    part and the same view of its defective twin, in intensity (0 to 1, RGB before normalising).
    Near 0: the view cropped the defect out, or blurred or jittered it away; SimCLR then calls
    the part with and without its defect the same image."""
    return np.asarray([left_in(aligned_views(transform, [good, defective], seed + i)) for i in range(draws)])


def left_in(views: torch.Tensor) -> float:
    """What one pair of aligned views (good part, defective twin; from `aligned_views`) keeps of
    the defect: the largest change between them, in intensity (0 to 1, RGB before normalising)."""
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((views[1] - views[0]) * std).abs().amax().item()


class CachedImages(Dataset):
    """The decoded RGB uint8 image (H, W, 3) of each sample, cached in memory on first use.

    Decoding PNGs every epoch would cost more than the augmentations. `cache_side` shrinks
    larger images so their shorter side is that many pixels before caching: full-resolution
    MVTec images (1024 px) would need 3 MB each.
    """

    def __init__(self, samples: Sequence[Sample], cache_side: int | None = None) -> None:
        self.samples = list(samples)
        self.cache_side = cache_side
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The decoded (and possibly shrunk) RGB uint8 image of sample `index`, cached."""
        if index not in self._cache:
            image = load_rgb(self.samples[index].path)
            short = min(image.shape[:2])
            if self.cache_side is not None and short > self.cache_side:
                f = self.cache_side / short
                size = (round(image.shape[1] * f), round(image.shape[0] * f))  # cv2 wants (w, h)
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            self._cache[index] = image
        return self._cache[index]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.image(index)


class TwoViewDataset(CachedImages):
    """(view1, view2): two independent random views of each sample's image; labels are ignored."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable, cache_side: int | None = None
    ) -> None:
        super().__init__(samples, cache_side)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        return self.transform(image), self.transform(image)


def views_on(device: torch.device, transform: Callable, images: list[np.ndarray]):
    """Both views of a batch of cached images, augmented on `device`, image by image, drawing
    from the random generator in the same order as TwoViewDataset (view 1, view 2, next image)."""
    first, second = [], []
    for image in images:
        x = torch.tensor(image, device=device).permute(2, 0, 1)
        first.append(transform(x))
        second.append(transform(x))
    return torch.stack(first), torch.stack(second)
