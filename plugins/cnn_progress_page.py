"""HTML of the progress page: the list of runs, and one run's datasets, shards and throughput chart.

Used by ``cnn_progress_plugin.py`` (it holds no plugin itself: Airflow's
plugin loader imports it as the plain module it is). Server-rendered, no
JavaScript and nothing fetched from outside: the page reloads itself while the
run is in progress. Every shard row carries its numbers as ``data-*``
attributes too, so tests and scripts can read them.
"""

from __future__ import annotations

import html
import math
import time
from urllib.parse import quote

from cnn_features.progress_report import (
    QUIET_AFTER_S,
    RunProgress,
    RunSummary,
    ShardProgress,
    device_text,
    format_duration,
    gpu_text,
    history_text,
    rate_text,
    state_text,
)

# Seconds between reloads of a page whose run is still going.
REFRESH_S = 5
# Line colours of the throughput chart, one per shard in plan order (cycling after ten).
SHARD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
# Size of the throughput chart in CSS pixels.
CHART_W, CHART_H = 760, 260
CHART_PAD_L, CHART_PAD_B, CHART_PAD_T, CHART_PAD_R = 56, 40, 30, 16
PLOT_TITLES = {
    "pca.png": "Features, first two principal components, by emotion",
    "throughput.png": "Throughput per shard",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2rem; color: #1b1f23; }
h1 { font-size: 1.35rem; margin: 0 0 .4rem; } h2 { font-size: 1.1rem; margin: 1.4rem 0 .4rem; }
.summary { display: flex; gap: 1.6rem; flex-wrap: wrap; margin: .6rem 0 1rem; }
.summary div { min-width: 7rem; } .summary b { display: block; font-size: 1.25rem; }
table { border-collapse: collapse; width: 100%; max-width: 68rem; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e1e4e8; vertical-align: top; }
th { font-weight: 600; background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { display: inline-block; padding: .05rem .5rem; border-radius: .7rem; font-size: .85rem; color: #fff; }
.state-success { background: #2e7d32; } .state-running { background: #1565c0; } .state-failed { background: #c62828; }
.state-pending { background: #757575; } .state-quiet { background: #ef6c00; } .state-verifying { background: #6a1b9a; }
.state-retrying { background: #b26a00; } .history { color: #444; font-size: .85rem; }
.bar { width: 9rem; height: .7rem; background: #e1e4e8; border-radius: .35rem; overflow: hidden; display: inline-block; }
.bar span { display: block; height: 100%; background: #1565c0; }
.error { color: #c62828; font-size: .85rem; } .muted { color: #6a737d; font-size: .9rem; }
.plots { display: flex; gap: 1rem; flex-wrap: wrap; } .plots figure { margin: 0; } .plots img { max-width: 36rem; border: 1px solid #e1e4e8; }
svg text { font-size: 11px; fill: #444; }
.legend { display: flex; flex-wrap: wrap; gap: .3rem 1rem; max-width: 48rem; font-size: .85rem; margin: .2rem 0 0 3.5rem; }
.legend i { display: inline-block; width: .8rem; height: .25rem; margin-right: .3rem; vertical-align: middle; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def run_href(run_id: str) -> str:
    """Return the page of a run, relative to the app's root."""
    return f"runs/{quote(run_id, safe='')}"


def _document(title: str, body: str, *, refresh: bool, base: str) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>{meta}'
        f'<base href="{_e(base)}"><style>{_CSS}</style></head>'
        f"<body>{body}</body></html>\n"
    )


def render_run_list(runs: list[RunSummary], *, base: str, root: str) -> str:
    """Return the page listing every run that has progress records, newest first."""
    rows = "".join(
        f'<tr data-run-id="{_e(r.run_id)}" data-state="{_e(r.state)}"><td><a href="{_e(run_href(r.run_id))}">{_e(r.run_id)}</a>'
        f"{f'<div class=error>{_e(r.error)}</div>' if r.error else ''}</td>"
        f"<td>{_state_badge(r.state)}</td>"
        f'<td>{_e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)))}</td>'
        f'<td class="num">{r.shards}</td><td class="num">{r.files}</td></tr>'
        for r in runs
    )
    table = (
        "<table><thead><tr><th>DAG run</th><th>state</th><th>planned</th><th>shards</th><th>files</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if runs
        else f'<p class="muted">No runs yet: trigger <code>cnn_feature_extraction</code>. Records are read from {_e(root)}.</p>'
    )
    body = f"<h1>CNN feature extraction: progress</h1>{table}"
    return _document("CNN feature progress", body, refresh=False, base=base)


def _state_badge(state: str, text: str | None = None) -> str:
    return f'<span class="state state-{_e(state)}">{_e(text or state)}</span>'


def _shard_state(shard: ShardProgress, now: float) -> str:
    if shard.state == "running" and shard.updated is not None and now - shard.updated > QUIET_AFTER_S:
        return "quiet"
    return shard.state


def _shard_row(shard: ShardProgress, now: float) -> str:
    state = _shard_state(shard, now)
    share = 100.0 * shard.done / shard.total if shard.total else 100.0
    updated = f"{format_duration(now - shard.updated)} ago" if shard.updated is not None else "-"
    tries = f' <span class="muted">(run {shard.attempts}×)</span>' if shard.attempts > 1 else ""
    label = "last error: " if shard.state == "retrying" else ""
    error = f'<div class="error">{label}{_e(shard.error)}</div>' if shard.error else ""
    history = history_text(shard)
    history_html = f'<div class="history">tries: {_e(history)}</div>' if history else ""
    return (
        f'<tr class="shard" data-shard-id="{_e(shard.shard_id)}" data-label="{_e(shard.label)}" '
        f'data-dataset="{_e(shard.dataset)}" data-state="{_e(shard.state)}" data-done="{shard.done}" '
        f'data-total="{shard.total}" data-device="{_e(shard.device or "")}" '
        f'data-fallback-reason="{_e(shard.fallback_reason or "")}" data-files-per-s="{shard.files_per_s}" '
        f'data-extracted="{shard.extracted}" data-skipped="{shard.skipped}" data-bad="{shard.bad}" '
        f'data-try="{shard.try_number or ""}" data-max-tries="{shard.max_tries or ""}" data-history="{_e(history)}">'
        f"<td>{_e(shard.label)}{tries}{error}{history_html}</td>"
        f'<td class="shard-state">{_state_badge(state, state_text(shard, now=now) if state == "retrying" else None)}</td>'
        f'<td class="num files">{shard.done} / {shard.total}</td>'
        f'<td><span class="bar"><span style="width:{share:.1f}%"></span></span></td>'
        f'<td class="num skipped">{shard.skipped}</td>'
        f'<td class="num bad">{shard.bad}</td>'
        f'<td class="device">{_e(device_text(shard))}</td>'
        f'<td class="num rate">{_e(rate_text(shard))}</td>'
        f'<td class="num">{_e(format_duration(shard.eta_s))}</td>'
        f'<td class="muted">{_e(updated)}</td></tr>'
    )


def nice_ceiling(value: float) -> float:
    """Return the smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def throughput_svg(run: RunProgress) -> str:
    """Return an SVG line chart of each shard's files/s over the run's time, each line labelled with its shard."""
    samples = run.samples
    if not samples:
        return '<p class="muted">No throughput yet: the chart starts with the first shard\'s first batch.</p>'
    labels = {s.shard_id: s.label for s in run.shards}
    colours = {s.shard_id: SHARD_COLOURS[i % len(SHARD_COLOURS)] for i, s in enumerate(run.shards)}
    t_max = max(s.t for s in samples) or 1.0
    r_max = nice_ceiling(max(s.files_per_s for s in samples))
    plot_w = CHART_W - CHART_PAD_L - CHART_PAD_R
    plot_h = CHART_H - CHART_PAD_T - CHART_PAD_B

    def x(t: float) -> float:
        return CHART_PAD_L + plot_w * t / t_max

    def y(rate: float) -> float:
        return CHART_PAD_T + plot_h * (1 - rate / r_max)

    parts = [
        f'<svg id="throughput-chart" width="{CHART_W}" height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" '
        'role="img" aria-label="files per second over time, per shard">',
        f'<rect x="{CHART_PAD_L}" y="{CHART_PAD_T}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" stroke="#d1d5da"/>',
    ]
    for i in range(5):
        rate = r_max * i / 4
        t = t_max * i / 4
        parts.append(f'<text x="{CHART_PAD_L - 6}" y="{y(rate) + 4:.1f}" text-anchor="end">{rate:g}</text>')
        parts.append(f'<text x="{x(t):.1f}" y="{CHART_H - CHART_PAD_B + 16}" text-anchor="middle">{format_duration(t)}</text>')
    parts.append(f'<text x="{CHART_PAD_L + plot_w / 2}" y="{CHART_H - 6}" text-anchor="middle">time since the first record</text>')
    parts.append(f'<text x="14" y="{CHART_PAD_T + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {CHART_PAD_T + plot_h / 2})">files/s</text>')
    by_shard: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        by_shard.setdefault(s.shard_id, []).append((s.t, s.files_per_s))
    for shard_id, points in by_shard.items():
        colour = colours.get(shard_id, "#444")
        label = labels.get(shard_id, shard_id)
        coords = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in points)
        parts.append(f'<polyline class="series" data-shard-id="{_e(shard_id)}" points="{coords}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"><title>{_e(label)}</title></polyline>')
        parts.extend(f'<circle cx="{x(t):.1f}" cy="{y(r):.1f}" r="2.5" fill="{colour}"/>' for t, r in points)
    parts.append("</svg>")
    legend = "".join(
        f'<span><i style="background:{colours[sid]}"></i>{_e(labels[sid])}</span>' for sid in labels if sid in by_shard
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _gpu_line(run: RunProgress) -> str:
    """Return the probe's finding above the shards: usable and the device, or the error and how to fix it."""
    usable = "unknown" if run.probe is None else ("yes" if run.probe.get("usable") else "no")
    fix = run.probe.get("fix") if run.probe else None
    css = "error" if usable == "no" and fix else "muted"
    line = f'<p class="{css}" id="run-gpu" data-usable="{usable}">{_e(gpu_text(run.probe))}</p>'
    if fix:
        line += f'<p class="error" id="run-gpu-fix">Fix: <code>{_e(fix)}</code></p>'
    return line


def render_run(run: RunProgress, *, base: str, now: float | None = None, dag_id: str | None = None) -> str:
    """Return the progress page of one run."""
    now = time.time() if now is None else now
    age = f"{format_duration(now - run.updated)} ago" if run.updated is not None else "no records yet"
    summary = (
        '<div class="summary">'
        f'<div>state<b id="run-state" data-state="{_e(run.state)}">{_state_badge(run.state)}</b></div>'
        f'<div>files done<b id="run-files" data-done="{run.done}" data-total="{run.total}">{run.done} / {run.total}</b></div>'
        f'<div>extracted<b id="run-extracted">{run.extracted}</b></div>'
        f'<div>skipped<b id="run-skipped">{run.skipped}</b></div>'
        f'<div>bad inputs<b id="run-bad" data-bad="{run.bad}">{run.bad}</b></div>'
        f'<div>ignored<b id="run-ignored" data-ignored="{run.ignored}">{run.ignored}</b></div>'
        f'<div>verification<b id="run-verification" data-verification="{_e(run.verification)}">{_e(run.verification)}</b></div>'
        f'<div title="files extracted per second in which some shard was working; retry waits and queueing are not counted">'
        f'files/s while working<b id="run-rate" data-busy-s="{run.busy_s}">{run.files_per_s:.1f}</b></div>'
        f'<div>ETA<b id="run-eta">{_e(format_duration(run.eta_s))}</b></div>'
        f'<div>last record<b>{_e(age)}</b></div>'
        "</div>"
    )
    summary += (
        f'<p class="muted" id="run-rate-note">files/s: files extracted per second in which some shard was working '
        f"({_e(format_duration(run.busy_s))} so far); retry waits and time spent queued are not counted.</p>"
    )
    if run.error:
        summary += f'<p class="error" id="run-error">{_e(run.error)}</p>'
    if run.note:
        summary += f'<p class="muted" id="run-note">{_e(run.note)}</p>'
    summary += _gpu_line(run)
    sections = []
    for dataset in run.datasets:
        rows = "".join(_shard_row(shard, now) for shard in dataset.shards)
        sections.append(
            f'<h2 class="dataset" data-dataset="{_e(dataset.name)}" data-done="{dataset.done}" data-total="{dataset.total}">'
            f"{_e(dataset.name)}: {dataset.done} / {dataset.total} files, {dataset.bad} bad, {dataset.ignored} ignored "
            f"{_state_badge(dataset.state)}</h2>"
            "<table><thead><tr><th>shard</th><th>state</th><th>files</th><th></th><th>skipped</th><th>bad</th><th>device</th>"
            "<th>files/s</th><th>ETA</th><th>last record</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    if run.plots:
        figures = "".join(
            f'<figure><a class="plot" href="{_e(run_href(run.run_id))}/plots/{_e(p.name)}">'
            f'<img src="{_e(run_href(run.run_id))}/plots/{_e(p.name)}" alt="{_e(PLOT_TITLES.get(p.name, p.name))}"></a>'
            f"<figcaption>{_e(PLOT_TITLES.get(p.name, p.name))}</figcaption></figure>"
            for p in run.plots
        )
        plots = f'<div class="plots">{figures}</div>'
    else:
        plots = '<p class="muted">The plots appear here once <code>verify_features</code> has run.</p>'
    note = ""
    if dag_id and dag_id != "cnn_feature_extraction":
        note = f'<p class="muted">{_e(dag_id)} writes no progress records; this is the extraction run of the same id.</p>'
    refreshing = run.state in ("running", "pending", "verifying", "retrying")
    body = (
        f'<p class="muted"><a href="./">all runs</a></p><h1>Run <span id="run-id">{_e(run.run_id)}</span></h1>{note}'
        f"{summary}{''.join(sections)}"
        f"<h2>Throughput over time</h2>{throughput_svg(run)}"
        f"<h2>Plots</h2>{plots}"
        f'<p class="muted">From the progress records in {_e(run.folder)}'
        f"{f'; reloads every {REFRESH_S} s while the run is in progress' if refreshing else ''}.</p>"
    )
    return _document(f"Progress of {run.run_id}", body, refresh=refreshing, base=base)


def render_missing(run_id: str, message: str, *, base: str, dag_id: str | None = None) -> str:
    """Return the page for a run without progress records (yet)."""
    hint = ""
    if dag_id and dag_id != "cnn_feature_extraction":
        hint = f"<p>Only <code>cnn_feature_extraction</code> runs write progress records, not <code>{_e(dag_id)}</code>.</p>"
    body = (
        f'<p class="muted"><a href="./">all runs</a></p><h1>Run {_e(run_id)}</h1>'
        f"<p>{_e(message)}</p>{hint}<p class=\"muted\">This page reloads every {REFRESH_S} s.</p>"
    )
    return _document(f"Progress of {run_id}", body, refresh=True, base=base)
