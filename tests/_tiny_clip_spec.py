"""A very small tiny-CLIP architecture shared by the tests that need a fast, untrained model."""

SMALL = dict(
    width=32,
    depth=2,
    heads=2,
    stem_channels=(8, 16),
    embed_dim=32,
    text_width=32,
    text_layers=1,
    text_heads=2,
)
