"""Levers on what the patch bank compares: the image before the network, and the network's levels.

- Local contrast normalisation (LCN). The per-image standardisation
  (backbones.mobilenet.ImageStandardisation) removes a part's overall brightness and contrast, not a
  light that falls off across it: a tile lit from one side has good patches on its dark side that no
  good patch of an evenly lit tile resembles. LCN (Jarrett et al., ICCV 2009) subtracts each pixel's
  neighbourhood mean and divides by its spread (backbones.mobilenet.LocalContrastNormalisation), so
  only local structure reaches the network. It also removes slow changes that *are* defects (an
  uneven tile), hence a lever measured against the method it extends.
- Two levels (PatchCore concatenates ResNet's layers 2 and 3): MobileNetV2's stride-8 maps (32
  channels) with its stride-16 maps upsampled to them, four times as many patches of 128 values:
  smaller defects and finer heatmaps, but a bank four times larger.
"""

from __future__ import annotations

from visinspect.methods.binary_patterns import PatternReferenceDetector


class LocalContrastReferenceDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns on images whose local contrast is normalised first; a binary
    drawing keeps its pattern score (it reads no patch network)."""

    layers = stored_layers = ("mobilenet_v2_lcn",)
    lighting = "local"


class TwoLevelReferenceDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns on MobileNetV2's stride-8 and stride-16 maps together."""

    layers = stored_layers = ("mobilenet_v2_s8", "mobilenet_v2")
