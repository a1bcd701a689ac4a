"""The 15 common corruptions of Hendrycks & Dietterich as batched tensor ops, and CTTA streams.

`corrupt(images, name, severity, seed=...)` works on (B, 3, H, W) float batches in [0, 1] on any
device; `CORRUPTIONS` lists the names in the standard order; `CorruptionStream` builds the
continual / gradual / mixed / reset-each-shift / random-order test streams.
"""

from vpt_robust.corruptions.registry import check_images, corrupt, make_generator
from vpt_robust.corruptions.streams import (
    PROTOCOLS,
    CorruptionSource,
    CorruptionStream,
    GeneratedSource,
    Segment,
    StreamBatch,
)
from vpt_robust.corruptions.tables import CORRUPTIONS, PARAMS, TABLE_NAMES, select_table

__all__ = [
    "CORRUPTIONS",
    "PARAMS",
    "PROTOCOLS",
    "TABLE_NAMES",
    "CorruptionSource",
    "CorruptionStream",
    "GeneratedSource",
    "Segment",
    "StreamBatch",
    "check_images",
    "corrupt",
    "make_generator",
    "select_table",
]
