"""pyautoattack's AutoAttack with fewer iterations, queries and target classes (its loop and
attacks unchanged), for tests that compare runs of it or only need it to run: the full budget
costs minutes per test on a shared 2-core machine."""

from __future__ import annotations

import pytest
from pyautoattack import AutoAttack


class ShortAutoAttack(AutoAttack):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.apgd.n_iter = self.apgd_targeted.n_iter = self.fab.n_iter = 10
        self.apgd_targeted.n_target_classes = self.fab.n_target_classes = 2
        self.square.n_queries = 100


@pytest.fixture
def short_autoattack(monkeypatch: pytest.MonkeyPatch) -> type[ShortAutoAttack]:
    """Make `vpt_robust.attacks.autoattack` build ShortAutoAttack for the test's duration."""
    import pyautoattack

    monkeypatch.setattr(pyautoattack, "AutoAttack", ShortAutoAttack)
    return ShortAutoAttack
