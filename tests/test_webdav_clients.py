"""Real WebDAV clients against a real ``dicomfs webdav`` on 127.0.0.1: litmus (the protocol
suites), a davfs2 mount, rclone, cadaver and curl. Each test skips, saying why, only when its client
is not installed (``scripts/setup`` installs them all)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote

import pytest

from dicomfs.samples import Corpus, SampleFile, write_corpus
from tests.conftest import run_cli
from tests.webdav_server import Server, serve

pytestmark = pytest.mark.slow

DAV = "{DAV:}"
LITMUS_SUITES = ("basic", "copymove", "props", "locks", "http")


def need(program: str, package: str) -> str:
    """The full path of a client program, or skip the test saying which package brings it."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        pytest.skip(f"{program} is not installed: scripts/setup installs it (apt-get install {package})")
    return found


def archive(folder: Path, seed: int) -> tuple[Path, Corpus]:
    """A fresh store holding a small corpus: 2 studies of 1 series of 3 instances."""
    store = folder / "store"
    run_cli("init", store=store, check=True)
    corpus = write_corpus(folder / f"corpus{seed}", patients=1, studies_per_patient=2, series_per_study=1,
                          instances_per_series=3, seed=seed)
    run_cli("ingest", str(corpus.root), store=store, check=True)
    return store, corpus


def fresh_files(folder: Path, seed: int, per_series: int = 3) -> Corpus:
    """DICOM files the store does not hold yet (their own UIDs): 1 study of 2 series."""
    return write_corpus(folder, patients=1, studies_per_patient=1, series_per_study=2, instances_per_series=per_series, seed=seed)


def uid_path(sample: SampleFile) -> str:
    return f"by-uids/{sample.study_uid}/{sample.series_uid}/{sample.sop_uid}.dcm"


@contextlib.contextmanager
def bridge(store: Path) -> Iterator[Server]:
    """The bridge over ``store``; when the block ends, its log must show no error."""
    with serve(store) as server:
        yield server
        log = server.log.read_text()  # (the file goes with the server)
        assert not re.search(r" (ERROR|CRITICAL) |Traceback", log), log[-3000:]


def listing(server: Server, path: str) -> dict[str, int | None]:
    """The members of the folder at ``path`` (a PROPFIND, Depth 1): name -> size, None for folders."""
    answer = server.request("PROPFIND", path, headers={"Depth": "1"})
    assert answer.status == 207, (path, answer.status, answer.body[:300])
    members: dict[str, int | None] = {}
    for response in ET.fromstring(answer.body).iter(DAV + "response"):
        href = unquote(response.findtext(DAV + "href") or "")
        if href.rstrip("/") == unquote(path).rstrip("/"):
            continue
        length = response.findtext(f".//{DAV}getcontentlength")
        members[href.rstrip("/").rsplit("/", 1)[-1]] = None if href.endswith("/") else int(length or -1)
    return members


def stored_instances(server: Server) -> dict[str, int]:
    """Every instance the server lists under by-uids/: ``study/series/sop.dcm`` -> size."""
    found: dict[str, int] = {}
    for study in (name for name, size in listing(server, "/by-uids/").items() if size is None):
        for series in (name for name, size in listing(server, f"/by-uids/{study}/").items() if size is None):
            for name, size in listing(server, f"/by-uids/{study}/{series}/").items():
                if name.endswith(".dcm"):
                    assert size is not None
                    found[f"{study}/{series}/{name}"] = size
    return found


def expected_instances(*corpora: Corpus) -> dict[str, int]:
    return {uid_path(f).removeprefix("by-uids/"): f.size for corpus in corpora for f in corpus.valid_files}


def upload_files(store: Path) -> list[Path]:
    """What is left in the store's uploads/ folder."""
    return sorted(p for p in (store / "uploads").rglob("*") if p.is_file())


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.1)


# -- litmus ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_litmus_passes_every_test_of_every_suite_in_uploads(tmp_path: Path) -> None:
    litmus = need("litmus", "litmus")
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    with bridge(store) as server:
        # litmus makes (and removes) its own collection "litmus/" under the URL it is given.
        assert server.request("MKCOL", "/uploads/litmus/").status == 201
        done = subprocess.run([litmus, "-k", server.url + "uploads/litmus/"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=150)
    output = done.stdout + done.stderr
    summaries = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(
        r"<- summary for `(\w+)': of (\d+) tests run: (\d+) passed, (\d+) failed", output)}
    failures = "\n".join(line for line in output.splitlines() if "FAIL" in line or "WARNING" in line)
    assert set(summaries) == set(LITMUS_SUITES), output[-3000:]
    for suite, (run, passed, failed) in summaries.items():
        assert failed == 0 and passed == run, f"litmus {suite}: {passed}/{run} passed\n{failures}"
    # Nothing skipped: props runs all 30 (a failed propset skips 16), locks all 41 (needs class 2).
    assert summaries["props"][0] >= 30 and summaries["locks"][0] >= 41, summaries
    assert "skipped" not in output.lower() and "WARNING" not in output, failures or output[-3000:]
    assert done.returncode == 0, output[-3000:]


# -- davfs2 ----------------------------------------------------------------------------------------


def unmount(mountpoint: Path) -> None:
    """Unmount a davfs2 mount, waiting for it to write back; by force if it will not go."""
    if not os.path.ismount(mountpoint):
        return
    try:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pass
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
    pid_file = Path("/var/run/mount.davfs") / (str(mountpoint).strip("/").replace("/", "-") + ".pid")
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)  # only ever this mount's own daemon


@contextlib.contextmanager
def davfs2_mounted(url: str) -> Iterator[Path]:
    """A davfs2 mount of the bridge at ``url`` (anonymous, with locks, as Linux users set it up),
    unmounted at the end; skips where davfs2 cannot mount here."""
    mount_davfs = need("mount.davfs", "davfs2")
    if os.geteuid() != 0:
        pytest.skip("mounting davfs2 without an fstab entry needs root")
    try:
        davfs2_group = grp.getgrnam("davfs2").gr_gid
    except KeyError:
        pytest.skip("the davfs2 group is missing (the davfs2 package makes it)")
    # davfs2 drops to its own user: pytest's tmp_path (mode 700) is out of its reach.
    work = Path(tempfile.mkdtemp(prefix="dicomfs-davfs2-"))
    try:
        work.chmod(0o755)
        mnt, cache = work / "mnt", work / "cache"
        mnt.mkdir()
        cache.mkdir()
        os.chown(cache, 0, davfs2_group)
        cache.chmod(0o775)  # davfs2 wants root:davfs2 775 when run as root
        secrets = work / "secrets"
        secrets.write_text(f'{mnt} "" ""\n')  # anonymous
        secrets.chmod(0o600)
        conf = work / "davfs2.conf"
        # buf_size 64: Linux >= 6.16 fails davfs2's readdir with the default (davfs2 issue #22).
        conf.write_text(f"secrets {secrets}\ncache_dir {cache}\nask_auth 0\nuse_locks 1\ndelay_upload 0\nbuf_size 64\n")
        try:
            mounted = subprocess.run([mount_davfs, "-o", f"conf={conf}", url, str(mnt)],
                                     capture_output=True, text=True, timeout=60)
            assert mounted.returncode == 0 and os.path.ismount(mnt), mounted.stderr
            yield mnt
        finally:
            unmount(mnt)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(240)
def test_davfs2_mount_lists_reads_uploads_and_deletes(tmp_path: Path) -> None:
    store, corpus = archive(tmp_path, seed=21)
    new = fresh_files(tmp_path / "new", seed=22).valid_files[0]
    with bridge(store) as server, davfs2_mounted(server.url) as mnt:
        # ls: the folders are the stored UIDs, and nothing else.
        by_uids = mnt / "by-uids"
        assert sorted(os.listdir(by_uids)) == sorted({f.study_uid for f in corpus.valid_files})
        for sample in corpus.valid_files:
            series = by_uids / sample.study_uid / sample.series_uid
            assert sorted(os.listdir(series)) == sorted(
                [f"{f.sop_uid}.dcm" for f in corpus.valid_files if f.series_uid == sample.series_uid] + ["series.json"])
            assert "study.json" in os.listdir(by_uids / sample.study_uid)
            # cat: the very bytes that were ingested
            assert (by_uids / uid_path(sample).removeprefix("by-uids/")).read_bytes() == sample.path.read_bytes()

        # cp into uploads/: stored, then gone from uploads/
        shutil.copyfile(new.path, mnt / "uploads" / "from-davfs2.dcm")
        wait_for(lambda: server.request("GET", "/" + uid_path(new)).status == 200, "the copy is stored")
        assert server.request("GET", "/" + uid_path(new)).body == new.path.read_bytes()
        wait_for(lambda: "from-davfs2.dcm" not in listing(server, "/uploads/"), "the copy leaves uploads/")
        assert server.request("GET", "/uploads/from-davfs2.dcm").status == 404
        assert upload_files(store) == []

        # rm of an instance deletes it from the store (delete_allowed is the default)
        doomed = corpus.valid_files[0]
        (mnt / uid_path(doomed)).unlink()
        assert server.request("GET", "/" + uid_path(doomed)).status == 404
        assert stored_instances(server) == {
            **{k: v for k, v in expected_instances(corpus).items() if k != uid_path(doomed).removeprefix("by-uids/")},
            uid_path(new).removeprefix("by-uids/"): new.size}
        assert f"{doomed.sop_uid}.dcm" not in os.listdir(mnt / "by-uids" / doomed.study_uid / doomed.series_uid)
    assert not os.path.ismount(mnt)


# -- rclone ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_rclone_lists_uploads_and_copies_out(tmp_path: Path) -> None:
    rclone = need("rclone", "rclone")
    store, corpus = archive(tmp_path, seed=31)
    new = fresh_files(tmp_path / "new", seed=32, per_series=6)  # each file read back by rclone after its PUT
    with bridge(store) as server:
        conf = tmp_path / "rclone.conf"
        conf.write_text(f"[dicomfs]\ntype = webdav\nurl = {server.url}\nvendor = other\n")
        base = [rclone, "--config", str(conf), "--cache-dir", str(tmp_path / "rclone-cache"), "--retries", "1",
                "--low-level-retries", "1", "--contimeout", "10s", "--timeout", "30s"]

        def run(*args: str) -> str:
            done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and "ERROR" not in done.stderr, (args, done.stderr[-3000:])
            return done.stdout

        # lsjson: every instance at its UID path, with its exact size
        entries = json.loads(run("lsjson", "-R", "--max-depth", "3", "--files-only", "dicomfs:by-uids"))
        assert {e["Path"]: e["Size"] for e in entries if e["Path"].endswith(".dcm")} == expected_instances(corpus)
        assert sorted(e["Name"] for e in entries if not e["Path"].endswith(".dcm")) == ["series.json"] * 2 + ["study.json"] * 2

        # copy a folder tree of new files into uploads/: every one stored, none left behind
        run("copy", str(new.root), "dicomfs:uploads/batch")
        everything = expected_instances(corpus, new)
        wait_for(lambda: stored_instances(server) == everything, "rclone's uploads are stored")
        wait_for(lambda: upload_files(store) == [], "uploads/ is empty")
        assert len(stored_instances(server)) == len(corpus.valid_files) + len(new.valid_files)

        # copy a study out: the bytes that went in
        study = new.valid_files[0].study_uid
        out = tmp_path / "out"
        run("copy", f"dicomfs:by-uids/{study}", str(out))
        copied = sorted(str(p.relative_to(out)) for p in out.rglob("*.dcm"))
        assert copied == sorted(f"{f.series_uid}/{f.sop_uid}.dcm" for f in new.valid_files)
        for f in new.valid_files:
            assert (out / f.series_uid / f"{f.sop_uid}.dcm").read_bytes() == f.path.read_bytes()

        # Why rclone's copy in works: right after each PUT it PROPFINDs the file (Depth 0) and fails
        # with "object not found" if it is gone. A stored upload still answers that for a moment.
        late = fresh_files(tmp_path / "late", seed=33, per_series=1).valid_files[0]
        assert server.request("PUT", "/uploads/late.dcm", late.path.read_bytes()).status == 201
        wait_for(lambda: server.request("GET", "/" + uid_path(late)).status == 200, "the PUT is stored")
        wait_for(lambda: "late.dcm" not in listing(server, "/uploads/"), "the PUT leaves uploads/")
        read_back = server.request("PROPFIND", "/uploads/late.dcm", headers={"Depth": "0"})
        assert read_back.status == 207
        assert ET.fromstring(read_back.body).findtext(f".//{DAV}getcontentlength") == str(late.size)
        assert server.request("GET", "/uploads/late.dcm").status == 404


# -- cadaver ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cadaver_opens_parenthesised_folders_lists_gets_and_puts(tmp_path: Path) -> None:
    cadaver = need("cadaver", "cadaver")
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    tricky = write_corpus(tmp_path / "tricky", patients=0, tricky=True, seed=51)
    run_cli("ingest", str(tricky.root), store=store, check=True)
    new = fresh_files(tmp_path / "new", seed=52, per_series=1).valid_files[0]
    local = tmp_path / "cadaver"
    local.mkdir()
    shutil.copyfile(new.path, local / "scan (1).dcm")
    patient, study = "TRICKY-EMPTY-VALUES - (no name)", "(no date) - (no description)"
    with bridge(store) as server:
        series = next(name for name, size in listing(server, f"/by-patients/{quote(patient)}/{quote(study)}/").items()
                      if size is None)
        assert "(" in series, series  # "CT - (no description)"
        instance = next(name for name in listing(server, f"/by-patients/{quote(patient)}/{quote(study)}/{quote(series)}/"))
        script = (f'cd by-patients\ncd "{patient}"\nls\ncd "{study}"\ncd "{series}"\nget "{instance}" got.dcm\n'
                  'cd /uploads\nput "scan (1).dcm"\nls\nquit\n')
        # cadaver reads its commands from stdin; HOME without a .netrc: the bridge has no users
        done = subprocess.run([cadaver, server.url], input=script, capture_output=True, text=True, cwd=local,
                              env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
        output = done.stdout + done.stderr
        assert "Could not access" not in output and "failed" not in output.lower(), output
        # cd into each parenthesised folder: cadaver's prompt is where it went
        assert f"dav:/by-patients/{patient}/{study}/{series}/> get" in output, output
        assert f"Listing collection `/by-patients/{patient}/': succeeded." in output, output
        assert f"Coll:   {study}" in output, output
        instance_path = f"/by-patients/{quote(patient)}/{quote(study)}/{quote(series)}/{quote(instance)}"
        assert (local / "got.dcm").read_bytes() == server.request("GET", instance_path).body
        wait_for(lambda: server.request("GET", "/" + uid_path(new)).status == 200, "cadaver's put is stored")
        assert server.request("GET", "/" + uid_path(new)).body == new.path.read_bytes()


# -- curl ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_curl_range_requests(tmp_path: Path) -> None:
    curl = need("curl", "curl")
    store, corpus = archive(tmp_path, seed=41)
    sample = corpus.valid_files[0]
    source = sample.path.read_bytes()
    size = len(source)
    assert size > 300

    def get(url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
        """curl's status, the answer's headers (lower-case names) and its body."""
        headers, body = tmp_path / "headers", tmp_path / "body"
        done = subprocess.run([curl, "-sS", "--max-time", "30", "-D", str(headers), "-o", str(body), "-w", "%{http_code}",
                               *args, url], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        fields: dict[str, str] = {}
        for line in headers.read_text().splitlines()[1:]:
            name, colon, value = line.partition(":")
            if colon:
                fields[name.strip().lower()] = value.strip()
        return int(done.stdout), fields, body.read_bytes()

    with bridge(store) as server:
        url = server.url + uid_path(sample)
        status, headers, body = get(url)
        assert (status, body, headers.get("accept-ranges")) == (200, source, "bytes")

        status, headers, body = get(url, "-r", "100-199")
        assert status == 206 and headers["content-range"] == f"bytes 100-199/{size}"
        assert body == source[100:200] and headers["content-length"] == "100"

        status, headers, body = get(url, "-r", "-50")
        assert status == 206 and headers["content-range"] == f"bytes {size - 50}-{size - 1}/{size}"
        assert body == source[-50:]

        status, headers, body = get(url, "-r", f"{size - 10}-{size + 100}")  # runs past the end: cut at the end
        assert status == 206 and body == source[-10:]

        status, headers, _ = get(url, "-r", f"{size + 10}-{size + 20}")  # starts past the end
        assert status == 416 and headers.get("content-range") == f"bytes */{size}"
