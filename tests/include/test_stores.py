"""The local store on its own: parallel reads keep the caller's order and name bad files."""

from __future__ import annotations

from pathlib import Path

from cnn_features.errors import InvalidSpectrogram
from cnn_features.stores import LocalStore


def test_threaded_local_reads_keep_order_and_name_bad_files(tmp_path: Path) -> None:
    """With reader threads (as a GPU shard uses), files come back in order; a missing or oversized one is named, not raised."""
    store = LocalStore(tmp_path)
    items = []
    for i in range(200):
        store.write(f"d/{i:03d}.npy", bytes([i % 251]) * (i + 1))
        items.append((f"d/{i:03d}.npy", i + 1))
    items.insert(50, ("d/missing.npy", 0))
    got = list(store.read_many(items, max_bytes=150, threads=8))
    assert [rel for rel, _ in got] == [rel for rel, _ in items]
    for (rel, size), (_, data) in zip(items, got, strict=True):
        if rel == "d/missing.npy" or size > 150:
            assert isinstance(data, InvalidSpectrogram) and rel in str(data)
        else:
            assert data == bytes([int(rel[2:5]) % 251]) * size
    serial = list(store.read_many(items, max_bytes=150))
    assert [(rel, data if isinstance(data, bytes) else str(data)) for rel, data in serial] == [
        (rel, data if isinstance(data, bytes) else str(data)) for rel, data in got
    ]
