"""A user's whole journey through the Airflow UI in headless Chromium (Playwright), one DAG run from trigger to success.

Log in on the login page; trigger ``cnn_feature_extraction`` from its trigger
form, first with a relative input path (refused by the Param's JSON schema),
then with the demo corpus while one actor's feature folder refuses writes;
watch that shard retry and fail on the progress page; repair the folder,
clear the failed mapped instance from its page in the UI; see the run, and
only that shard, complete. Clicks go through the UI; the REST API is only
asked when to look.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import read_only
from tests.e2e.live import DAG_ID, TRAINING_DAG_ID, LiveAirflow, wait_for

pytestmark = pytest.mark.e2e

# Debian's Chromium: Playwright's own browser download is not available here.
CHROMIUM = Path("/usr/bin/chromium")
# Files per shard: the demo corpus's 180 RAVDESS clips (12 actors x 15) make 3 shards of 4 actors each.
SHARD_SIZE = 60
DATASET = "ravdess"
# A dataset path the Param's schema refuses: neither absolute nor s3://.
RELATIVE_INPUT = "demo/ravdess"
# Seconds a UI element gets to show what is awaited: the page reloads every 5 s and the machine is shared.
UI_TIMEOUT_MS = 60_000
# Seconds to wait for a shard to reach a state: its tries run one after another, 30 s apart.
SHARD_TIMEOUT_S = 600.0
# Seconds between REST looks while a shard waits for its retry (a 30 s window to catch).
TI_POLL_S = 1.0
# Tries an extract_shard instance gets: the first and its two retries.
MAX_TRIES = 3
CLEAR_BUTTON = '[aria-label="Press shift+c to clear"]'


def shards_of(files: list[str], size: int) -> list[list[str]]:
    """Cut a sorted file list into shards of ``size``, as the plan does."""
    return [files[i : i + size] for i in range(0, len(files), size)]


def actor_only_in_last_shard(corpus: Path, size: int) -> tuple[str, int]:
    """Return a RAVDESS actor whose clips all lie in the last shard, and the number of shards."""
    files = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.npy"))
    shards = shards_of(files, size)
    earlier = {f.split("/", 1)[0] for shard in shards[:-1] for f in shard}
    actor = next(a for a in sorted({f.split("/", 1)[0] for f in shards[-1]}) if a not in earlier)
    return actor, len(shards)


def run_count(live: LiveAirflow) -> int:
    """Return how many runs the extraction DAG has."""
    return int(live.api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 1})["total_entries"])


def shard_tries(live: LiveAirflow, run_id: str) -> dict[int, int]:
    """Return each extract_shard instance's try number by its map index."""
    return {t["map_index"]: t["try_number"] for t in live.api.task_instances(DAG_ID, run_id) if t["task_id"] == "extract_shard"}


def shard_map_index(live: LiveAirflow, run_id: str, label: str) -> int:
    """Return the map index of the shard named ``label``: its place in the list extract_shard is expanded over.

    The instance's rendered name cannot tell: it reads the bare map index
    until a try runs, and again while the instance waits for its retry.
    """
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/route_cpu_shards/xcomEntries/return_value"

    def refs() -> list[dict[str, Any]] | None:
        resp = live.api.request("GET", path, params={"deserialize": True})
        if resp.status_code != 200:
            return None
        value = resp.json()["value"]
        return json.loads(value) if isinstance(value, str) else value

    shards = wait_for(refs, timeout_s=SHARD_TIMEOUT_S, what=f"the shards of {run_id}", interval_s=TI_POLL_S)
    return next(i for i, ref in enumerate(shards) if ref["label"] == label)


def wait_shard(live: LiveAirflow, run_id: str, map_index: int, state: str, *, unexpected: frozenset[str]) -> dict[str, Any]:
    """Poll the run's task instances until extract_shard's instance ``map_index`` is in ``state``; return it.

    Raises:
        AssertionError: it reached one of the ``unexpected`` states first.
    """

    def check() -> dict[str, Any] | None:
        ti = next((t for t in live.api.task_instances(DAG_ID, run_id)
                   if t["task_id"] == "extract_shard" and t["map_index"] == map_index), None)
        if ti is None:
            return None
        assert ti["state"] not in unexpected, f"shard {map_index} became {ti['state']} while awaiting {state}"
        return ti if ti["state"] == state else None

    return wait_for(check, timeout_s=SHARD_TIMEOUT_S, what=f"shard {map_index} to be {state}", interval_s=TI_POLL_S)


def paste_json(page: Any, editor: Any, value: object) -> None:
    """Replace a Monaco editor's text by pasting ``value`` as JSON, as a user pastes from the clipboard.

    Typed text (or ``keyboard.insert_text``) gets Monaco's auto-closed quotes
    and brackets; a paste goes in as it is.
    """
    text = json.dumps(value, indent=2)
    editor.locator(".view-lines").click()
    page.keyboard.press("ControlOrMeta+A")
    page.evaluate("text => navigator.clipboard.writeText(text)", text)
    page.keyboard.press("ControlOrMeta+V")
    wait_for(lambda: json.loads(editor.locator(".view-lines").inner_text().replace("\xa0", " ")) == value or None,
             timeout_s=30, what="the pasted JSON in the editor", interval_s=0.2)


def trigger_post(page: Any) -> Any:
    """Return an ``expect_response`` context for the form's POST of a new run."""
    return page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith(f"/dags/{DAG_ID}/dagRuns"),
                                timeout=UI_TIMEOUT_MS)


def open_progress(page: Any, live: LiveAirflow, run_id: str, label: str) -> Any:
    """Open the run's progress page; return the shard's row."""
    page.goto(f"{live.stack.url}/cnn-progress/runs/{quote(run_id, safe='')}")
    return page.locator(f'tr.shard[data-label="{label}"]')


@pytest.fixture
def browser_page(live_airflow: LiveAirflow, artifacts: Path) -> Iterator[Any]:
    """A fresh Playwright page in Debian's headless Chromium that may paste; the browser always closes."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} absent: install Debian's chromium package")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_airflow.stack.url)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            try:
                yield page
            except BaseException:
                page.screenshot(path=str(artifacts / "journey-failure.png"), full_page=True)
                raise
        finally:
            browser.close()


def test_user_triggers_watches_a_shard_fail_clears_it_and_the_run_succeeds(
    live_airflow: LiveAirflow, browser_page: Any, artifacts: Path
) -> None:
    """In the UI: a relative path is refused at Trigger; a shard that cannot write retries, fails, is cleared after repair, and alone re-runs to success."""
    from playwright.sync_api import expect

    live, page = live_airflow, browser_page
    url = live.stack.url
    broken_actor, n_shards = actor_only_in_last_shard(live.corpus / DATASET, SHARD_SIZE)
    label = f"{DATASET} {n_shards}/{n_shards}"
    output = live.home / "features" / "journey" / DATASET
    good = {DATASET: {"input": str(live.corpus / DATASET), "output": str(output)}}
    bad = {DATASET: {"input": RELATIVE_INPUT, "output": str(output)}}

    histories: dict[str, str] = {}  # the shard row's try history, failed and after its re-run
    with live.dag_paused(TRAINING_DAG_ID):
        # 1. Log in on the login page the DAG page sends us to.
        page.goto(f"{url}/dags/{DAG_ID}")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(live.stack.admin_password())
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/dags/{DAG_ID}")

        # 2. Trigger: a relative input path is refused, and no run is made.
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Run Parameters")
        editor = dialog.locator("#element_datasets .monaco-editor")
        runs_before = run_count(live)
        paste_json(page, editor, bad)
        submit = dialog.get_by_test_id("trigger-dag-submit")
        with trigger_post(page) as refused:
            submit.click()
        assert refused.value.status == 400
        alert = dialog.get_by_test_id("error-alert")
        expect(alert).to_contain_text("Invalid input for param datasets")
        expect(alert).to_contain_text(f"'{RELATIVE_INPUT}' does not match")
        alert.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "journey-1-refused.png"))
        assert run_count(live) == runs_before

        # The good value, 60 files per shard, while one actor of the last shard cannot be written.
        paste_json(page, editor, good)
        shard_size = dialog.get_by_role("spinbutton", name="Shard size")
        shard_size.fill(str(SHARD_SIZE))
        expect(shard_size).to_have_value(str(SHARD_SIZE))
        with read_only(output / broken_actor):
            with trigger_post(page) as accepted:
                submit.click()
            assert accepted.value.status == 200, accepted.value.text()
            run_id = accepted.value.json()["dag_run_id"]
            run = live.api.run(DAG_ID, run_id)
            assert run["conf"]["datasets"] == good and run["conf"]["shard_size"] == SHARD_SIZE
            assert run_count(live) == runs_before + 1

            # 3. The shard's first try fails: the progress page says it will retry.
            map_index = shard_map_index(live, run_id, label)
            retrying = wait_shard(live, run_id, map_index, "up_for_retry", unexpected=frozenset({"failed", "success"}))
            row = open_progress(page, live, run_id, label)
            expect(row).to_have_attribute("data-state", "retrying")
            expect(row).to_contain_text(f"retrying (try {retrying['try_number'] + 1} of {MAX_TRIES}")
            expect(row).to_contain_text("last error:")
            expect(row).to_contain_text("cannot write features")
            expect(page.locator("#run-state")).not_to_have_attribute("data-state", "failed")
            page.screenshot(path=str(artifacts / "journey-2-retrying.png"), full_page=True)

            # 4. All tries used: the shard is failed, its history counts the tries.
            failed = wait_shard(live, run_id, map_index, "failed", unexpected=frozenset({"success"}))
            assert failed["try_number"] == MAX_TRIES
            files = live.shard_files(run_id)
            assert {sid for sid, fs in files.items() if any(f.startswith(f"{broken_actor}/") for f in fs)} == \
                {f"{DATASET}-{n_shards:04d}"}
            row = open_progress(page, live, run_id, label)
            expect(row).to_have_attribute("data-state", "failed")
            expect(row).to_contain_text("tries: failed")
            histories["failed"] = row.get_attribute("data-history") or ""
            page.screenshot(path=str(artifacts / "journey-3-failed.png"), full_page=True)
        tries_before = shard_tries(live, run_id)

        # 5. Repaired (the folder takes writes again): clear that one mapped instance from its page.
        page.goto(f"{url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/extract_shard/mapped/{map_index}")
        page.locator(CLEAR_BUTTON).click()
        clear = page.get_by_role("dialog").filter(has_text="Clear Task Instance")
        # Downstream is preselected (its only sign is its shade): the shard, verification and training are affected.
        expect(clear).to_contain_text("Affected Tasks: 3")
        for task in ("extract_shard", "verify_features", "trigger_training"):
            expect(clear.get_by_role("row").filter(has_text=task)).to_have_count(1)
        page.screenshot(path=str(artifacts / "journey-4-clear.png"))
        clear.get_by_role("button", name="Confirm").click()
        expect(clear).to_be_hidden()

        # 6. Only that shard re-ran, and the run succeeded.
        done = live.api.wait_run(DAG_ID, run_id)
        assert done["state"] == "success"
        tries_after = shard_tries(live, run_id)
        assert tries_after == {**tries_before, map_index: MAX_TRIES + 1}
        assert all(t == 1 for i, t in tries_after.items() if i != map_index)
        row = open_progress(page, live, run_id, label)
        expect(page.locator("#run-state")).to_have_attribute("data-state", "success")
        expect(row).to_have_attribute("data-state", "success")
        histories["success"] = row.get_attribute("data-history") or ""
        expect(page.locator("#run-rate-note")).to_be_visible()
        page.screenshot(path=str(artifacts / "journey-5-success.png"), full_page=True)

    # Checked last, so that a wrong history line does not hide how the rest of the journey went:
    # the three tries that failed for the same reason are counted together.
    assert histories["failed"].startswith(f"failed ×{MAX_TRIES}: "), f"history once failed: {histories['failed']}"
    assert histories["success"].startswith(f"failed ×{MAX_TRIES}: "), f"history after the re-run: {histories['success']}"
    assert histories["success"].endswith(f"; succeeded on try {MAX_TRIES + 1}"), f"history after the re-run: {histories['success']}"

