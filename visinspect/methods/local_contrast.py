"""Lighting evened out locally before the patch network: local contrast normalisation (LCN).

The per-image standardisation (backbones.mobilenet.ImageStandardisation) removes a part's overall
brightness and contrast, not a light that falls off across it: a tile lit from one side has good
patches on its dark side that no good patch of an evenly lit tile resembles. LCN (Jarrett et al.,
ICCV 2009) subtracts each pixel's neighbourhood mean and divides by its spread
(backbones.mobilenet.LocalContrastNormalisation, sigma LCN_SIGMA of the side), so only local
structure reaches the network. It also removes slow changes that *are* defects (a faint stain
wider than the Gaussian), hence a lever measured against the method it extends, not a default.
"""

from __future__ import annotations

from visinspect.methods.binary_patterns import PatternReferenceDetector


class LocalContrastReferenceDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns on images whose local contrast is normalised first; a binary
    drawing keeps its pattern score (it reads no patch network)."""

    layers = stored_layers = ("mobilenet_v2_lcn",)
    contrast = "local"
