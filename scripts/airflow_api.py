"""A client of Airflow's REST API v2 for the tests and the benchmark: trigger, poll, clear, read logs.

Runs, task instances, clears and logs go through the official
``apache-airflow-client``; only what it does not cover (the grid view's
summaries, the progress page's routes, raw checks of status codes) is plain
HTTP with the same token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from airflow_client import client as af
from airflow_client.client.api.dag_run_api import DagRunApi
from airflow_client.client.api.task_instance_api import TaskInstanceApi
from local_services import ServiceError, wait_for

# Run states after which nothing more happens to a run.
FINISHED = frozenset({"success", "failed"})
# Seconds to wait for a whole extraction run on a busy 2-core machine (other
# engineers' CPU-heavy work runs beside it).
RUN_TIMEOUT_S = 600.0
# Seconds between polls of the REST API, as the grid view refreshes.
POLL_S = 2.0


class ApiError(RuntimeError):
    """The REST API answered with an error status."""


@dataclass
class AirflowApi:
    """A client of Airflow's REST API v2 with a token from ``POST /auth/token``."""

    base_url: str
    username: str
    password: str
    _token: str | None = field(default=None, repr=False)
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60.0), repr=False)
    _official: af.ApiClient | None = field(default=None, repr=False)

    def _api(self, kind: type[Any], *, refresh: bool = False) -> Any:
        """Return an ``apache-airflow-client`` API object of ``kind`` holding the current token."""
        token = self.token(refresh=refresh)
        if self._official is None or self._official.configuration.access_token != token:
            self._official = af.ApiClient(af.Configuration(host=self.base_url, access_token=token))
        return kind(self._official)

    def _typed(self, kind: type[Any], method: str, *args: Any, raw: bool = False, **kwargs: Any) -> Any:
        """Call ``kind().method(*args, **kwargs)`` with the official client; log in again once on a 401; return plain JSON data
        (the client's model with ``raw``).

        Raises:
            ApiError: any other error status; the message holds the body.
        """
        for attempt in range(2):
            try:
                got = getattr(self._api(kind, refresh=attempt > 0), method)(*args, **kwargs)
            except af.ApiException as exc:
                if exc.status == 401 and attempt == 0:
                    continue
                msg = f"{method}: {exc.status} {str(exc.body)[:2000]}"
                raise ApiError(msg) from None
            return got if raw or not hasattr(got, "model_dump") else got.model_dump(mode="json", by_alias=True)
        msg = f"{method}: still unauthorised after logging in again"
        raise ApiError(msg)

    def token(self, *, refresh: bool = False) -> str:
        """Return a JWT for the user, logging in on first use (or when asked to refresh)."""
        if self._token is None or refresh:
            resp = self._client.post(f"{self.base_url}/auth/token", json={"username": self.username, "password": self.password})
            if resp.status_code not in (200, 201):
                msg = f"POST /auth/token: {resp.status_code} {resp.text[:500]}"
                raise ApiError(msg)
            self._token = str(resp.json()["access_token"])
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request with the bearer token; log in again once if it expired."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self.token(refresh=attempt > 0)}", **kwargs.pop("headers", {})}
            resp = self._client.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
            if resp.status_code != 401:
                return resp
        return resp

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return its JSON body.

        Raises:
            ApiError: the status is not 2xx; the message holds the body.
        """
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 300:
            msg = f"{method} {path}: {resp.status_code} {resp.text[:2000]}"
            raise ApiError(msg)
        return resp.json() if resp.content else None

    def trigger(self, dag_id: str, conf: dict[str, Any], *, note: str | None = None) -> dict[str, Any]:
        """Trigger a run with ``conf`` as the UI's trigger form does (logical date now); return the run."""
        body = af.TriggerDAGRunPostBody(logical_date=datetime.now(UTC), conf=conf, note=note)
        return self._typed(DagRunApi, "trigger_dag_run", dag_id, body)

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return a DAG run."""
        return self._typed(DagRunApi, "get_dag_run", dag_id, run_id)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Return every task instance of a run, mapped ones included, with their rendered names."""
        return list(self._typed(TaskInstanceApi, "get_task_instances", dag_id, run_id, limit=1000)["task_instances"])

    def mapped(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """Return a mapped task's instances, as the grid lists them when its box is clicked."""
        return list(self._typed(TaskInstanceApi, "get_mapped_task_instances", dag_id, run_id, task_id, limit=1000)["task_instances"])

    def grid_summary(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return the grid view's per-task summary of a run (``/ui/grid/ti_summaries``, NDJSON)."""
        resp = self.request("GET", f"/ui/grid/ti_summaries/{dag_id}", params={"run_ids": run_id})
        if resp.status_code != 200:
            msg = f"grid summaries: {resp.status_code} {resp.text[:500]}"
            raise ApiError(msg)
        lines = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        return next(line for line in lines if line.get("run_id") == run_id)

    def clear(self, dag_id: str, run_id: str, task_ids: list[Any], *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Clear failed task instances (``[task_id, map_index]`` pairs, or task ids) of a run and their downstream."""
        body = af.ClearTaskInstancesBody(
            dag_run_id=run_id,
            task_ids=[af.ClearTaskInstancesBodyTaskIdsInner(t) for t in task_ids],
            include_downstream=True,
            only_failed=True,
            dry_run=dry_run,
        )
        return list(self._typed(TaskInstanceApi, "post_clear_task_instances", dag_id, body)["task_instances"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, *, map_index: int = -1) -> str:
        """Return a task try's log as text."""
        # Raw JSON: the client's log model drops each message's extra fields, the error details among them.
        got = self._typed(
            TaskInstanceApi, "get_log_without_preload_content", dag_id, run_id, task_id, try_number,
            raw=True, full_content=True, map_index=map_index, accept="application/json",
        )
        if got.status >= 300:
            msg = f"task log of {task_id} try {try_number}: {got.status} {got.data[:2000]!r}"
            raise ApiError(msg)
        content = json.loads(got.data).get("content", "")
        if not isinstance(content, list):
            return str(content)
        lines = []
        for item in content:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            lines.append(str(item.get("event", "")))
            lines.extend(f"{e.get('exc_type')}: {e.get('exc_value')}" for e in item.get("error_detail") or [])
        return "\n".join(lines)

    def wait_run(
        self,
        dag_id: str,
        run_id: str,
        states: set[str] | frozenset[str] = FINISHED,
        *,
        timeout_s: float = RUN_TIMEOUT_S,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a run until its state is one of ``states``; return it.

        Raises:
            ServiceError: it did not get there in time (the message has its task states).
        """

        def check() -> dict[str, Any] | None:
            run = self.run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run)
            return run if run["state"] in states else None

        try:
            return wait_for(check, timeout_s=timeout_s, what=f"{dag_id} run {run_id} to be {sorted(states)}", interval_s=POLL_S)
        except ServiceError as exc:
            tis = [(t["task_id"], t["map_index"], t["state"]) for t in self.task_instances(dag_id, run_id)]
            msg = f"{exc}; task instances: {tis}"
            raise ServiceError(msg) from None

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()
        if self._official is not None:
            self._official.rest_client.pool_manager.clear()
