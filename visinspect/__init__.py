"""visinspect: visual defect detection in an unknown context (VGG16-CAM, SimCLR, few good parts)."""

__version__ = "0.1.0"
