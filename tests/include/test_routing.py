"""Shard routing: which queue a run's shards go to, from the workers the broker reports live.

The broker's answer is given as a plain function here; the live Celery
tests (tests/e2e/test_celery_stack.py) ask a real Redis with real workers.
"""

from __future__ import annotations

import threading
import time

import pytest

from cnn_features.routing import choose_route, remaining, shard_device


def test_no_gpu_queue_means_cpu_without_asking_the_broker() -> None:
    """A deployment without a GPU queue routes to CPU and never calls the broker."""

    def never() -> dict[str, list[str]]:
        raise AssertionError("the broker was asked")

    route = choose_route(device="auto", gpu_queue="", live_queues=never)
    assert not route.gpu
    assert "CNN_FEATURES_GPU_QUEUE" in route.reason


def test_a_live_worker_on_the_gpu_queue_takes_the_shards() -> None:
    """When a live worker consumes the GPU queue, the route is GPU and names that worker."""
    route = choose_route(device="auto", gpu_queue="gpu", live_queues=lambda: {"cpu@a": ["default"], "gpu@b": ["default", "gpu"]})
    assert route.gpu
    assert route.workers == ("gpu@b",)


def test_without_a_gpu_worker_shards_go_to_cpu_workers_and_the_reason_names_the_live_ones() -> None:
    """Only CPU workers live: the route is CPU, and its reason lists the workers that are."""
    route = choose_route(device="auto", gpu_queue="gpu", live_queues=lambda: {"cpu@a": ["default"]})
    assert not route.gpu
    assert "cpu@a" in route.reason and "'gpu'" in route.reason


def test_a_broker_error_means_cpu() -> None:
    """A broker that refuses the connection routes to CPU, with the error in the reason."""

    def refused() -> dict[str, list[str]]:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    route = choose_route(device="auto", gpu_queue="gpu", live_queues=refused)
    assert not route.gpu
    assert "Connection refused" in route.reason


def test_a_silent_broker_means_cpu_within_the_timeout() -> None:
    """A broker that never answers costs the timeout, not the run: the route is CPU after it."""
    release = threading.Event()

    def hangs() -> dict[str, list[str]]:
        release.wait(30)
        return {"gpu@b": ["gpu"]}

    started = time.monotonic()
    try:
        route = choose_route(device="auto", gpu_queue="gpu", live_queues=hangs, timeout_s=0.5)
    finally:
        release.set()
    assert not route.gpu
    assert "within" in route.reason
    assert time.monotonic() - started < 5


def test_device_cpu_sends_no_shard_to_the_gpu_queue_even_with_a_live_gpu_worker() -> None:
    """A run with device=cpu routes every shard to the CPU workers, though a GPU worker is live, without asking the broker."""

    def never() -> dict[str, list[str]]:
        raise AssertionError("the broker was asked")

    route = choose_route(device="cpu", gpu_queue="gpu", live_queues=never)
    assert not route.gpu
    assert route.workers == ()
    assert "device=cpu" in route.reason


@pytest.mark.parametrize("device", ["auto", "gpu"])
def test_device_auto_and_gpu_use_a_live_gpu_worker(device: str) -> None:
    """With device=auto or device=gpu, a live worker on the GPU queue still takes the shards."""
    route = choose_route(device=device, gpu_queue="gpu", live_queues=lambda: {"cpu@a": ["default"], "gpu@b": ["gpu"]})
    assert route.gpu
    assert route.workers == ("gpu@b",)


def test_remaining_keeps_plan_order_and_drops_taken_shards() -> None:
    """The CPU task gets exactly the shards the GPU task did not take, in plan order."""
    shards = [{"shard_id": f"s-{i}"} for i in range(4)]
    assert remaining(shards, [shards[1], shards[3]]) == [shards[0], shards[2]]
    assert remaining(shards, []) == shards
    assert remaining(shards, shards) == []


@pytest.mark.parametrize(
    ("requested", "on_gpu_queue", "expected"),
    [("auto", True, "gpu"), ("auto", False, "auto"), ("cpu", True, "cpu"), ("gpu", False, "gpu")],
)
def test_shard_device(requested: str, on_gpu_queue: bool, expected: str) -> None:
    """On the GPU queue 'auto' tries the GPU (the probe may have run elsewhere); 'cpu' and 'gpu' are kept."""
    assert shard_device(requested, on_gpu_queue=on_gpu_queue) == expected
