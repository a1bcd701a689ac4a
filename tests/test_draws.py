"""Batched random draws: one generator per image group and core on CPU, seeded from one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from vpt_robust.corruptions import corrupt
from vpt_robust.corruptions.draws import CPU_DRAW_VALUES, draw_groups, rand, randn

CPU = torch.device("cpu")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_groups_cover_the_batch_in_whole_images() -> None:
    per = CPU_DRAW_VALUES // (3 * 64 * 64)
    groups = draw_groups(2 * per + 1, 3 * 64 * 64)
    assert groups == [(0, per), (per, 2 * per), (2 * per, 2 * per + 1)]
    assert draw_groups(3, CPU_DRAW_VALUES * 4) == [(0, 1), (1, 2), (2, 3)]  # big images: one each


@pytest.mark.usefixtures("restore_threads")
def test_draws_do_not_depend_on_the_thread_count() -> None:
    shape = (50, 3, 64, 64)  # three groups of up to 21 images
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(
            (
                rand(shape, torch.Generator().manual_seed(7), CPU),
                randn(shape, torch.Generator().manual_seed(7), CPU),
            )
        )
    for u, n in results[1:]:
        assert torch.equal(u, results[0][0]) and torch.equal(n, results[0][1])


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "snow", "fog", "elastic_transform"]
)
def test_random_corruptions_do_not_depend_on_the_thread_count(name: str) -> None:
    x = torch.rand(50, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 3 groups
    torch.set_num_threads(1)
    one = corrupt(x, name, 3, seed=11)
    torch.set_num_threads(3)
    assert torch.equal(one, corrupt(x, name, 3, seed=11))


def test_groups_draw_independent_streams_with_the_right_law() -> None:
    shape = (48, 3, 64, 64)
    per = draw_groups(shape[0], 3 * 64 * 64)[0][1]
    u = rand(shape, torch.Generator().manual_seed(3), CPU)
    n = randn(shape, torch.Generator().manual_seed(3), CPU)
    first, second = n[:per].flatten(), n[per : 2 * per].flatten()
    assert not torch.equal(first, second)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 0.01
    assert abs(float(n.mean())) < 0.01 and abs(float(n.std()) - 1.0) < 0.01
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.005
    # A whole group draws the same values whatever follows it in the batch.
    head = rand((per, 3, 64, 64), torch.Generator().manual_seed(3), CPU)
    assert torch.equal(head, u[:per])


def _draw_in_child(queue) -> None:  # noqa: ANN001 (a multiprocessing queue)
    # No OpenMP work here: libgomp itself hangs in a child forked after parallel regions
    # (DataLoader workers run with one thread for that reason); the draws use no OpenMP.
    draws = rand((50, 3, 64, 64), torch.Generator().manual_seed(5), CPU)
    queue.put(draws.numpy().astype("float64").sum())


@pytest.mark.usefixtures("restore_threads")
def test_a_forked_child_draws_with_its_own_threads() -> None:
    import multiprocessing

    torch.set_num_threads(2)
    expected = rand((50, 3, 64, 64), torch.Generator().manual_seed(5), CPU)  # starts the pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_draw_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung or failed drawing after the parent's pool"
    assert queue.get(timeout=5) == expected.numpy().astype("float64").sum()
