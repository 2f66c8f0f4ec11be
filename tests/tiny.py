"""The tiny synthetic dataset's shape, shared by tests/conftest.py and the tests that count its
images (a module of its own: `from conftest import ...` would find notebooks/conftest.py when
`pytest --nbval` collects both folders)."""

from visinspect.data.drawing import CATEGORIES

# Two products (one texture, one object), 4 train good + 2 test good + 2 per defect type each.
TINY_CATEGORIES = ("grain_wood", "round_pill")
TINY = {"image_size": 64, "n_train_good": 4, "n_test_good": 2, "n_test_per_defect": 2}
TINY_PER_CATEGORY = {
    "train_good": TINY["n_train_good"],
    "test_good": TINY["n_test_good"],
    "anomaly": TINY["n_test_per_defect"] * len(CATEGORIES[TINY_CATEGORIES[0]]),
}
