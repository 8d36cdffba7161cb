"""The Orthanc fixture (tests/orthanc_server.py): a real Orthanc + DICOMweb in a private network
namespace, reachable from the namespace only, with a hand-made STOW-RS request as proof."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dicomfs.samples import make_instance, write_instance
from tests.orthanc_server import orthanc

BOUNDARY = "dicomfs-test-boundary-7d3f"
pytestmark = pytest.mark.slow

STOW_HEADERS = {
    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    "Accept": "application/dicom+json",
}


def instance_bytes(folder: Path, number: int) -> tuple[str, bytes]:
    """A small CT instance written by dicomfs.samples: (SOPInstanceUID, Part 10 bytes)."""
    sop_uid = f"2.25.{9000 + number}"
    ds = make_instance(patient_id="ORTHANC1", patient_name="TEST^ORTHANC", study_uid="2.25.9001",
                       series_uid="2.25.9002", sop_uid=sop_uid, rows=16, columns=16, seed=number)
    path = folder / f"{number}.dcm"
    write_instance(path, ds)
    return sop_uid, path.read_bytes()


def stow_body(*files: bytes) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def referenced_sop_uids(answer: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get("00081199", {}).get("Value", [])]


def test_orthanc_answers_in_the_namespace_only(tmp_path: Path) -> None:
    with orthanc(tmp_path) as server:
        status, body = server.rest("GET", "/system")
        assert status == 200
        system = json.loads(body)
        assert system["HttpPort"] == server.http_port

        def connect(port: int) -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(2)
                return probe.connect_ex(("127.0.0.1", port))

        # Inside: HTTP listens, the DICOM server (DicomServerEnabled false) does not.
        assert server.in_namespace(connect, server.http_port) == 0
        assert server.in_namespace(connect, system["DicomPort"]) == errno.ECONNREFUSED
        status, body = server.rest("GET", "/plugins")
        assert status == 200 and "dicom-web" in json.loads(body)
        assert server.url == f"http://127.0.0.1:{server.http_port}"
        assert server.dicomweb_url == server.url + "/dicom-web"

        # From the host namespace (this thread) the same address and port have no listener.
        assert connect(server.http_port) == errno.ECONNREFUSED

        # The namespace has loopback only.
        links = server.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]

        # A subprocess started in the namespace (how a `python -m dicomfs` exporter would run) gets in.
        client = [sys.executable, "-c",
                  "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)",
                  server.url + "/system"]
        assert server.run(client, capture_output=True, text=True, check=True).stdout.strip() == "200"
        process = server.popen(client, stdout=subprocess.PIPE, text=True)
        assert process.communicate(timeout=20)[0].strip() == "200"
        # ... and the same command from the host namespace does not.
        outside = subprocess.run(client, capture_output=True, text=True)
        assert outside.returncode != 0 and "Connection refused" in outside.stderr

        # Threads started by code running in_namespace are in the namespace as well.
        def namespaces() -> tuple[str, str]:
            seen: list[str] = []
            child = threading.Thread(target=lambda: seen.append(os.readlink("/proc/thread-self/ns/net")))
            child.start()
            child.join()
            return os.readlink("/proc/thread-self/ns/net"), seen[0]

        inside = os.readlink(server.netns)
        assert server.in_namespace(namespaces) == (inside, inside)
        assert os.readlink("/proc/thread-self/ns/net") != inside


def test_stow_rs_by_hand_stores_the_instance_as_sent(tmp_path: Path) -> None:
    sop_uid, data = instance_bytes(tmp_path, 1)
    with orthanc(tmp_path / "orthanc") as server:
        assert server.instances() == []
        status, body = server.rest("POST", "/dicom-web/studies", stow_body(data), STOW_HEADERS)
        assert status == 200, body
        answer = json.loads(body)
        assert referenced_sop_uids(answer) == [sop_uid]
        assert "Value" not in answer.get("00081198", {})  # FailedSOPSequence present but empty
        assert len(server.instances()) == 1
        assert server.sop_uids() == {sop_uid}
        assert server.file_of(sop_uid) == data
        with pytest.raises(KeyError):
            server.file_of("2.25.1234567")


def test_registered_users(tmp_path: Path) -> None:
    sop_uid, data = instance_bytes(tmp_path, 2)
    with orthanc(tmp_path / "orthanc", users={"alice": "secret"}) as server:
        assert server.credentials == ("alice", "secret")
        assert server.rest("GET", "/system", auth=False)[0] == 401
        assert server.rest("GET", "/system", auth=("alice", "wrong"))[0] == 401
        assert server.rest("GET", "/system")[0] == 200
        assert server.rest("POST", "/dicom-web/studies", stow_body(data), STOW_HEADERS, auth=False)[0] == 401
        assert server.instances() == []
        status, body = server.rest("POST", "/dicom-web/studies", stow_body(data), STOW_HEADERS)
        assert status == 200 and referenced_sop_uids(json.loads(body)) == [sop_uid]
        assert server.sop_uids() == {sop_uid}


def test_stop_and_start_keep_the_stored_instances(tmp_path: Path) -> None:
    first, data1 = instance_bytes(tmp_path, 3)
    second, data2 = instance_bytes(tmp_path, 4)
    with orthanc(tmp_path / "orthanc") as server:
        assert server.rest("POST", "/dicom-web/studies", stow_body(data1), STOW_HEADERS)[0] == 200
        netns = os.readlink(server.netns)

        server.stop()  # killed, as if it crashed
        assert not server.running()
        with pytest.raises(ConnectionRefusedError):
            server.rest("GET", "/system")
        server.start()
        assert server.running() and os.readlink(server.netns) == netns
        assert server.sop_uids() == {first}
        assert server.rest("POST", "/dicom-web/studies", stow_body(data2), STOW_HEADERS)[0] == 200

        server.stop(graceful=True)
        server.start()
        assert server.sop_uids() == {first, second}
        assert server.file_of(first) == data1 and server.file_of(second) == data2
