"""Data sets: the embedded default (rendered shapes, no download) and its on-disk format."""

from vpt_robust.data.embedded import (
    CLASS_NAMES,
    HELDOUT_STYLES,
    PRETRAIN_STYLES,
    STYLE_NAMES,
    EmbeddedData,
    EmbeddedDataError,
    load_embedded,
    materialize,
    train_test_split,
)

__all__ = [
    "CLASS_NAMES",
    "HELDOUT_STYLES",
    "PRETRAIN_STYLES",
    "STYLE_NAMES",
    "EmbeddedData",
    "EmbeddedDataError",
    "load_embedded",
    "materialize",
    "train_test_split",
]
