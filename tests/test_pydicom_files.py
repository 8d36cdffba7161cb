"""Every file pydicom ships for its own tests: odd encodings, shared UIDs, DICOMDIR trees, damage.

No count is asserted (it changes with pydicom releases); what must hold is that every file gets a
verdict, nothing stored differs from its source by a byte, and the store checks clean.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import pydicom.data
import pytest

from dicomfs.store.check import check_store
from dicomfs.store.store import Store

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_pydicom_files_each_get_a_verdict_and_read_back_exactly(open_store: Callable[..., Store], codec: str) -> None:
    files = [p for p in PYDICOM_FILES.rglob("*") if p.is_file()]
    store = open_store(codec=codec)
    results = list(store.ingest([PYDICOM_FILES]))
    assert len(results) == len([p for p in files if not p.name.startswith("._")])
    statuses = Counter(r.status for r in results)
    assert statuses["stored"] > 50
    assert all(r.reason for r in results if r.status in ("rejected", "skipped"))
    for result in results:
        if result.status == "stored":
            with store.open_instance(result.ids[3]) as reader:  # type: ignore[index]
                assert b"".join(reader.iter_chunks()) == Path(result.path).read_bytes(), result.path
    assert check_store(store).clean
