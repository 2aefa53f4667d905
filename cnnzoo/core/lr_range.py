"""The loop of a learning-rate range test (``Backend.lr_range_test``, task=lr_find), written
once: a backend supplies its batches and one training step; the application
(``cnnzoo.app.lr_find``) chooses the rates, the stop rule and what the losses mean."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence


def consecutive_batches(batches, set_epoch: Callable[[int], None]) -> Iterator:
    """Epoch 0's batches of an input pipeline, then epoch 1's (each epoch in its own order),
    and so on without end. ``batches`` is iterated again after ``set_epoch(epoch)``; a pipeline
    with no batches yields nothing (instead of looping for ever)."""
    if len(batches) == 0:
        return
    for epoch in itertools.count():
        set_epoch(epoch)
        yield from batches


def range_test(rates: Sequence[float], batches: Iterable, step: Callable[[float, object], float],
               stop: Callable[[list[float]], bool]) -> list[float]:
    """``step(rates[i], batch i)`` for each rate, in order; returns the losses it returned (host
    floats), ending after the step for which ``stop(losses so far)`` is true."""
    losses: list[float] = []
    for rate, batch in zip(rates, batches):  # rates first: no batch is drawn after the last
        losses.append(float(step(rate, batch)))
        if stop(losses):
            break
    return losses
