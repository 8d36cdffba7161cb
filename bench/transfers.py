"""Peer-transfer benchmark: ``dicomfs send`` (buckets, 4 workers) between two local dicomfs instances
over a link with 20 ms of added latency, against one request per instance over the same link, in
the same run.

Run from the repository::

    .venv/bin/python bench/transfers.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]

**The link.** ``tc netem`` needs the ``sch_netem`` module, which these machines lack, so the delay
is a proxy in this process: a threaded TCP proxy on 127.0.0.1 in front of the receiver's bridge.
Each chunk the client sends is held for 20 ms after it arrived, then forwarded (one writer thread
per connection, in order): a constant one-way latency line whose throughput is not limited (a
chunk's delay overlaps the next ones'). Answers go back to the client directly. So every HTTP
request pays +20 ms, as over a WAN link; the TCP handshake is not delayed (a real link would add
one round trip per new connection: the naive client opens one, ``dicomfs send`` one per worker
plus one for the lookups, so this favours ``send`` by ~0.1 s at most). As a sanity figure, a
tiny ``GET /transfers/`` is timed through the proxy and directly (one keep-alive connection each,
after one untimed request; median of 20); the difference is the delay the proxy really adds.

**The stores.** The data comes from :func:`dicomfs.samples.write_corpus`: 2,000 small instances
(20 patients x 2 studies x 2 series x 25, 64x64 pixels, ~10 kB; ``--quick``: 8 patients, 800),
ingested with the real command line into one sender store (``dicomfs --store S --config C init``
and ``ingest --quiet``). Both sides store instances uncompressed (``storage.compression =
"none"``). **Every measured run gets a fresh receiver**: a new store (``dicomfs init``) served by
``dicomfs webdav --bind 127.0.0.1:0`` as a subprocess, with one ``[users.bench]`` that has the
``read`` and ``transfer`` rights, every other key at its default (32 threads). After every run the
bridge is stopped (SIGTERM) and ``dicomfs stats --json`` on the receiver must count exactly the
instances sent (each stored once), else the benchmark stops with an error. Before every run the
sender store is read once (page cache) and ``sync`` runs.

**What is measured.** MB/s counts the instances' bytes (10^6 bytes per MB).

1. ``dicomfs transfer``: the real command line, ``dicomfs --store S --config C send --to receiver
   --wait <PatientIDs>``, with ``[peers.receiver]`` at the proxy's URL, ``workers = 4``, ``gzip =
   false``, and ``bucket_size`` 4 MiB (the default) and 1 MiB; every other key at its default.
   Timed by this process from the command's start to its end: Python's start, the imports, the
   job's creation, the lookup, the buckets, the ``--wait`` loop (it polls every 0.05 s) and the
   exit all count. The job's own duration (``finished - started`` from ``dicomfs jobs show JOB``)
   is the second figure, and the rest of the command's time is printed as start-up (command start
   to the job's ``created``), claim (``created`` to ``started``) and tail (``finished`` to the
   end), with the CPU seconds of the command and of the receiver's bridge.
2. gzip on: the same with ``gzip = true`` (at both bucket sizes). The gzip ratio on the corpus is
   the job's ``extra.content_bytes / extra.wire_bytes`` (instance bytes over HTTP body bytes,
   which include the buckets' manifests).
3. The naive reference: one request per instance, sequential, over one keep-alive connection,
   through the same proxy to the same endpoint, made in this process with dicomfs's own client
   pieces: for each instance ``read_bucket(store, [Piece(id, sha256, size, 0, size)])`` (a
   one-instance bucket, read from the sender store opened read-only here) and
   ``PeerClient(peer).send_bucket(bucket, compress=False)``, each answer checked to say the
   instance was stored. One untimed ``lookup`` of nothing first opens the connection (and has the
   bridge check the password, ~60 ms of scrypt, once); the clock runs from the first bucket's
   request to the last answer. ``--quick`` times the first 300 instances only (a full run sends
   all of them). The same is measured without the proxy, without a target, to show what the
   20 ms cost.

Target: ``dicomfs send`` instances/s, command start to end, at the better of the two bucket sizes
(gzip off) >= 10x the naive reference's through the proxy. Everything else is printed without a
target. One round of each: the naive runs are the long ones (a full run spends ~3 of its ~4
minutes on them), and the start-up split of each ``send`` shows how much of it is noise.

The targets are printed as PASS/FAIL; the exit status is 0 whatever they say, since this is a
measurement, and 2 only when it cannot run (or a receiver's count is wrong). Every bridge is
stopped in a ``finally`` (SIGTERM, then SIGKILL after 20 s), the proxy's listener and connections
are closed and its threads joined in a ``finally``, everything binds 127.0.0.1 only, and every
subprocess has a timeout.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import platform
import queue
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _shared import (  # noqa: E402
    CannotRun,
    Row,
    children_cpu,
    dicomfs_command,
    finish,
    options,
    print_report,
    process_cpu,
    progress,
    work_folder,
)
from _shared import Cli as Dicomfs  # noqa: E402

from dicomfs.config import load_config  # noqa: E402
from dicomfs.errors import DicomfsError  # noqa: E402
from dicomfs.passwords import hash_password  # noqa: E402
from dicomfs.samples import write_corpus  # noqa: E402
from dicomfs.store import Instance, Level, Store  # noqa: E402
from dicomfs.transfers.client import PeerClient  # noqa: E402
from dicomfs.transfers.protocol import Piece, Wanted, plan_buckets  # noqa: E402
from dicomfs.transfers.sending import read_bucket  # noqa: E402

SEND_VS_NAIVE = 10.0
DELAY = 0.020  # seconds added to every chunk from the client to the receiver
WORKERS = 4
BUCKET_SIZES = (4 << 20, 1 << 20)
NAIVE_QUICK = 300  # instances the naive runs time in --quick
DELAY_PROBES = 20
USER = "bench"
SHORT, LONG = 120, 600  # subprocess timeouts, seconds
CHUNK = 256 << 10


# -- the delaying proxy ---------------------------------------------------------------------------


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that forwards what the client sends ``delay`` seconds after it
    arrived (order kept, throughput not limited) and what the server answers at once."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so the accept loop sees the stop flag
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._accepting.join(timeout=10)
        self.listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)
        for sock in sockets:
            sock.close()
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            print(f"proxy threads still running after close: {alive}", file=sys.stderr, flush=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=SHORT)
            except OSError:
                client.close()
                continue
            number = self.connections = self.connections + 1
            lines: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
            pending = [2]  # the two directions still open; the sockets close when both are done
            with self._lock:
                for sock in (client, upstream):
                    sock.settimeout(None)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._sockets.add(sock)
                started = [
                    threading.Thread(target=self._receive, args=(client, lines), name=f"proxy-{number}-in", daemon=True),
                    threading.Thread(target=self._delayed, args=(lines, upstream, client, upstream, pending),
                                     name=f"proxy-{number}-delayed", daemon=True),
                    threading.Thread(target=self._direct, args=(upstream, client, client, upstream, pending),
                                     name=f"proxy-{number}-out", daemon=True),
                ]
                self._threads += started
            for thread in started:
                thread.start()

    def _receive(self, source: socket.socket, lines: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        """Stamp each chunk from the client with the time it is due at the server."""
        while True:
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b""
            lines.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _delayed(self, lines: queue.SimpleQueue[tuple[float, bytes]], target: socket.socket,
                 *both: object) -> None:
        broken = False
        while True:
            due, data = lines.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                break
            if not broken:
                try:
                    target.sendall(data)
                except OSError:
                    broken = True  # keep draining until the client's side ends
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        self._done(*both)

    def _direct(self, source: socket.socket, target: socket.socket, *both: object) -> None:
        while True:
            try:
                data = source.recv(CHUNK)
                if not data:
                    break
                target.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        self._done(*both)

    def _done(self, client: object, upstream: object, pending: object) -> None:
        assert isinstance(client, socket.socket) and isinstance(upstream, socket.socket) and isinstance(pending, list)
        with self._lock:
            pending[0] -= 1
            if pending[0]:
                return
            self._sockets.discard(client)
            self._sockets.discard(upstream)
        client.close()
        upstream.close()


# -- the receiving bridge -------------------------------------------------------------------------


class Bridge:
    """``dicomfs webdav`` on a fresh receiver store, on a free loopback port."""

    def __init__(self, cli: Dicomfs, log: Path) -> None:
        self.cli, self.log = cli, log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Bridge:
        out = self.log.with_suffix(".out")
        with open(out, "wb") as stdout, open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(self.cli.argv("webdav", "--bind", "127.0.0.1:0"), stdout=stdout,
                                            stderr=stderr, stdin=subprocess.DEVNULL, env=self.cli.env)
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"\bat (http://\S+/)", out.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
                return self
            if self.process.poll() is not None:
                raise CannotRun(f"dicomfs webdav exited {self.process.returncode}: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise CannotRun(f"dicomfs webdav printed no URL within 60 s: {self.stderr()[-2000:]}")
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def cpu(self) -> float:
        return process_cpu(self.process.pid if self.process is not None else None)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 20 s; our own process only."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"  bridge (pid {process.pid}) still running 20 s after SIGTERM: SIGKILL", file=sys.stderr, flush=True)
            process.kill()
            process.wait(timeout=20)


def read_all(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 20):
                    pass


# -- runs -----------------------------------------------------------------------------------------


@dataclass
class Data:
    """The sender store and what it holds."""

    cli: Dicomfs
    selectors: tuple[str, ...]
    instances: tuple[Wanted, ...]

    @property
    def count(self) -> int:
        return len(self.instances)

    @property
    def size(self) -> int:
        return sum(w.size for w in self.instances)


@dataclass
class Measured:
    seconds: float
    """This process's clock: the command's start to its end, or the first request to the last answer."""
    count: int
    size: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @property
    def mbps(self) -> float:
        return self.size / 1e6 / self.seconds


class Bench:
    def __init__(self, command: list[str], workdir: Path, data: Data, password: str) -> None:
        self.command, self.workdir, self.data, self.password = command, workdir, data, password
        self.receiver_config = workdir / "receiver.toml"
        self.receiver_config.write_text(
            '[storage]\ncompression = "none"\n\n'
            f'[users.{USER}]\npassword_hash = "{hash_password(password)}"\nrights = ["read", "transfer"]\n')
        self.runs = 0

    @contextlib.contextmanager
    def receiver(self, label: str, expected: int) -> Iterator[Bridge]:
        """A fresh receiver store and its bridge; on a clean exit, checks it holds ``expected`` instances."""
        self.runs += 1
        name = f"{self.runs:02d}-{label}"
        cli = Dicomfs(self.command, self.workdir / "receivers" / name, self.receiver_config)
        cli.run("init")
        bridge = Bridge(cli, self.workdir / "receivers" / f"{name}.log")
        try:
            yield bridge.start()
        finally:
            bridge.stop()
        held = cli.instances()
        progress(f"    receiver {name}: {held} instances stored")
        if held != expected:
            raise CannotRun(f"receiver {name} holds {held} instances, expected exactly {expected}")
        shutil.rmtree(cli.store, ignore_errors=True)  # the next receiver starts on a tidy disk

    def warm(self) -> None:
        read_all(self.data.cli.store)
        os.sync()

    def peer_config(self, label: str, url: str, bucket_size: int, gzip_on: bool) -> Path:
        path = self.workdir / f"sender-{label}.toml"
        path.write_text(f'[storage]\ncompression = "none"\n\n[peers.receiver]\nurl = "{url}"\nusername = "{USER}"\n'
                        f'password = "{self.password}"\nbucket_size = {bucket_size}\nworkers = {WORKERS}\n'
                        f'gzip = {"true" if gzip_on else "false"}\n')
        return path

    def delay_probe(self) -> tuple[float, float]:
        """Median ms of a tiny GET /transfers/ through the proxy and directly (keep-alive, one untimed first)."""
        self.warm()
        with self.receiver("probe", 0) as bridge, DelayProxy(bridge.address, DELAY) as proxy:
            token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
            medians = []
            for port in (proxy.port, bridge.address[1]):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SHORT)
                try:
                    times = []
                    for number in range(DELAY_PROBES + 1):
                        began = time.perf_counter()
                        connection.request("GET", "/transfers/", headers={"Authorization": f"Basic {token}"})
                        response = connection.getresponse()
                        body = response.read()
                        if response.status != 200 or json.loads(body).get("protocol") != 1:
                            raise CannotRun(f"GET /transfers/ answered {response.status}: {body[:300]!r}")
                        if number:
                            times.append(time.perf_counter() - began)
                    medians.append(statistics.median(times) * 1e3)
                finally:
                    connection.close()
        return medians[0], medians[1]

    def send(self, label: str, bucket_size: int, gzip_on: bool) -> Measured:
        """The real ``dicomfs send --wait`` through the proxy, timed start to end."""
        self.warm()
        data = self.data
        with self.receiver(label, data.count) as bridge, DelayProxy(bridge.address, DELAY) as proxy:
            config = self.peer_config(label, proxy.url, bucket_size, gzip_on)
            argv = data.cli.argv("send", "--to", "receiver", "--wait", *data.selectors, config=config)
            cpu, bridge_cpu = children_cpu(), bridge.cpu()
            began = time.time()
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=LONG,
                                  env={**data.cli.env, "DICOMFS_CONFIG": str(config)})
            seconds = time.perf_counter() - started
            ended = time.time()
            cpu, bridge_cpu = children_cpu() - cpu, bridge.cpu() - bridge_cpu
            connections = proxy.connections
        if done.returncode != 0:
            raise CannotRun(f"dicomfs send exited {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}")
        found = re.search(r"^job (\S+): ", done.stdout, re.M)
        if found is None:
            raise CannotRun(f"dicomfs send printed no job id: {done.stdout.strip()[-2000:]}")
        shown = json.loads(data.cli.run("jobs", "show", found.group(1)).stdout)
        if shown["state"] != "success" or shown["done_items"] != data.count:
            raise CannotRun(f"send {label}: job {shown['state']}, {shown['done_items']} of {data.count} done: "
                            f"{shown.get('last_error')}")
        created, run_from, run_to = (float(shown[key]) for key in ("created", "started", "finished"))
        extra = shown.get("extra") or {}
        content, wire = int(extra.get("content_bytes", 0)), int(extra.get("wire_bytes", 0))
        if content != data.size:  # a retried bucket travels twice: worth knowing, not wrong
            progress(f"  note: send {label} moved {content} bytes of instances for {data.size} ({shown.get('attempts')} "
                     f"attempts, last error: {shown.get('last_error')})")
        return Measured(seconds, data.count, data.size, {
            "job": shown["id"], "job_seconds": run_to - run_from, "startup": created - began,
            "claim": run_from - created, "tail": ended - run_to, "content_bytes": content, "wire_bytes": wire,
            "gzip_ratio": content / wire if wire else float("nan"), "cpu_command": cpu, "cpu_bridge": bridge_cpu,
            "connections": connections, "bucket_size": bucket_size, "gzip": gzip_on,
            "buckets": len(plan_buckets(data.instances, bucket_size))})

    def naive(self, label: str, count: int, *, through_proxy: bool) -> Measured:
        """One request per instance, sequential, one keep-alive connection, with dicomfs's client."""
        self.warm()
        wanted = self.data.instances[:count]
        with self.receiver(label, count) as bridge, DelayProxy(bridge.address, DELAY) as proxy:
            url = proxy.url if through_proxy else bridge.url
            config = self.peer_config(label, url, BUCKET_SIZES[0], False)
            peer = load_config(config).config.peers["receiver"]
            client = PeerClient(peer)
            cpu, bridge_cpu = resource.getrusage(resource.RUSAGE_SELF), bridge.cpu()
            try:
                with Store(self.data.cli.store, readonly=True) as store:
                    client.lookup([])  # opens the connection; the bridge checks the password once
                    started = time.perf_counter()
                    for item in wanted:
                        bucket = read_bucket(store, [Piece(item.id, item.sha256, item.size, 0, item.size)])
                        answer, _ = client.send_bucket(bucket, compress=False)
                        if answer.get("stored") != [item.id] or answer.get("failed") or answer.get("damaged"):
                            raise CannotRun(f"naive {label}: instance {item.id} not stored: {json.dumps(answer)[:500]}")
                    seconds = time.perf_counter() - started
            except DicomfsError as error:
                raise CannotRun(f"naive {label}: {error}") from None
            finally:
                client.close()
            after = resource.getrusage(resource.RUSAGE_SELF)
            own_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
            bridge_cpu = bridge.cpu() - bridge_cpu
            connections = proxy.connections
        return Measured(seconds, count, sum(w.size for w in wanted), {
            "through_proxy": through_proxy, "cpu_client_and_proxy": own_cpu, "cpu_bridge": bridge_cpu,
            "connections": connections, "ms_per_request": seconds / count * 1e3})


# -- the run --------------------------------------------------------------------------------------


def prepare(command: list[str], workdir: Path, quick: bool) -> Data:
    started = time.perf_counter()
    corpus = write_corpus(workdir / "src", patients=8 if quick else 20, studies_per_patient=2, series_per_study=2,
                          instances_per_series=25, pixels=64, seed=47)
    sizes = sum(f.size for f in corpus.files)
    progress(f"data: {len(corpus.files):,} instances ({sizes / 1e6:.1f} MB, ~{sizes / len(corpus.files) / 1e3:.1f} kB "
             f"each), written in {time.perf_counter() - started:.1f} s")
    config = workdir / "sender.toml"
    config.write_text('[storage]\ncompression = "none"\n')
    cli = Dicomfs(command, workdir / "sender", config)
    cli.run("init")
    started = time.perf_counter()
    cli.run("ingest", "--quiet", str(corpus.root), timeout=LONG)
    with Store(cli.store, readonly=True) as store:
        found = tuple(Wanted(r.id, r.sha256, r.size) for r in store.walk(Level.INSTANCE) if isinstance(r, Instance))
    if len(found) != len(corpus.files):
        raise CannotRun(f"the sender store holds {len(found)} instances, expected {len(corpus.files)}")
    shutil.rmtree(corpus.root)  # only the store is read from now on
    progress(f"  ingested into the sender store in {time.perf_counter() - started:.1f} s")
    return Data(cli, tuple(sorted({f.patient_id for f in corpus.files})), found)


def show_send(label: str, m: Measured) -> None:
    e = m.extra
    gzip_part = f", gzip ratio {e['gzip_ratio']:.2f}" if e["gzip"] else ""
    progress(f"  {label:<26} {m.seconds:6.2f} s = {m.per_second:6.0f} inst/s {m.mbps:6.1f} MB/s (job's own "
             f"{e['job_seconds']:.2f} s; start-up {e['startup']:.2f} s, claim {e['claim']:.2f} s, tail {e['tail']:.2f} s; "
             f"{e['buckets']} buckets, {e['connections']} connections{gzip_part}; CPU command {e['cpu_command']:.1f} s, "
             f"bridge {e['cpu_bridge']:.1f} s)")


def show_naive(label: str, m: Measured) -> None:
    e = m.extra
    progress(f"  {label:<26} {m.seconds:6.2f} s = {m.per_second:6.0f} inst/s {m.mbps:6.1f} MB/s ({m.count} instances, "
             f"{e['ms_per_request']:.1f} ms per request; CPU client+proxy {e['cpu_client_and_proxy']:.1f} s, "
             f"bridge {e['cpu_bridge']:.1f} s)")


def measure(command: list[str], workdir: Path, rows: list[Row], *, quick: bool) -> None:
    data = prepare(command, workdir, quick)
    bench = Bench(command, workdir, data, secrets.token_urlsafe(18))

    proxied, direct = bench.delay_probe()
    progress(f"  proxy sanity: GET /transfers/ median {proxied:.1f} ms through the proxy, {direct:.1f} ms direct: "
             f"+{proxied - direct:.1f} ms added (wanted +{DELAY * 1e3:.0f} ms)")
    rows.append(Row("link", f"GET /transfers/ through the proxy vs direct (median of {DELAY_PROBES}, ms)", proxied, "ms",
                    direct, higher_is_better=False, detail={"added_ms": proxied - direct, "delay_ms": DELAY * 1e3}))

    naive_count = min(NAIVE_QUICK, data.count) if quick else data.count
    sends: dict[tuple[int, bool], Measured] = {}
    naive: dict[bool, Measured] = {}
    # Naive and bucketed runs interleaved, so both meet the same drift of the machine.
    plan: list[tuple[str, int, bool]] = [("send", BUCKET_SIZES[0], False), ("naive", 0, True),
                                         ("send", BUCKET_SIZES[1], False), ("send", BUCKET_SIZES[0], True),
                                         ("naive", 0, False), ("send", BUCKET_SIZES[1], True)]
    for kind, bucket_size, flag in plan:
        if kind == "send":
            label = f"send {bucket_size >> 20} MiB{' gzip' if flag else ''}"
            sends[bucket_size, flag] = m = bench.send(label.replace(" ", "-"), bucket_size, flag)
            show_send(label, m)
        else:
            label = f"naive {'through proxy' if flag else 'no proxy'}"
            naive[flag] = m = bench.naive(label.replace(" ", "-"), naive_count, through_proxy=flag)
            show_naive(label, m)

    reference = naive[True]
    of = f" (naive: first {naive_count} of {data.count} timed)" if naive_count < data.count else ""
    best_size = min(BUCKET_SIZES, key=lambda size: sends[size, False].seconds)
    best = sends[best_size, False]
    detail = {"sends": {f"{size >> 20}MiB{'-gzip' if z else ''}": {"seconds": m.seconds, **m.extra}
                        for (size, z), m in sends.items()},
              "naive": {("proxy" if p else "direct"): asdict(m) for p, m in naive.items()},
              "instances": data.count, "bytes": data.size, "workers": WORKERS, "delay_ms": DELAY * 1e3}
    rows.append(Row("transfer", f"dicomfs send, {data.count} inst, {WORKERS} workers, best bucket ({best_size >> 20} MiB), "
                    f"command start to end vs naive 1 request/instance, both +20 ms{of}", best.per_second, "inst/s",
                    reference.per_second, limit=SEND_VS_NAIVE, detail=detail))
    rows.append(Row("transfer", "  the same in MB/s", best.mbps, "MB/s", reference.mbps))
    for (size, gzip_on), m in sends.items():
        name = f"{size >> 20} MiB buckets" + (f", gzip (ratio {m.extra['gzip_ratio']:.2f})" if gzip_on else "")
        rows.append(Row("transfer", f"  send {name}: command start to end", m.per_second, "inst/s", reference.per_second))
        rows.append(Row("transfer", f"  send {name}: the job's own duration", m.count / float(m.extra["job_seconds"]),
                        "inst/s", reference.per_second))
    rows.append(Row("naive", "naive through the proxy vs without it (what the 20 ms cost)", reference.per_second, "inst/s",
                    naive[False].per_second))
    ratios = [m.extra["gzip_ratio"] for (_, z), m in sends.items() if z]
    progress("\ngzip ratio on the corpus (content_bytes / wire_bytes): "
             + ", ".join(f"{r:.2f}" for r in ratios if isinstance(r, float)))


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = options(__doc__.splitlines()[0] if __doc__ else None,
                     f"800 instances instead of 2,000; the naive runs time the first {NAIVE_QUICK} only")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    workdir = work_folder(parser, args, "transfers")
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "dicomfs": shlex.join(command), "workdir": str(workdir), "quick": args.quick,
               "delay_ms": DELAY * 1e3, "workers": WORKERS}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    status = 0
    try:
        measure(command, workdir, rows, quick=args.quick)
    except (CannotRun, subprocess.SubprocessError, OSError) as error:
        print(f"cannot run: {error}", file=sys.stderr, flush=True)
        status = 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(args, machine, rows, status, started, print_report)


if __name__ == "__main__":
    sys.exit(main())
