"""Decompression bombs: a zip member or a deflated DICOM dataset that expands to gigabytes.

Each bomb is built here in a few MB (a deflate block of 1 MiB of zeros, repeated) and offered to
the real `dicomfs ingest`, or PUT into the uploads/ of a real `dicomfs webdav`. The bound on a
process's peak RSS is ``PEAK_RSS_BOUND``: with these bombs the CLI peaked at 52 MiB here, the
bridge at 38 MiB and its upload helper at 44 MiB; 300 MB leaves room for a loaded machine and is
a seventh of the smallest expansion (before the fix the CLI peaked at 4.1-6.2 GB, the upload
helper at 6.2 GB, a bridge receiving 1 GiB in a transfer at 2.1 GB).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

from dicomfs.store import Level, Store
from tests.conftest import dicomfs_command, run_cli, write_own_instance
from tests.test_transfers import PASSWORD, USER, new_store, patient_ids, peer_config, receiver_config
from tests.webdav_server import serve

PEAK_RSS_BOUND = 300 << 20
GIB = 1 << 30
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_ZEROS_BLOCK = (lambda c: c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH))(zlib.compressobj(9, zlib.DEFLATED, -15))
"""Raw deflate of 1 MiB of zeros, ending byte-aligned with no reference to what came before: so
it may be repeated, and ``n`` copies then a final empty block (b"\\x03\\x00") inflate to n MiB."""
_LAST_BLOCK = b"\x03\x00"


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if vr in ("OB", "OW", "SQ", "UN", "UT"):
        return struct.pack("<HH2s2xI", group, element, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _file_meta(syntax: str, sop: str) -> bytes:
    body = (_element(2, 1, "OB", b"\0\1") + _element(2, 2, "UI", CT_IMAGE.encode())
            + _element(2, 3, "UI", sop.encode()) + _element(2, 0x10, "UI", syntax.encode()))
    return b"\0" * 128 + b"DICM" + _element(2, 0, "UL", struct.pack("<I", len(body))) + body


def _dataset_start(sop: str) -> bytes:
    """An explicit VR little endian dataset up to its pixel data's value, for ``sop``."""
    study = "1.2.826.0.1.3680043.10.99.1"
    return b"".join([
        _element(8, 0x16, "UI", CT_IMAGE.encode()), _element(8, 0x18, "UI", sop.encode()),
        _element(8, 0x60, "CS", b"CT"), _element(0x10, 0x10, "PN", b"BOMB^TEST"), _element(0x10, 0x20, "LO", b"BOMB"),
        _element(0x20, 0x0D, "UI", study.encode()), _element(0x20, 0x0E, "UI", f"{study}.1".encode()),
    ])


def deflated_bomb(path: Path, mib: int, sop: str = "1.2.826.0.1.3680043.10.99.1.1.1", odd: bytes = b"") -> Path:
    """A deflated-syntax DICOM file whose dataset's pixel data is ``mib`` MiB of zeros (after
    ``odd``, raw element bytes put before the pixel data)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = _dataset_start(sop) + odd + struct.pack("<HH2s2xI", 0x7FE0, 0x10, b"OB", mib << 20)
    with path.open("wb") as out:
        out.write(_file_meta(DEFLATED, sop) + compressor.compress(start) + compressor.flush(zlib.Z_FULL_FLUSH))
        for _ in range(mib):
            out.write(_ZEROS_BLOCK)
        out.write(_LAST_BLOCK)
    return path


def zip_bomb(path: Path, mib: int, good: dict[str, bytes]) -> Path:
    """A zip holding ``good`` (name: content) and, unless ``mib`` is 0, ``bomb.dcm``: ``mib`` MiB
    of zeros deflated to a thousandth of that (written by hand: zipfile would spend seconds
    compressing the zeros)."""
    crc = 0
    zeros = bytes(1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    members = [(name, content, zlib.crc32(content), len(content), _deflate(content)) for name, content in good.items()]
    if mib:
        members.append(("bomb.dcm", None, crc, mib << 20, None))
    central = b""
    with path.open("wb") as out:
        for name, content, member_crc, size, packed in members:
            offset = out.tell()
            compressed = len(packed) if packed is not None else mib * len(_ZEROS_BLOCK) + len(_LAST_BLOCK)
            fields = struct.pack("<HHHHHIIIHH", 20, 0, 8, 0, 0x21, member_crc, compressed, size, len(name), 0)
            out.write(b"PK\3\4" + fields + name.encode())
            if packed is not None:
                out.write(packed)
            else:
                for _ in range(mib):
                    out.write(_ZEROS_BLOCK)
                out.write(_LAST_BLOCK)
            central += b"PK\1\2" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset) + name.encode()
        where = out.tell()
        out.write(central + b"PK\5\6" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), where, 0))
    return path


def _deflate(content: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(content) + compressor.flush()


def ingest_measured(folder: Path, store: Path, config: Path) -> tuple[list[dict[str, object]], int]:
    """`dicomfs ingest --json folder` in a child process: its results, and its peak RSS in bytes
    (from wait4, which reports that child alone)."""
    env = {**os.environ, "DICOMFS_CONFIG": str(config)}
    with (folder.parent / "ingest.err").open("w+b") as errors:
        process = subprocess.Popen([*dicomfs_command(), "--store", str(store), "--config", str(config), "ingest",
                                    "--json", str(folder)], stdout=subprocess.PIPE, stderr=errors, env=env)
        assert process.stdout is not None
        with process.stdout:
            out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        said = errors.read().decode()
    assert "Traceback" not in said, said
    return [json.loads(line) for line in out.splitlines()], usage.ru_maxrss * 1024


def _good_files(folder: Path) -> list[Path]:
    return [write_own_instance(folder / f"good{i}.dcm", i, patient="GOOD", series="1.2.826.0.1.3680043.10.98.1.1")
            for i in range(2)]


def test_bombs_rejected_by_the_cli_in_bounded_memory_and_the_files_beside_them_stored(tmp_path: Path) -> None:
    config = tmp_path / "dicomfs.toml"
    config.write_text('[ingest]\nmax_expanded_size = "1 GiB"\n')
    store = tmp_path / "store"
    run_cli("init", store=store, config=config, check=True)
    folder = tmp_path / "in"
    _good_files(folder)
    zip_bomb(folder / "cd.zip", 3 * 1024, {"inside.dcm": write_own_instance(
        tmp_path / "inside.dcm", 5, patient="GOOD", series="1.2.826.0.1.3680043.10.98.1.1").read_bytes()})
    deflated_bomb(folder / "deflated.dcm", 2 * 1024)
    assert (folder / "cd.zip").stat().st_size < 4 << 20 and (folder / "deflated.dcm").stat().st_size < 3 << 20

    results, peak = ingest_measured(folder, store, config)

    by_path = {Path(str(r["path"])).name: r for r in results}
    assert by_path.keys() == {"cd.zip:bomb.dcm", "cd.zip:inside.dcm", "deflated.dcm", "good0.dcm", "good1.dcm"}
    for bomb in ("cd.zip:bomb.dcm", "deflated.dcm"):
        assert by_path[bomb]["status"] == "rejected"
        assert by_path[bomb]["reason"] == f"rejected: expands past ingest.max_expanded_size ({GIB} bytes)"
    assert all(by_path[name]["status"] == "stored" for name in ("cd.zip:inside.dcm", "good0.dcm", "good1.dcm"))
    assert peak < PEAK_RSS_BOUND, f"dicomfs ingest peaked at {peak >> 20} MiB"
    assert list((store / "tmp").iterdir()) == []  # nothing spilled was left behind


def test_a_deflated_file_that_expands_within_the_cap_is_stored_as_received_in_bounded_memory(tmp_path: Path) -> None:
    """2 GiB inflated (under the 4 GiB default): spilled as holes, walked, the 2 MB file stored."""
    config = tmp_path / "dicomfs.toml"
    config.write_text("")
    store = tmp_path / "store"
    run_cli("init", store=store, config=config, check=True)
    folder = tmp_path / "in"
    folder.mkdir()
    bomb = deflated_bomb(folder / "deflated.dcm", 2 * 1024)
    zip_bomb(folder / "big.zip", 0, {"member.dcm": _uncompressed_instance(24)})

    results, peak = ingest_measured(folder, store, config)

    assert [(Path(str(r["path"])).name, r["status"], r["size"]) for r in results] == [
        ("big.zip:member.dcm", "stored", len(_uncompressed_instance(24))),
        ("deflated.dcm", "stored", bomb.stat().st_size)]
    assert peak < PEAK_RSS_BOUND, f"dicomfs ingest peaked at {peak >> 20} MiB"


def test_a_deflated_bomb_the_header_parser_would_hand_to_pydicom_is_rejected_in_bounded_memory(tmp_path: Path) -> None:
    """An element with a VR code that is none sends an ordinary file to pydicom, which inflates a
    deflated dataset whole in memory: under the default cap that is gigabytes, so such a file is
    rejected instead."""
    config = tmp_path / "dicomfs.toml"
    config.write_text("")
    store = tmp_path / "store"
    run_cli("init", store=store, config=config, check=True)
    folder = tmp_path / "in"
    folder.mkdir()
    deflated_bomb(folder / "odd.dcm", 2 * 1024, odd=struct.pack("<HH2sH", 0x0018, 0x0015, b"Q!", 4) + b"HEAD")

    results, peak = ingest_measured(folder, store, config)

    assert [(r["status"], r["reason"]) for r in results] == [
        ("rejected", "rejected: a deflated dataset the header parser cannot read, and pydicom would inflate it whole in memory")]
    assert peak < PEAK_RSS_BOUND, f"dicomfs ingest peaked at {peak >> 20} MiB"


def _uncompressed_instance(mib: int) -> bytes:
    """An explicit VR little endian instance with ``mib`` MiB of pixel data (past the in-memory
    limit of an expanding zip member, so it is spilled to the store's tmp/)."""
    sop = f"1.2.826.0.1.3680043.10.99.2.1.{mib}"
    pixels = bytes(range(256)) * (mib << 12)
    return _file_meta(EXPLICIT, sop) + _dataset_start(sop) + struct.pack("<HH2s2xI", 0x7FE0, 0x10, b"OB", len(pixels)) + pixels


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def test_bombs_uploaded_to_the_bridge_are_rejected_in_bounded_memory(tmp_path: Path) -> None:
    config = tmp_path / "dicomfs.toml"
    config.write_text('[ingest]\nmax_expanded_size = "1 GiB"\n')
    store = tmp_path / "store"
    run_cli("init", store=store, config=config, check=True)
    good = _good_files(tmp_path / "in")
    bombs = {"deflated.dcm": deflated_bomb(tmp_path / "deflated.dcm", 2 * 1024).read_bytes(),
             "cd.zip": zip_bomb(tmp_path / "cd.zip", 3 * 1024, {"inside.dcm": good[1].read_bytes()}).read_bytes()}
    with serve(store, config=config) as bridge:
        assert bridge.request("PUT", "/uploads/good0.dcm", good[0].read_bytes()).status == 201
        for name, content in bombs.items():
            assert bridge.request("PUT", f"/uploads/{name}", content).status == 201
        uploads = store / "uploads"
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(reasons) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            for name in bombs:
                try:
                    reasons[name] = os.getxattr(uploads / name, "user.dicomfs.error").decode()
                except OSError:
                    pass
        assert bridge.process is not None
        peaks = {pid: _peak_rss(pid) for pid in [bridge.process.pid, *_children(bridge.process.pid)]}
        log = bridge.log.read_text()
    limit = f"expands past ingest.max_expanded_size ({GIB} bytes)"
    assert reasons["deflated.dcm"] == f"rejected: {limit}"
    assert reasons["cd.zip"] == f"1 of 2 files not stored: bomb.dcm: rejected: {limit}"
    assert not (uploads / "good0.dcm").exists(), log
    assert len(peaks) >= 2, "the upload helper process was not found"
    assert max(peaks.values()) < PEAK_RSS_BOUND, {pid: f"{peak >> 20} MiB" for pid, peak in peaks.items()}
    assert "Traceback" not in log, log


def test_a_deflated_file_sent_in_a_transfer_keeps_the_receiving_bridge_in_bounded_memory(tmp_path: Path) -> None:
    """The receiver parses what a peer sends in its own process: 1 GiB inflated, a 1 MB instance."""
    sender, receiver = new_store(tmp_path / "a"), new_store(tmp_path / "b")
    bomb = deflated_bomb(tmp_path / "deflated.dcm", 1024)
    run_cli("ingest", str(bomb), store=sender, check=True)
    with serve(receiver, config=receiver_config(tmp_path), auth=(USER, PASSWORD)) as bridge:
        sent = run_cli("send", "--to", "remote", "--wait", patient_ids(sender)[0], store=sender,
                       config=peer_config(tmp_path, bridge.url))
        assert bridge.process is not None
        peak = _peak_rss(bridge.process.pid)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with Store(receiver, readonly=True) as opened:
        assert [r.size for r in opened.walk(Level.INSTANCE)] == [bomb.stat().st_size]
    assert peak < PEAK_RSS_BOUND, f"the receiving bridge peaked at {peak >> 20} MiB"


def test_zip_members_that_cannot_be_expanded_safely_are_rejected_and_the_rest_stored(tmp_path: Path) -> None:
    """A bzip2 member (zipfile inflates those without an output bound) and a damaged one."""
    good = write_own_instance(tmp_path / "good.dcm", 0, patient="GOOD", series="1.2.826.0.1.3680043.10.98.2.1")
    folder = tmp_path / "in"
    folder.mkdir()
    with zipfile.ZipFile(folder / "cd.zip", "w") as archive:
        archive.writestr("a-bzip2.dcm", good.read_bytes(), compress_type=zipfile.ZIP_BZIP2)
        archive.writestr("b-damaged.dcm", good.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("c-good.dcm", good.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    content = bytearray((folder / "cd.zip").read_bytes())
    with zipfile.ZipFile(folder / "cd.zip") as archive:
        damaged = archive.getinfo("b-damaged.dcm")
    data_start = damaged.header_offset + 30 + len(damaged.filename)
    content[data_start + damaged.compress_size // 2] ^= 0xFF
    (folder / "cd.zip").write_bytes(bytes(content))
    config = tmp_path / "dicomfs.toml"
    config.write_text("")
    store = tmp_path / "store"
    run_cli("init", store=store, config=config, check=True)

    results, _ = ingest_measured(folder, store, config)

    by_member = {str(r["path"]).rsplit(":", 1)[1]: r for r in results}
    assert by_member["a-bzip2.dcm"]["status"] == "rejected"
    assert "dicomfs expands deflated and stored members only" in str(by_member["a-bzip2.dcm"]["reason"])
    assert by_member["b-damaged.dcm"]["status"] == "rejected"
    assert str(by_member["b-damaged.dcm"]["reason"]).startswith("rejected: the zip member cannot be read")
    assert by_member["c-good.dcm"]["status"] == "stored"
