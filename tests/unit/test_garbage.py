"""The first batch run of a process hides what exists from the collector; later runs leave their objects to it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from flows import garbage


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a process that has run no batch yet; everything unfrozen again afterwards."""
    gc.unfreeze()
    monkeypatch.setattr(garbage, "_done", False)
    yield
    gc.unfreeze()


def test_the_first_call_freezes_what_exists_and_a_second_freezes_nothing_more(fresh_process: None) -> None:
    assert gc.get_freeze_count() == 0
    garbage.freeze_the_furniture()
    frozen = gc.get_freeze_count()
    assert frozen > 1000  # the interpreter, pytest and Prefect's modules at least

    made_by_a_batch = [[str(i)] for i in range(5000)]
    garbage.freeze_the_furniture()
    # The batch's objects stay collectable: none joins the frozen (some frozen may have been freed meanwhile).
    assert gc.get_freeze_count() <= frozen
    del made_by_a_batch
