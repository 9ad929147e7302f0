"""FP32 reference outputs on held-out batches, computed once, and candidates judged against them.

Contract: :class:`ReferenceEvaluator` runs the FP32 model over ``holdout()`` once, keeps its outputs
(and a fingerprint of each input batch) and fixes the task: the one named, else the one
:func:`~service.accuracy.tasks.guess_task` reads from the first batch, so every candidate is judged by
the same metric. ``evaluate(candidate)`` replays the same batches through the candidate and returns
an :class:`~service.accuracy.outputs.AccuracyReport` with the task metric. Memory: the reference
outputs of the held-out set (keep it to tens of samples), plus one sample's activations: batches are
run one sample at a time where the model's batch axis allows it, so a 640x640 detector's session
arena holds one image's activations, not eight (measured: 2.5 GB peak with batches of 8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from service.accuracy.outputs import (
    AccuracyAccumulator,
    AccuracyReport,
    cpu_session_options,
    onnxruntime_session,
    run_session,
    simulation_session_options,
)
from service.accuracy.tasks import TaskSpec, guess_task
from service.errors import BadInput

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


class ReferenceEvaluator:
    """Scores candidate models against FP32 outputs computed once (see the module docstring)."""

    def __init__(
        self, reference: onnx.ModelProto | bytes, holdout: Batches, *, task: TaskSpec | None = None
    ) -> None:
        self._batches = holdout
        session = onnxruntime_session(reference, cpu_session_options())
        self.names = [o.name for o in session.get_outputs()]
        self._fingerprints: list[str] = []
        self._outputs: list[dict[str, np.ndarray]] = []
        self._splittable = not any(
            isinstance(dim, int) and dim > 1 for arg in session.get_inputs() for dim in arg.shape[:1]
        )
        for feeds in holdout():
            self._fingerprints.append(batch_fingerprint(feeds))
            self._outputs.append(self._run(session, feeds))
        if not self._outputs:
            raise BadInput(
                "the held-out data yielded no batches to judge accuracy on; give eval_set_id or more samples"
            )
        if task is None:
            self.task, reason = guess_task(self._outputs[0])
            self.task_reason = f"guessed: {reason}"
            self.task_guessed = True
        else:
            self.task, self.task_reason, self.task_guessed = task, "named on the request or the model", False

    def evaluate(self, candidate: onnx.ModelProto | bytes, *, simulate: bool = False) -> AccuracyReport:
        """The candidate's accuracy on the held-out batches (``simulate``: Q/DQ as float arithmetic)."""
        session = onnxruntime_session(
            candidate, simulation_session_options() if simulate else cpu_session_options()
        )
        accumulator = AccuracyAccumulator(
            self.task, task_reason=self.task_reason, task_guessed=self.task_guessed
        )
        count = 0
        for i, feeds in enumerate(self._batches()):
            if i >= len(self._outputs) or batch_fingerprint(feeds) != self._fingerprints[i]:
                raise BadInput(
                    "the held-out batches must yield the same batches on every call (their FP32 "
                    f"outputs are cached); batch {i} differs from the first pass"
                )
            accumulator.update(self._outputs[i], self._run(session, feeds))
            count += 1
        if count != len(self._outputs):
            raise BadInput(f"the held-out data yielded {count} batches, the first pass {len(self._outputs)}")
        return accumulator.finish()

    def _run(self, session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's outputs, computed one sample at a time where the batch axis allows it."""
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        size = next(iter(arrays.values())).shape[0] if arrays and next(iter(arrays.values())).ndim else 1
        if not self._splittable or size <= 1:
            return run_session(session, self.names, arrays)
        parts = [
            run_session(session, self.names, {name: a[i : i + 1] for name, a in arrays.items()})
            for i in range(size)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.names}


def batch_fingerprint(feeds: Mapping[str, np.ndarray]) -> str:
    """A digest of a batch's names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(feeds):
        array = np.ascontiguousarray(np.asarray(feeds[name]))
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
