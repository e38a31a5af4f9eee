"""What the shapes world holds, without torch: its classes, image size and data-set seeds.

Kept apart from :mod:`.data` so the demo's command line can check its arguments before torch loads.
"""

CLASSES = ("circle", "square", "triangle")
IMAGE_SIZE = 32

TRAINING_SEED = 0
HELD_OUT_SEED = 1
BENCHMARK_SEED = 2  # the quality benchmarks' sources: neither trained on nor used by the tests


def class_index(name: str) -> int:
    if name not in CLASSES:
        raise ValueError(f"class must be one of {CLASSES}, got {name!r}")
    return CLASSES.index(name)
