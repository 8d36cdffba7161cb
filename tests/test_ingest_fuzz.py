"""A seeded, bounded fuzz of ingest: a few hundred damaged files beside good ones, all at once.

The damaged files are made from the project's own samples (``dicomfs.samples``) with a fixed seed:
bytes flipped, files cut, lengths rewritten to lie, VR codes corrupted, elements duplicated, values
made huge; and the hand-made nasties of ``test_hostile_ingest`` besides. Whatever ingest does with
each, it must say so: every file stored (and then pydicom, reading the stored copy, sees the
identifiers it was indexed under) or rejected with a reason; the good files all stored; no
traceback, no hang, and ``dicomfs check`` clean.
"""

from __future__ import annotations

import io
import json
import random
import struct
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from dicomfs.samples import write_corpus
from dicomfs.store.candidates import ALREADY_STORED, REJECTED, REPLACED, STORED
from dicomfs.store.records import Instance, Patient, Series, Study
from dicomfs.store.sources import iter_sources
from dicomfs.store.store import Store
from tests.conftest import run_cli
from tests.test_hostile_ingest import bad_files, instance_bytes, nested_sequences, with_before_pixels

pytestmark = pytest.mark.timeout(120)

SEED = 2222
MUTANTS_PER_SEED = 22
KEPT_TAGS = [(0x0008, 0x0016), (0x0008, 0x0018), (0x0008, 0x0060), (0x0010, 0x0010), (0x0010, 0x0020),
             (0x0020, 0x000D), (0x0020, 0x000E), (0x0020, 0x0013), (0x0028, 0x0010), (0x0008, 0x0005)]
"""Elements whose headers the mutations aim at (the ones the index reads), besides random bytes."""
ODD_VRS = [b"ZZ", b"ab", b"\x00\x01", b"SQ", b"UN", b"OB", b"UT", b"A\x01", b"QQ", b"  "]


def element_offsets(data: bytes) -> list[int]:
    """Where the headers of the aimed-at elements start (their tag bytes found after the preamble)."""
    found = []
    for group, element in KEPT_TAGS:
        at = data.find(struct.pack("<HH", group, element), 132)
        if at >= 0:
            found.append(at)
    return found or [132]


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy of ``data``: (what was done, the bytes)."""
    kind = rng.choice(["flip", "flip", "cut", "length", "vr", "duplicate", "huge", "meta-length"])
    out = bytearray(data)
    header_end = min(len(data), data.find(b"\xe0\x7f\x10\x00") + 12 if b"\xe0\x7f\x10\x00" in data else len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(128, header_end) if rng.random() < 0.85 else rng.randrange(len(data))
            out[at] ^= 1 << rng.randrange(8)
    elif kind == "cut":
        return kind, data[:rng.randrange(1, len(data))]
    elif kind == "length":
        at = rng.choice(element_offsets(data))
        lie = rng.choice([0, 1, 3, 0xFFFF, 0x7FFF, rng.randrange(0x10000)])
        if bytes(out[at + 4:at + 6]).isalpha():
            struct.pack_into("<H", out, at + 6, lie)
        else:
            struct.pack_into("<I", out, at + 4, rng.choice([lie, 0xFFFFFFFF, 0x7FFFFFFF]))
    elif kind == "vr":
        at = rng.choice(element_offsets(data))
        out[at + 4:at + 6] = rng.choice(ODD_VRS)
    elif kind == "duplicate":
        at = rng.choice(element_offsets(data))
        length = struct.unpack_from("<H", data, at + 6)[0] if data[at + 4:at + 6].isalpha() else struct.unpack_from("<I", data, at + 4)[0]
        element = data[at:at + 8 + length]
        where = rng.choice([at + 8 + length, header_end - 12 if header_end < len(data) else len(data)])
        if rng.random() < 0.5:  # the copy with another value of the same length
            element = element[:8] + bytes(rng.choice(b"0123456789.") for _ in range(length))
        if rng.random() < 0.3:  # behind an item delimiter: pydicom stops reading there
            element = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + element
        return kind, bytes(out[:where]) + element + bytes(out[where:])
    elif kind == "huge":
        at = rng.choice(element_offsets(data))
        value = b"9" * rng.choice([65_534, 4_000, 70])
        if data[at + 4:at + 6].isalpha():
            length = struct.unpack_from("<H", data, at + 6)[0]
            return kind, data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length:]
        length = struct.unpack_from("<I", data, at + 4)[0]
        return kind, data[:at + 4] + struct.pack("<I", len(value)) + value + data[at + 8 + length:]
    else:  # the file meta group length lies
        struct.pack_into("<I", out, 140, rng.choice([0, 2, 10_000, 0xFFFFFFFF, struct.unpack_from("<I", data, 140)[0] + 8]))
    return kind, bytes(out)


def fuzz_folder(folder: Path, seed_folder: Path) -> tuple[set[str], int]:
    """Write the good files, the mutants and the nasties into ``folder``: (good names, file count)."""
    corpus = write_corpus(seed_folder, patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=2,
                          tricky=True, seed=SEED)
    seeds = [f.path.read_bytes() for f in corpus.valid_files]
    seeds.append(with_before_pixels(instance_bytes(seed_folder, 950), nested_sequences(3)))
    seeds.append(with_before_pixels(instance_bytes(seed_folder, 951, implicit=True), nested_sequences(3, implicit=True)))
    folder.mkdir(parents=True)
    rng = random.Random(SEED)
    count = 0
    for number, data in enumerate(seeds):
        for mutant in range(MUTANTS_PER_SEED):
            kind, content = mutate(data, rng)
            (folder / f"mutant-{number:02d}-{mutant:02d}-{kind}.dcm").write_bytes(content)
            count += 1
    for name, (content, _) in bad_files(seed_folder).items():
        (folder / f"nasty-{name}").write_bytes(content)
        count += 1
    odd = instance_bytes(seed_folder, 952)
    at = odd.index(b"\x10\x00\x10\x00PN")
    length = struct.unpack_from("<H", odd, at + 6)[0]
    (folder / "nasty-odd-length-name.dcm").write_bytes(odd[:at + 6] + struct.pack("<H", 5) + b"ODD^N" + odd[at + 8 + length:])
    good = set()
    for number in range(1, 21):
        name = f"good-{number:02d}.dcm"
        (folder / name).write_bytes(instance_bytes(seed_folder, 100 + number))
        good.add(name)
    return good, count + 1 + len(good)


def text(value: object) -> str:
    """What pydicom read, as the index writes it: multiple values joined by backslashes."""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def test_ingest_fuzz_every_file_is_stored_as_pydicom_reads_it_or_rejected_with_a_reason(tmp_path: Path) -> None:
    good, count = fuzz_folder(tmp_path / "in", tmp_path / "seeds")
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    started = time.monotonic()
    done = run_cli("ingest", "--json", str(tmp_path / "in"), store=store, timeout=90)
    elapsed = time.monotonic() - started
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, done.stderr[-2000:]  # some files are rejected
    assert elapsed < 60, elapsed
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == count
    by_name = {Path(r["path"]).name: r for r in results}
    for name in good:
        assert by_name[name]["status"] == STORED, by_name[name]
    statuses = {STORED: 0, ALREADY_STORED: 0, REPLACED: 0, REJECTED: 0}
    with Store(store, readonly=True) as opened:
        for result in results:
            statuses[result["status"]] += 1
            if result["status"] == REJECTED:
                assert result["reason"] and "Traceback" not in result["reason"], result
                continue
            assert result["status"] in (STORED, ALREADY_STORED, REPLACED), result
            instance = opened.get(result["instance"])
            series, study, patient = opened.get(result["series"]), opened.get(result["study"]), opened.get(result["patient"])
            assert isinstance(instance, Instance) and isinstance(series, Series)
            assert isinstance(study, Study) and isinstance(patient, Patient)
            with opened.open_instance(instance.id) as reader, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's remarks on values it reads all the same (".1.2", "01.2")
                read = pydicom.dcmread(io.BytesIO(reader.read(0, instance.size)), stop_before_pixels=True, force=True)
                seen = tuple(text(read.get(k)) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"))
            indexed = (instance.sop_uid, series.series_uid, study.study_uid, patient.patient_id)
            assert seen == indexed, (result["path"], seen, indexed)
    assert statuses[REJECTED] >= len(bad_files(tmp_path / "seeds")), statuses  # the nasties at least
    assert statuses[STORED] > len(good), statuses  # and some damage is harmless
    checked = run_cli("check", store=store)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The committer thread (what uploads go through) judges every file as the worker processes did.
    with Store.create(tmp_path / "in-process") as in_process:
        again = {r.path: (r.status, r.reason) for r in in_process.ingest_sources(iter_sources([tmp_path / "in"]), in_process=True)}
    assert again == {r["path"]: (r["status"], r["reason"]) for r in results}
