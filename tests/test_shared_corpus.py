"""Independent cross-check: the team's shared corpus and its manifest of exact expected counts.

It runs only where ``../shared/corpus`` sits beside the checkout (the team's machines and CI);
a user's clone skips it and says why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from dicomfs.store.check import check_store
from dicomfs.store.store import Store


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_shared_corpus_counts_match_the_manifest(open_store: Callable[..., Store], shared_corpus: Path, codec: str) -> None:
    manifest = json.loads((shared_corpus / "manifest.json").read_text())
    expected = manifest["expected"]
    store = open_store(codec=codec)
    folders = [shared_corpus / group for group in manifest["groups"]]
    results = list(store.ingest(folders))
    stats = store.stats()
    assert stats.patients == expected["patients"]
    assert stats.studies == expected["studies"]
    assert stats.series == expected["series"]
    assert stats.instances == expected["unique_sop_instances"]
    by_path = {str(Path(r.path).relative_to(shared_corpus)): r for r in results}
    for entry in manifest["files"]:
        result = by_path[entry["path"]]
        if entry["kind"] == "invalid":
            assert result.status == "rejected" and result.reason, entry["path"]
        elif entry["kind"] == "dicomdir":
            assert result.status == "skipped"
        else:
            assert result.status in ("stored", "already_stored"), (entry["path"], result.reason)
    for result in results:
        if result.status == "stored":
            with store.open_instance(result.ids[3]) as reader:  # type: ignore[index]
                assert b"".join(reader.iter_chunks()) == Path(result.path).read_bytes()
    assert check_store(store).clean


def test_shared_corpus_zip_gives_the_same_counts(open_store: Callable[..., Store], shared_corpus: Path) -> None:
    manifest = json.loads((shared_corpus / "manifest.json").read_text())
    store = open_store()
    statuses = Counter(r.status for r in store.ingest([shared_corpus.with_suffix(".zip")]))
    assert store.stats().instances == manifest["expected"]["unique_sop_instances"]
    assert statuses["rejected"] == manifest["expected"]["invalid_files"] + 1  # + manifest.json itself
