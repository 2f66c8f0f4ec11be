"""Images and their labels: products in the MVTec AD layout (`samples`), the synthetic course
data (`synthetic`) and the public downloads (`download`).

`visinspect.data` re-exports the reading API of `samples`, the names a notebook uses most.
"""

from visinspect.data.samples import (
    GOOD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DefectDataset,
    Sample,
    SampleTable,
    build_sample_table,
    default_synthetic_root,
    denormalize,
    find_categories,
    load_mask,
    load_rgb,
    single_class_categories,
    stratified_split,
    subsample_per_category,
    summarize,
    target_test_images,
    to_tensor,
    unknown_context_split,
)

__all__ = [
    "GOOD", "IMAGENET_MEAN", "IMAGENET_STD", "DefectDataset", "Sample", "SampleTable",
    "build_sample_table", "default_synthetic_root", "denormalize", "find_categories", "load_mask",
    "load_rgb", "single_class_categories", "stratified_split", "subsample_per_category", "summarize",
    "target_test_images", "to_tensor", "unknown_context_split",
]
