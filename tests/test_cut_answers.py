"""A server that goes away in the middle of its answer: the senders must try again, not give up.

A peer bridge killed while it answered (tests/test_transfers.py kills one mid-transfer) sent its
headers and part of a JSON body; ``http.client`` hands such a short body back without a word,
and the job failed for good ("did not answer JSON") instead of waiting for the peer.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator

import pytest

from dicomfs.jobs.links import describe_failure, read_whole
from dicomfs.jobs.stowrs import Outgoing, StowClient, StowTarget, StowTransientError

BODY = b'{"ReferencedSOPSequence": ['  # what arrived of a longer answer
ANNOUNCED = 400


@pytest.fixture
def cutting_server() -> Iterator[int]:
    """127.0.0.1:<port>: reads one request's headers and body, answers 200 with a Content-Length
    of ANNOUNCED, sends BODY only, and closes. For every connection, until the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                received = b""
                while b"\r\n\r\n" not in received:
                    received += connection.recv(65536)
                head, _, rest = received.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                                   b"Content-Length: %d\r\n\r\n" % ANNOUNCED + BODY)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_cut_answer_is_an_incomplete_read_and_worth_trying_again(cutting_server: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", cutting_server, timeout=5)
    try:
        connection.request("POST", "/x", body=b"{}")
        with pytest.raises(http.client.IncompleteRead) as cut:
            read_whole(connection.getresponse(), 1 << 20)
    finally:
        connection.close()
    assert cut.value.partial == BODY
    transient, text = describe_failure(cut.value, timeout=5, host="127.0.0.1")
    assert transient and f"cut after {len(BODY)} bytes" in text


def test_an_answer_longer_than_the_limit_is_refused(cutting_server: int) -> None:
    with pytest.raises(http.client.HTTPException, match="more than 10 bytes"):
        connection = http.client.HTTPConnection("127.0.0.1", cutting_server, timeout=5)
        try:
            connection.request("POST", "/x", body=b"{}")
            read_whole(connection.getresponse(), 10)
        finally:
            connection.close()


def test_stow_request_cut_in_its_answer_is_transient(cutting_server: int) -> None:
    client = StowClient(StowTarget(url=f"http://127.0.0.1:{cutting_server}/dicom-web", authorization=None, timeout=5))
    try:
        with pytest.raises(StowTransientError, match="cut after"):
            client.send([Outgoing.from_bytes("1.2.3.4", "1.2.840.10008.5.1.4.1.1.7", b"DICM" * 64)])
    finally:
        client.close()
