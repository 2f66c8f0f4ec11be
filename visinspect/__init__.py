"""visinspect: visual defect detection in an unknown context (VGG16-CAM, SimCLR, few good parts).

The names a user needs first, from the package root (loaded on first use, so that `python -m
visinspect --help` stays fast):

    detector = visinspect.load_detector("m.pt", reference=["good/"])   # a checkpoint of `train`
    scored = detector.score(samples)                                     # or, for folders of files:
    visinspect.predict_images(detector, ["images/"], "out/")             # JSON lines and overlays
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "Detector": "visinspect.methods.base",
    "METHODS": "visinspect.methods.registry",
    "RECOMMENDED": "visinspect.methods.registry",
    "load_detector": "visinspect.methods.registry",
    "train_method": "visinspect.methods.registry",
    "predict_folder": "visinspect.predict",
    "predict_images": "visinspect.predict",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'visinspect' has no attribute {name!r}")
