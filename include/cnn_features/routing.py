"""Where a run's extraction shards go: to GPU workers when live ones serve the GPU queue, else to CPU workers.

A task's queue and pool are fixed when the DAG is parsed, so the DAG has two
mapped extraction tasks: ``extract_shard`` on the default queue and
``extract_shard_gpu`` on the GPU queue and pool. Once per run, before any
shard starts, ``choose_route`` asks the broker which queues have live
workers; the shards all go to the GPU task when the GPU queue has one, and
all to the CPU task otherwise, so no shard waits for a worker that does not
exist. A run with ``device=cpu`` never uses the GPU queue: its shards go to
the CPU workers without asking the broker. The broker's answer is awaited
``timeout_s`` at most: no answer means no GPU worker, and the reason is
logged and recorded.

Nothing here imports Airflow or Celery: the DAG passes in the function that
asks the broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Seconds to wait for the broker's list of live workers and their queues: a
# worker answers a broadcast within milliseconds, and a dead broker must not
# hold a run longer than this.
LIVE_QUEUES_TIMEOUT_S = 10.0

LiveQueues = Callable[[], Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class Route:
    """Where a run's shards go, and why."""

    gpu: bool
    reason: str
    workers: tuple[str, ...] = ()  # the live workers serving the GPU queue


def _ask(live_queues: LiveQueues, *, timeout_s: float) -> Mapping[str, Sequence[str]] | str:
    """Return the workers' queues, or a reason why there is no answer, waiting ``timeout_s`` at most."""
    answer: list[Mapping[str, Sequence[str]] | str] = []

    def call() -> None:
        try:
            answer.append(dict(live_queues()))
        except (OSError, RuntimeError, ValueError) as exc:  # a broker error of any kind: no live worker known
            answer.append(f"the broker did not answer ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=call, name="live-queues", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        return f"the broker did not answer within {timeout_s:.0f} s"
    return answer[0]


def choose_route(
    *, device: str, gpu_queue: str, live_queues: LiveQueues, timeout_s: float = LIVE_QUEUES_TIMEOUT_S
) -> Route:
    """Send the shards to the GPU queue when the run may use a GPU and a live worker serves it; else to the default queue.

    Args:
        device: the run's ``device`` param (``auto``, ``gpu`` or ``cpu``); ``cpu`` never routes to the GPU queue.
        gpu_queue: the deployment's GPU queue (``Settings.gpu_queue``); empty when it has none.
        live_queues: returns each live worker's name with the queues it consumes.
        timeout_s: how long to wait for ``live_queues``.
    """
    if device == "cpu":
        # The GPU host's worker would run them one at a time on its CPU while the CPU workers idle.
        return Route(gpu=False, reason="device=cpu requested; shards run on CPU workers")
    if not gpu_queue:
        return Route(gpu=False, reason="the deployment has no GPU queue (CNN_FEATURES_GPU_QUEUE is empty)")
    answer = _ask(live_queues, timeout_s=timeout_s)
    if isinstance(answer, str):
        return Route(gpu=False, reason=f"{answer}; shards run on CPU workers")
    serving = tuple(sorted(worker for worker, queues in answer.items() if gpu_queue in queues))
    if not serving:
        live = ", ".join(sorted(answer)) or "none"
        return Route(gpu=False, reason=f"no live worker serves queue {gpu_queue!r} (live workers: {live}); shards run on CPU workers")
    return Route(gpu=True, reason=f"queue {gpu_queue!r} is served by {', '.join(serving)}", workers=serving)


def remaining(shards: Sequence[dict[str, Any]], taken: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the shards (in plan order) whose ``shard_id`` is not among ``taken``."""
    ids = {shard["shard_id"] for shard in taken}
    return [shard for shard in shards if shard["shard_id"] not in ids]


def shard_device(requested: str, *, on_gpu_queue: bool) -> str:
    """Return the device a shard asks for: ``gpu`` for ``auto`` on a GPU worker, else as requested.

    The run's GPU probe may have run on a CPU worker, so on the GPU queue
    ``auto`` means "try the GPU"; a GPU that fails still falls back to CPU
    (``runner.run_shard``), with the reason in the shard's result.
    """
    if on_gpu_queue and requested == "auto":
        return "gpu"
    return requested
