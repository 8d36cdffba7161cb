"""Index.release_pages: the index pages a pass has read stop counting in the process' RSS."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomfs.samples import write_corpus
from dicomfs.store.store import Store


def _mapped_kib(data_file: Path) -> int:
    """Resident KiB of this process' mappings of ``data_file`` (from /proc/self/smaps)."""
    target, total, inside = os.path.realpath(data_file), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
                inside = len(fields) == 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_release_pages_unmaps_what_a_pass_read_again_and_again(open_store: Callable[..., Store], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", patients=10, studies_per_patient=2, series_per_study=2,
                          instances_per_series=50, pixels=8, seed=5)
    store = open_store()
    list(store.ingest([corpus.root]))
    index, data_file = store.index, store.index.folder / "data.mdb"
    assert data_file.stat().st_size > 1_000_000
    for attempt in range(3):  # the map's address is found once and used again: each call must work
        with index.read() as txn:
            records = sum(1 for _ in index.all_records(txn))
            links = sum(index.link_counts(txn).values())
        read = _mapped_kib(data_file)
        index.release_pages()
        released = _mapped_kib(data_file)
        assert records == links == corpus.instances + 10 + 20 + 40
        assert read > 256 and released < read / 4, (attempt, read, released)
