"""Pictures of a verified run: a PCA map of the features by emotion, and each shard's throughput.

Written by the verification task into the run's progress folder
(``progress/<run folder>/plots/``), where the progress page links them.
matplotlib is imported inside the functions that draw, with the Agg backend
(no display), and only figures made here are touched: no pyplot state.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cnn_features.config import Settings
from cnn_features.errors import StoreError, StoreMissing
from cnn_features.s3 import S3Access
from cnn_features.storage import save_with
from cnn_features.stores import Store, open_store, read_features
from cnn_features.verify import MANIFEST_NAME

log = logging.getLogger(__name__)

# Points per dataset in the PCA map: enough to see the clusters, few enough to
# read and draw in a second or two even for the full CREMA-D (7,442 clips).
MAX_POINTS = 3000
# One colour per emotion, the same in every picture (tab10 order).
EMOTION_COLOURS = {
    "neutral": "#7f7f7f",
    "calm": "#17becf",
    "happy": "#ff7f0e",
    "sad": "#1f77b4",
    "angry": "#d62728",
    "fearful": "#9467bd",
    "disgust": "#2ca02c",
    "surprised": "#e377c2",
}
# Bar colours of the throughput chart, by the device that ran the shard.
DEVICE_COLOURS = {"gpu": "#2ca02c", "cpu": "#1f77b4"}
# Resolution of the saved pictures: sharp on a laptop screen, ~100 kB each.
DPI = 110


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components.

    Returns:
        The (n, 2) projection and the share of variance each component explains.
        Signs are fixed (largest loading positive) so a picture is the same on
        every run.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        msg = f"PCA needs a 2-D array of at least 2 rows, got shape {x.shape}"
        raise ValueError(msg)
    centred = x - x.mean(axis=0)
    # The eigenvectors of the (d, d) scatter matrix are the principal axes:
    # ~6x faster than an SVD of the (n, d) rows for n = 3,000, d = 256.
    variance, vectors = np.linalg.eigh(centred.T @ centred)
    variance, components = np.clip(variance[::-1], 0.0, None), vectors[:, ::-1][:, :2].T
    if components.shape[0] < 2:
        components = np.vstack([components, np.zeros_like(components)])
    largest = components[np.arange(len(components)), np.argmax(np.abs(components), axis=1)]
    components = components * np.where(largest < 0, -1.0, 1.0)[:, None]
    total = variance.sum()
    explained = variance[:2] / total if total > 0 else np.zeros(2)
    return centred @ components.T, np.pad(explained, (0, 2 - len(explained)))


def load_features(output: Store | Path, *, limit: int = MAX_POINTS) -> tuple[np.ndarray, list[str]]:
    """Load up to ``limit`` verified features of a dataset and their emotions, from its manifest.

    A larger manifest is subsampled by a hash of each file name, so the same
    files are drawn every time.
    """
    output = open_store(output) if isinstance(output, Path) else output
    manifest = json.loads(output.read(MANIFEST_NAME))
    items: list[dict[str, Any]] = manifest.get("items", [])
    if len(items) > limit:
        items = sorted(items, key=lambda item: zlib.crc32(item["feature"].encode()))[:limit]
    feature_dim = int(manifest.get("feature_dim", 0))
    emotion_of = {item["feature"]: str(item["emotion"]) for item in items}
    vectors, emotions = [], []
    for rel, vector in read_features(output, emotion_of, feature_dim=feature_dim):
        vectors.append(vector)
        emotions.append(emotion_of[rel])
    if not vectors:
        return np.zeros((0, feature_dim), dtype=np.float32), []
    return np.stack(vectors), emotions


def _save(fig: Any, path: Path) -> Path:
    """Save a figure as PNG through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def plot_pca(datasets: dict[str, tuple[np.ndarray, list[str]]], path: Path) -> Path:
    """Draw one PCA scatter per dataset, points coloured by emotion; save it as ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted(datasets)
    fig = Figure(figsize=(5.5 * max(len(names), 1), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        features, emotions = datasets[name]
        if len(features) < 2:
            ax.text(0.5, 0.5, "not enough verified features", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name)
            continue
        points, explained = pca_2d(features)
        for emotion in sorted(set(emotions), key=lambda e: list(EMOTION_COLOURS).index(e) if e in EMOTION_COLOURS else 99):
            mask = np.array([e == emotion for e in emotions])
            ax.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.75, label=f"{emotion} ({mask.sum()})",
                       color=EMOTION_COLOURS.get(emotion, "#000000"), edgecolors="none")
        ax.set_title(f"{name}: {len(features)} clips")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
        ax.legend(fontsize="small", markerscale=1.5, loc="best")
    fig.suptitle("CNN features, first two principal components, coloured by emotion")
    return _save(fig, path)


def plot_throughput(results: list[dict[str, Any]], path: Path) -> Path:
    """Draw files/s per shard, coloured by device, hatched where the GPU fell back to CPU; save as ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ordered = sorted(results, key=lambda r: (r.get("dataset", ""), r.get("shard_id", "")))
    fig = Figure(figsize=(max(6.0, 0.7 * len(ordered) + 2.5), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [str(r.get("label") or r.get("shard_id")) for r in ordered]
    rates = [float(r.get("files_per_s") or 0.0) for r in ordered]
    bars = ax.bar(
        range(len(ordered)),
        rates,
        color=[DEVICE_COLOURS.get(str(r.get("device")), "#7f7f7f") for r in ordered],
    )
    for bar, result in zip(bars, ordered, strict=True):
        if result.get("fallback_reason"):
            bar.set_hatch("//")
        note = f"{result.get('extracted', 0)} new"
        if result.get("skipped_existing"):
            note += f"\n{result['skipped_existing']} kept"
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize="x-small", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(ordered)), labels, rotation=45, ha="right")
    ax.set_ylabel("files extracted per second")
    ax.set_title("Throughput per shard")
    ax.set_ylim(0, max([*rates, 1.0]) * 1.25)
    ax.legend(
        handles=[Patch(color=c, label=d.upper()) for d, c in DEVICE_COLOURS.items()]
        + [Patch(facecolor="white", edgecolor="black", hatch="//", label="CPU after GPU failure")],
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    return _save(fig, path)


def write_run_plots(
    folder: Path,
    shards: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> list[Path]:
    """Write ``pca.png`` and ``throughput.png`` for a verified run into ``folder``; return what was written.

    Features are read from each dataset's output, local or S3; the plots go
    to the local progress folder the progress page serves. A picture that
    cannot be drawn is logged and skipped: plots never fail a run.
    """
    outputs = {shard["dataset"]: open_store(shard["output"], settings, access=access) for shard in shards}
    written: list[Path] = []
    try:
        datasets = {}
        for name, output in outputs.items():
            try:
                datasets[name] = load_features(output)
            except StoreMissing:  # verification wrote no manifest there
                continue
        written.append(plot_pca(datasets, folder / "pca.png"))
    except (OSError, ValueError, StoreError) as exc:
        log.warning("PCA plot not written to %s: %s", folder, exc)
    try:
        written.append(plot_throughput(results, folder / "throughput.png"))
    except (OSError, ValueError) as exc:
        log.warning("throughput plot not written to %s: %s", folder, exc)
    for path in written:
        log.info("plot: %s", path)
    return written
