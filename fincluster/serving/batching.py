"""One-token session steps of concurrent sessions, run as one batch by the compute worker.

The service queues every one-token step of a session with a static cache as a batchable job keyed
by its span (:class:`~fincluster.serving.scheduler.ComputeQueue`); the worker hands the items it
took together to :func:`step_batch_runner`, which decodes them, runs them through
:meth:`~fincluster.serving.runner.BlockRunner.step_batch` and finishes each (encoding, digests,
receipt) on its own, so one session's refusal or failure is that session's alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fincluster.serving.runner import BlockRunner
from fincluster.serving.scheduler import BatchRunner
from fincluster.serving.sessions import Session
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.codec import SpanInputs, inputs_from_wire


@dataclass(frozen=True)
class StepItem:
    """One queued step: its session, its inputs as received, and what to make of its output."""

    session: Session
    inputs: pb.SpanInputs
    finish: Callable[[torch.Tensor], Any]


def step_batch_runner(runner: BlockRunner) -> BatchRunner:
    def run(items: Sequence[StepItem]) -> list[tuple[BaseException | None, Any]]:
        results: list[tuple[BaseException | None, Any]] = [(None, None)] * len(items)
        steps: list[tuple[Session, SpanInputs]] = []
        indexes: list[int] = []
        for index, item in enumerate(items):
            try:
                steps.append((item.session, inputs_from_wire(item.inputs)))
                indexes.append(index)
            except Exception as error:
                results[index] = (error, None)
        for index, output in zip(indexes, runner.step_batch(steps), strict=True):
            if isinstance(output, BaseException):
                results[index] = (output, None)
                continue
            try:
                results[index] = (None, items[index].finish(output))
            except Exception as error:
                results[index] = (error, None)
        return results

    return run
