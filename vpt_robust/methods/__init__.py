"""How prompts are learned (and adapted). Among the modules:

- ``supervised.train_prompt``: the one trainer (mixed precision, parameter groups, cosine or
  constant schedule, exact resume). Its extension point is an objective
  ``(model, images, labels) -> (loss, logits, aux)`` (``objectives.py``): an inner attack
  (TeCoA), an auxiliary loss and masked logits (L2P) plug in there, not in a copy of the loop.
- ``optim``: optimisers, schedules, parameter groups, autocast dtypes.
- ``pretrain``: pretraining of the embedded tiny CLIP.

Submodules are imported on use (this package imports nothing), so that light callers such as
``stages/common.py`` importing ``optim`` stay light.
"""
