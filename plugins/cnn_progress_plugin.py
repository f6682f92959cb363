"""Airflow plugin: the CNN feature progress page, in the Airflow UI.

Adds a FastAPI app to the API server at ``/cnn-progress`` and two UI entries
that embed it:

* *CNN feature progress* in the *Browse* menu: every run with progress records;
* a *Feature progress* tab on each DAG run's page: that run's datasets and
  shards, files done / total, device and fallback reason, files/s, ETA, a
  throughput chart and the verification plots.

Routes (relative to ``/cnn-progress``)::

    /                           the runs that have progress records, newest first
    /runs/{run_id}              one run (HTML, from ``cnn_progress_page``)
    /runs/{run_id}/plots/{png}  a plot written by verify_features
    /api/runs, /api/runs/{id}   the same as JSON

The numbers come from the progress records the shards write as they run
(``cnn_features.progress_report`` reads them), never from logs. Every route
needs a logged-in Airflow user allowed to read runs of
``cnn_feature_extraction``: the UI's session cookie (the page is embedded in
the UI) or an ``Authorization: Bearer`` token from ``POST /auth/token``; a
browser without a session is sent to the login page. Airflow's API modules
are imported inside the request handlers, so loading the plugin stays cheap
in every Airflow process that loads plugins (task processes included).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import cnn_progress_page
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from airflow.plugins_manager import AirflowPlugin
from cnn_features.config import load_settings
from cnn_features.progress_report import PLOT_NAMES, PLOTS_DIR, ProgressNotFound, find_run, list_runs, load_run, to_dict

URL_PREFIX = "/cnn-progress"
log = logging.getLogger(__name__)

DAG_ID = "cnn_feature_extraction"


async def require_reader(request: Request) -> None:
    """Let the request through if Airflow's own ``requires_access_dag`` lets its user read runs of the extraction DAG.

    The user comes from Airflow's ``get_user``, as on the API's own routes:
    a ``Bearer`` token first, else the user that Airflow's
    ``JWTRefreshMiddleware`` refreshed from the UI session (a session the
    auth manager refreshes gets the page and a new cookie, not a 401), else
    the session cookie. ``requires_access_dag`` asks the auth manager with the
    DAG's team. Airflow's API modules are imported here, on the first
    request, not when the plugin loads.

    Raises:
        HTTPException: 401 without a valid token or session, 403 when the user may not read runs.
    """
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    user = await get_user(request, _oauth_token=None, bearer_credentials=await bearer_scheme(request))
    await run_in_threadpool(_reader_check(), request, user)  # it reads the DAG's team from the metadata DB


@functools.cache
def _reader_check() -> Callable[[Request, Any], None]:
    """Return Airflow's ``requires_access_dag`` check for reading runs of the extraction DAG."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)


def dag_runs() -> dict[str, tuple[str, float]]:
    """Return the extraction DAG's runs as {run_id: (state, created Unix time)} from Airflow's metadata DB.

    Empty (logged) when the database cannot be read: the page then shows what
    the progress records alone say.
    """
    try:
        from sqlalchemy import select
        from sqlalchemy.exc import SQLAlchemyError

        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
    except ImportError as exc:
        log.warning("DAG run states unavailable: %s", exc)
        return {}
    try:
        with create_session() as session:
            rows = session.execute(
                select(DagRun.run_id, DagRun.state, DagRun.run_after).where(DagRun.dag_id == DAG_ID)
            ).all()
    except SQLAlchemyError as exc:
        log.warning("DAG run states of %s unreadable: %s", DAG_ID, exc)
        return {}
    return {str(run_id): (str(state), after.timestamp() if after else 0.0) for run_id, state, after in rows}


def _load(run_id: str) -> Any:
    """Return one run's progress with its DAG run's state."""
    state = dag_runs().get(run_id, (None, 0.0))[0]
    return load_run(find_run(load_settings().progress_root, run_id), dag_state=state)


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/"


def create_app() -> FastAPI:
    """Return the progress app (routes above)."""
    app = FastAPI(title="CNN feature progress", description=__doc__, dependencies=[Depends(require_reader)])

    @app.exception_handler(HTTPException)
    async def login_redirect(request: Request, exc: HTTPException) -> Response:
        """Send a browser without a session to the login page; answer anything else with the error."""
        wants_html = "text/html" in request.headers.get("accept", "") and not request.url.path.startswith(
            f"{request.scope.get('root_path', '')}/api/"
        )
        if exc.status_code == 401 and wants_html:
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request) -> str:
        """List the runs that have progress records."""
        root = load_settings().progress_root
        return cnn_progress_page.render_run_list(list_runs(root, dag_runs=dag_runs()), base=_base(request), root=str(root))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str, dag_id: str | None = None) -> HTMLResponse:
        """Show one run's progress."""
        try:
            run = _load(run_id)
        except ProgressNotFound as exc:
            html = cnn_progress_page.render_missing(run_id, str(exc), base=_base(request), dag_id=dag_id)
            return HTMLResponse(html, status_code=404)
        return HTMLResponse(cnn_progress_page.render_run(run, base=_base(request), dag_id=dag_id))

    @app.get("/runs/{run_id}/plots/{name}")
    def run_plot(run_id: str, name: str) -> FileResponse:
        """Serve one of the run's plots (only the names verification writes)."""
        if name not in PLOT_NAMES:
            raise HTTPException(status_code=404, detail=f"no plot {name!r}; plots are {', '.join(PLOT_NAMES)}")
        try:
            path = find_run(load_settings().progress_root, run_id) / PLOTS_DIR / name
        except ProgressNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"{name} not written yet for run {run_id}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def runs_json() -> list[dict[str, Any]]:
        """List the runs that have progress records, newest first."""
        return [
            {"run_id": r.run_id, "state": r.state, "error": r.error, "created": r.created, "shards": r.shards,
             "files": r.files, "page": f"runs/{quote(r.run_id, safe='')}"}
            for r in list_runs(load_settings().progress_root, dag_runs=dag_runs())
        ]

    @app.get("/api/runs/{run_id}")
    def run_json(run_id: str) -> dict[str, Any]:
        """Return one run's progress."""
        try:
            return to_dict(_load(run_id))
        except ProgressNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    return app


class CnnProgressPlugin(AirflowPlugin):
    """Progress page of cnn_feature_extraction runs."""

    name = "cnn_progress"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "CNN feature progress"}]
    external_views = [
        {
            "name": "CNN feature progress",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "cnn-progress",
        },
        {
            "name": "Feature progress",
            "href": f"{URL_PREFIX}/runs/{{RUN_ID}}?dag_id={{DAG_ID}}",
            "destination": "dag_run",
            "url_route": "cnn-progress-run",
        },
    ]
