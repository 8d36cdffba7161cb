"""Hostile peers (issue #22): what a peer sends to the ``/transfers/`` endpoints of a real bridge,
and what a peer serving a pull answers, never names a file outside the store, never answers 500,
never holds unbounded plans, and never inflates a gzip body beyond what its bucket declares.

The bridge is the real ``dicomfs webdav`` (cheroot on 127.0.0.1, a user with the ``transfer``
right); the hostile peer of a pull is a small ``http.server`` on 127.0.0.1 run by the test, and
the pull the real ``dicomfs pull --wait``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicomfs.passwords import hash_password
from dicomfs.transfers import validation
from dicomfs.transfers.protocol import Piece, Wanted, encode_bucket
from tests.conftest import dicomfs_command
from tests.test_transfers import PASSWORD, USER, new_store, peer_config, receiver_config
from tests.webdav_server import Server, serve

ID = "0123abcd-" * 4 + "89abcdef"
SHA = hashlib.sha256(b"hostile").hexdigest()
MiB = 1 << 20


def _bucket(pieces: object, content: bytes) -> bytes:
    """A bucket whose manifest is exactly ``pieces`` (whatever they hold), then ``content``."""
    return _raw_bucket(json.dumps(pieces).encode(), content)


def _raw_bucket(manifest: bytes, content: bytes = b"") -> bytes:
    return b"DFSB\x01" + len(manifest).to_bytes(4, "big") + manifest + content


def _files_outside(root: Path, store: Path) -> dict[str, bytes]:
    """Every file under ``root`` but not in ``store``, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and store not in p.parents}


def _vm_hwm_kib(pid: int) -> int:
    """The peak resident set of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def _server_log_is_clean(bridge: Server) -> None:
    log = bridge.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One bridge for the tests that change nothing on disk but what they check."""
    folder = tmp_path_factory.mktemp("hostile")
    with serve(new_store(folder / "b"), config=receiver_config(folder), auth=(USER, PASSWORD)) as server:
        yield server


# -- 1. Names from a peer never become paths --------------------------------------------------------


@pytest.mark.parametrize(("item", "sha256"), [
    ("../../../planted", SHA),  # partial/ -> transfers/ -> the store -> beside it
    ("../../../victim", SHA),  # an existing file, to be overwritten
    (ID, "/../../../../../../planted" + "0" * 38),
    (ID, SHA.upper()),
    (ID + "\n", SHA),
    (ID.replace("-", "/"), SHA),
], ids=["planted", "overwrite", "sha-traversal", "uppercase-sha", "newline", "slashes"])
def test_buckets_refuse_names_that_are_not_an_id_and_a_sha256(tmp_path: Path, item: str, sha256: str) -> None:
    store = new_store(tmp_path / "b")
    victim = tmp_path / f"victim.{SHA[:32]}.part"
    victim.write_bytes(b"precious")
    config = receiver_config(tmp_path)
    before = _files_outside(tmp_path, store)
    bucket = _bucket([[item, sha256, 100_000, 0, 4]], b"XXXX")
    with serve(store, config=config, auth=(USER, PASSWORD)) as server:
        answer = server.request("POST", "/transfers/buckets", bucket)
        assert answer.status == 400, answer.body
        assert "an instance id is" in json.loads(answer.body)["error"] or "SHA-256" in json.loads(answer.body)["error"]
        _server_log_is_clean(server)
    assert _files_outside(tmp_path, store) == before  # nothing planted, nothing overwritten
    assert not (store / "transfers" / "partial").exists() or not any((store / "transfers" / "partial").iterdir())


@pytest.mark.parametrize("row", [
    [ID, "/../../../../x" + "0" * 50, 10], [ID, SHA.upper(), 10], [ID.upper(), SHA, 10], ["../" * 10 + "x", SHA, 10],
    [ID + "\n", SHA, 10], [ID, SHA + "\n", 10],
], ids=["sha-traversal", "sha-upper", "id-upper", "id-traversal", "id-newline", "sha-newline"])
def test_lookup_refuses_names_that_are_not_an_id_and_a_sha256(bridge: Server, row: list[object]) -> None:
    answer = bridge.request("POST", "/transfers/lookup", json.dumps({"instances": [row]}).encode())
    assert answer.status == 400, answer.body
    assert "an instance id is" in answer.body.decode() or "a SHA-256 is 64 lowercase hex digits" in answer.body.decode()


class _HostilePeer:
    """A peer that answers a pull as ``answers`` say: path -> (status, headers, body), or a
    callable of the request body giving the same."""

    def __init__(self, answers: dict[str, tuple[int, dict[str, str], bytes] | Callable[[bytes], bytes]]) -> None:
        answers_of = answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                key = "/transfers/plans/*" if path.startswith("/transfers/plans/") else path
                found = answers_of.get(key, (404, {}, b'{"error": "no"}'))
                status, headers, data = found if isinstance(found, tuple) else (200, {}, found(body))
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _HostilePeer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _pull_answers(size: int, bucket: bytes, *, gzip_on: bool = False,
                  instances: list[list[object]] | None = None,
                  plan: object = "ab" * 32) -> dict[str, tuple[int, dict[str, str], bytes] | Callable[[bytes], bytes]]:
    listed = json.dumps({"instances": instances or [[ID, SHA, size]]}).encode()
    return {
        "/transfers/resolve": lambda _: listed,
        "/transfers/manifest": lambda _: json.dumps({"instances": instances or [[ID, SHA, size]], "gone": []}).encode(),
        "/transfers/plans": lambda _: json.dumps({"plan": plan, "buckets": 1}).encode(),
        "/transfers/plans/*": (200, {"Content-Type": "application/vnd.dicomfs.bucket",
                                     **({"Content-Encoding": "gzip"} if gzip_on else {})}, bucket),
    }


def _pull(tmp_path: Path, peer: _HostilePeer, store: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """``dicomfs pull --wait`` from the peer, run under a small parent that reports the pull's peak
    resident set (ru_maxrss of its only child, in KiB)."""
    config = peer_config(tmp_path, peer.url)
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(done.returncode)")
    command = [sys.executable, "-c", measure, *dicomfs_command(), "--store", str(store), "--config", str(config),
               "pull", "--from", "remote", "--wait", ID]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DICOMFS_CONFIG": str(config)})
    peak = int(done.stderr.rsplit("MAXRSS", 1)[1].split()[0])
    return done, peak


@pytest.mark.parametrize("answers", ["bucket", "manifest", "resolve", "plan"])
def test_a_pull_from_a_peer_answering_traversal_names_fails_clearly_and_writes_nothing_outside(
        tmp_path: Path, answers: str) -> None:
    store = new_store(tmp_path / "c")
    before = _files_outside(tmp_path, store)
    size = 200_000  # chunks: each written into partial/ under the name the bucket gives
    hostile = [["../../../planted", SHA, size, 0, 1000]]
    served = _pull_answers(size, _bucket(hostile, bytes(1000)))
    if answers in ("manifest", "resolve"):
        served[f"/transfers/{answers}"] = (200, {}, json.dumps(
            {"instances": [["../../../planted", SHA, size]], "gone": []}).encode())
    if answers == "plan":
        served["/transfers/plans"] = (200, {}, json.dumps({"plan": "../../../../transfers/x", "buckets": 1}).encode())
    with _HostilePeer(served) as peer:
        done, _ = _pull(tmp_path, peer, store)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "answered something malformed" in output, output
    assert ("an instance id is five groups of eight lowercase hex digits" in output
            or "a plan's name is 64 hex digits" in output), output
    assert "Traceback" not in output and "internal error" not in output, output
    after = _files_outside(tmp_path, store)
    assert {k: v for k, v in after.items() if not k.endswith(".toml")} == before


def test_a_pull_refuses_a_bucket_holding_other_pieces_than_planned(tmp_path: Path) -> None:
    store = new_store(tmp_path / "c")
    other = "fedcba98-" * 4 + "76543210"
    with _HostilePeer(_pull_answers(1000, _bucket([[other, SHA, 1000, 0, 1000]], bytes(1000)))) as peer:
        done, _ = _pull(tmp_path, peer, store)
    assert done.returncode == 1
    assert "holds other pieces than the plan registered" in done.stdout + done.stderr


# -- 2. Hostile manifests: a clear 400 (or 413), never a 500 ---------------------------------------


def _plan(*rows: list[object]) -> bytes:
    return json.dumps({"buckets": [list(rows)]}).encode()


HOSTILE_JSON = {
    "deep-lookup": ("lookup", b"[" * 100_000, 400, "nested too deeply"),
    "deep-plans": ("plans", b'{"buckets": ' + b"[" * 100_000, 400, "nested too deeply"),
    "infinity": ("lookup", f'{{"instances": [["{ID}", "{SHA}", Infinity]]}}'.encode(), 400, "Infinity"),
    "nan": ("lookup", f'{{"instances": [["{ID}", "{SHA}", NaN]]}}'.encode(), 400, "NaN"),
    "float": ("lookup", f'{{"instances": [["{ID}", "{SHA}", 1e400]]}}'.encode(), 400, "not an integer"),
    "size-string": ("lookup", json.dumps({"instances": [[ID, SHA, "12"]]}).encode(), 400, "size must be an integer"),
    "size-bool": ("lookup", json.dumps({"instances": [[ID, SHA, True]]}).encode(), 400, "size must be an integer"),
    "size-negative": ("lookup", json.dumps({"instances": [[ID, SHA, -1]]}).encode(), 400, "size must be an integer"),
    "size-2^44": ("lookup", json.dumps({"instances": [[ID, SHA, 1 << 44]]}).encode(), 400, "size must be an integer"),
    "id-number": ("lookup", json.dumps({"instances": [[12, SHA, 1]]}).encode(), 400, "an instance id is"),
    "id-null": ("manifest", json.dumps({"ids": [None]}).encode(), 400, "an instance id is"),
    "short-row": ("lookup", json.dumps({"instances": [[ID]]}).encode(), 400, "an instance is [id, sha256, size]"),
    "not-object": ("lookup", b"[1, 2]", 400, "must be a JSON object"),
    "unknown-key": ("lookup", json.dumps({"instances": [], "more": 1}).encode(), 400, "unknown key"),
    "ids-not-list": ("manifest", json.dumps({"ids": {"a": 1}}).encode(), 400, "must be a list"),
    "not-utf8": ("lookup", b'{"instances": ["\xff"]}', 400, "not"),
    "selector-number": ("resolve", json.dumps({"selectors": [1]}).encode(), 400, "a selector is a non-empty string"),
    "selector-long": ("resolve", json.dumps({"selectors": ["x" * 5000]}).encode(), 400, "at most 4096"),
    "offset-2^44": ("plans", _plan([ID, SHA, 1000, 1 << 44, 10]), 400, "offset must be an integer from 0 to 1000"),
    "length-negative": ("plans", _plan([ID, SHA, 1000, 0, -5]), 400, "length must be an integer"),
    "length-2^40": ("plans", _plan([ID, SHA, 1 << 40, 0, 1 << 40]), 400, "length must be an integer from 0 to 67108864"),
    "past-the-end": ("plans", _plan([ID, SHA, 1000, 900, 200]), 400, "length must be an integer from 0 to 100"),
    "bucket-over-64MiB": ("plans", _plan(*[[ID, SHA, 64 * MiB, 0, 64 * MiB]] * 2), 413, "over a bucket's limit"),
    "empty-bucket": ("plans", json.dumps({"buckets": [[]]}).encode(), 400, "is empty"),
    "too-many-ids": ("manifest", json.dumps({"ids": [ID] * 100_001}).encode(), 413, "over the limit of 100000"),
    "body-over-16MiB": ("lookup", b'{"instances": [], "x": "' + b"x" * (17 * MiB) + b'"}', 413, "over the limit"),
}


@pytest.mark.parametrize("case", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_gets_a_clear_answer(bridge: Server, case: tuple[str, bytes, int, str]) -> None:
    route, body, status, reason = case
    answer = bridge.request("POST", f"/transfers/{route}", body, {"Content-Type": "application/json"})
    assert answer.status == status, answer.body[:500]
    assert reason in json.loads(answer.body)["error"]
    assert bridge.request("GET", "/transfers/").status == 200  # and the bridge carries on
    _server_log_is_clean(bridge)


HOSTILE_BUCKETS = {
    "deep-manifest": (_bucket([], b"")[:5] + (100_000).to_bytes(4, "big") + b"[" * 100_000, 400, "nested too deeply"),
    "infinity": (_raw_bucket(f'[["{ID}", "{SHA}", Infinity, 0, 0]]'.encode()), 400, "Infinity"),
    "length-2^40": (_bucket([[ID, SHA, 1 << 40, 0, 1 << 40]], b""), 400, "length must be an integer from 0 to 67108864"),
    "offset-2^44": (_bucket([[ID, SHA, 1000, 1 << 44, 1]], b"x"), 400, "offset must be an integer"),
    "negative": (_bucket([[ID, SHA, 1000, 0, -1]], b""), 400, "length must be an integer"),
    "bool-size": (_bucket([[ID, SHA, True, 0, 1]], b"x"), 400, "size must be an integer"),
    "manifest-object": (_bucket({"a": 1}, b""), 400, "must be a list"),
    "manifest-over-4MiB": (b"DFSB\x01" + (5 * MiB).to_bytes(4, "big"), 413, "over the limit"),
}


@pytest.mark.parametrize("case", HOSTILE_BUCKETS.values(), ids=HOSTILE_BUCKETS.keys())
def test_hostile_bucket_manifests_get_a_clear_answer(bridge: Server, case: tuple[bytes, int, str]) -> None:
    body, status, reason = case
    answer = bridge.request("POST", "/transfers/buckets", body, {"Content-Type": "application/vnd.dicomfs.bucket"})
    assert answer.status == status, answer.body[:500]
    assert reason in json.loads(answer.body)["error"]
    assert bridge.request("GET", "/transfers/").status == 200
    _server_log_is_clean(bridge)


# -- 3. Pull plans are bounded ---------------------------------------------------------------------


def _plan_of(n: int, pieces: int = 1) -> bytes:
    """A distinct plan (``n`` makes it so) of ``pieces`` one-byte chunks, as many in a bucket as one holds."""
    rows = [[ID, SHA, 10**9, n * 10**6 + k, 1] for k in range(pieces)]
    step = validation.MAX_BUCKET_PIECES
    return json.dumps({"buckets": [rows[k:k + step] for k in range(0, pieces, step)]}).encode()


def _plans_held(store: Path) -> list[Path]:
    return sorted((store / "transfers" / "plans").glob("*.json"))


def test_a_plan_over_the_piece_limit_is_refused_413(bridge: Server) -> None:
    answer = bridge.request("POST", "/transfers/plans", _plan_of(1, validation.MAX_PLAN_PIECES + 1))
    assert answer.status == 413
    assert "a plan of more than 100000 pieces" in json.loads(answer.body)["error"]
    assert _plans_held(bridge.store) == []


def test_a_peer_holds_at_most_four_plans_the_least_recently_used_going_first(tmp_path: Path) -> None:
    store = new_store(tmp_path / "b")
    with serve(store, config=receiver_config(tmp_path), auth=(USER, PASSWORD)) as server:
        names = []
        for n in range(6):
            answer = server.request("POST", "/transfers/plans", _plan_of(n))
            assert answer.status == 200, answer.body
            names.append(json.loads(answer.body)["plan"])
            if n == 2:  # the first one, used again, is not the first to go
                assert server.request("POST", "/transfers/plans", _plan_of(0)).status == 200
        assert len(_plans_held(store)) == 4
        forgotten = server.request("GET", f"/transfers/plans/{names[1]}/0")
        assert forgotten.status == 404 and "register it again" in json.loads(forgotten.body)["error"]
        for name in (names[0], names[3], names[4], names[5]):  # kept (the instance itself is not here: 409)
            assert server.request("GET", f"/transfers/plans/{name}/0").status == 409
        _server_log_is_clean(server)


def test_the_bridge_holds_at_most_sixteen_plans_in_all_then_answers_429(tmp_path: Path) -> None:
    store = new_store(tmp_path / "b")
    users = [f"peer{n}" for n in range(5)]
    config = tmp_path / "users.toml"
    hashed = hash_password(PASSWORD)
    config.write_text("".join(f'[users.{u}]\npassword_hash = "{hashed}"\nrights = ["transfer"]\n' for u in users))
    with serve(store, config=config) as server:
        statuses = [server.request("POST", "/transfers/plans", _plan_of(n), auth=(user, PASSWORD))
                    for user in users for n in range(4)]
    assert [a.status for a in statuses] == [200] * 16 + [429] * 4
    assert statuses[-1].headers["retry-after"] == "60"
    assert "holds 16 pull plans for other peers" in json.loads(statuses[-1].body)["error"]
    assert len(_plans_held(store)) == 16


# -- 4. gzip bodies inflate no further than their bucket declares ----------------------------------


def _gzip_bomb(head: bytes, zeros: int) -> bytes:
    """``head`` then ``zeros`` zero bytes, gzip-compressed (~1,000 times smaller)."""
    deflate, block = zlib.compressobj(9, wbits=31), bytes(MiB)
    parts = [deflate.compress(head)] + [deflate.compress(block) for _ in range(zeros // MiB)]
    return b"".join(parts) + deflate.flush()


BOMB_BOUND_KIB = 32 << 10
"""What a gzip bomb may add to the peak resident set of the bridge: the bucket it declares (1 kB),
the compressed body (~0.5 MB) and inflating buffers, with room for the allocator. Inflating the
512 MiB the bomb holds, or the 128 MiB the bridge used to inflate up to, is far above."""


def test_a_gzip_bomb_bucket_does_not_take_the_bridges_memory(tmp_path: Path) -> None:
    store = new_store(tmp_path / "b")
    head = _bucket([[ID, SHA, 100_000, 0, 1000]], bytes(1000))
    bomb = _gzip_bomb(head, 512 * MiB)
    assert len(bomb) < MiB
    with serve(store, config=receiver_config(tmp_path), auth=(USER, PASSWORD)) as server:
        assert server.process is not None
        # A gzip bucket first: what any transfer costs (imports, buffers) is in the baseline.
        warm = server.request("POST", "/transfers/buckets", gzip.compress(_bucket([], b"")), {"Content-Encoding": "gzip"})
        assert warm.status == 200, warm.body
        before = _vm_hwm_kib(server.process.pid)
        answer = server.request("POST", "/transfers/buckets", bomb, {"Content-Encoding": "gzip"})
        grown = _vm_hwm_kib(server.process.pid) - before
        assert answer.status == 413, answer.body
        assert "larger than the 1" in json.loads(answer.body)["error"]  # the 1,1xx bytes its bucket declares
        assert grown < BOMB_BOUND_KIB, f"the bridge's peak RSS grew by {grown} KiB"
        _server_log_is_clean(server)
    assert not (store / "transfers" / "partial").exists()  # refused before anything was kept


PULL_BOUND_KIB = 200 << 10
"""The peak resident set of a whole ``dicomfs pull`` (Python, its imports, the store, the job's
threads: ~80 MB) fed a bomb; inflating its 512 MiB would pass 500 MiB."""


def test_a_gzip_bomb_served_to_a_puller_is_refused_without_taking_its_memory(tmp_path: Path) -> None:
    store = new_store(tmp_path / "c")
    planned = encode_bucket([Piece(ID, SHA, 1000, 0, 1000)], lambda piece: bytes(1000))
    with _HostilePeer(_pull_answers(1000, _gzip_bomb(planned, 512 * MiB), gzip_on=True)) as peer:
        done, peak = _pull(tmp_path, peer, store)
    assert done.returncode == 1
    assert "bytes after the last piece: the body is larger than the" in done.stdout + done.stderr
    assert peak < PULL_BOUND_KIB, f"the pull's peak RSS was {peak} KiB"


# -- the validator itself ---------------------------------------------------------------------------


def test_the_validator_takes_what_the_protocol_makes_and_nothing_else() -> None:
    assert validation.lookup_request({"instances": [[ID, SHA, 0]]}) == [Wanted(ID, SHA, 0)]
    assert validation.plan_request({"buckets": [[[ID, SHA, 10, 0, 10]], [[ID, SHA, 200, 100, 100]]]}) == [
        [Piece(ID, SHA, 10, 0, 10)], [Piece(ID, SHA, 200, 100, 100)]]
    assert validation.lookup_answer({"have": [ID], "partial": {}}, [Wanted(ID, SHA, 5)]) == ({ID}, {})
    assert validation.lookup_answer({"have": [], "partial": {ID: [[0, 2]]}}, [Wanted(ID, SHA, 5)]) == (set(), {ID: [(0, 2)]})
    other = "f" * 8 + "-00000000" * 4
    for answer in ({"have": [other], "partial": {}},  # not asked for
                   {"have": [], "partial": {ID: [[0, 6]]}},  # past the instance's end
                   {"have": [], "partial": {ID: [[3, 3]]}}):  # empty
        with pytest.raises(validation.ManifestError):
            validation.lookup_answer(answer, [Wanted(ID, SHA, 5)])
    with pytest.raises(validation.ManifestError, match="not asked for"):
        validation.received_answer({"stored": [other], "failed": {}, "damaged": []}, [ID])
    assert validation.received_answer({"stored": [ID], "failed": {}, "damaged": [], "new": 1}, [ID])["stored"] == [ID]
    with pytest.raises(validation.ManifestError, match="64 hex digits"):
        validation.plan_name({"plan": "../x"})
    assert validation.is_instance_id(ID) and not validation.is_instance_id(ID + "\n")
    assert validation.is_sha256(SHA) and not validation.is_sha256(SHA[:-1] + "G")
    with pytest.raises(validation.ManifestError, match="nested too deeply"):
        validation.parse_json(b"[" * 100_000)
    nested: object = []
    for _ in range(50):
        nested = [nested]
    with pytest.raises(validation.ManifestError, match="a list"):  # never repr'd
        validation.lookup_request({"instances": [[nested, SHA, 1]]})


def test_looks_like_id_takes_no_trailing_newline() -> None:
    """The store's own shape check, under the transfer validator's: re.match with $ let "id\\n" pass."""
    from dicomfs.store.ids import looks_like_id

    good = "0123abcd-0123abcd-0123abcd-0123abcd-0123abcd"
    assert looks_like_id(good)
    assert not looks_like_id(good + "\n") and not looks_like_id(good + "/..") and not looks_like_id(good.upper())
