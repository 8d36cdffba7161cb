"""The job engine: persistence, leases, steering, retries with backoff, and its command line.

Jobs here are of a test kind whose executor acknowledges items itself: what is under test is the
engine (the STOW-RS export against a real archive is tests/test_export.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dicomfs.jobs.export import _next_batches
from dicomfs.jobs.model import EXPORT, Job, JobState
from dicomfs.jobs.runner import JobRunner, JobWork, RetryPolicy, TransientJobError
from dicomfs.jobs.storage import JobStateError, JobStore, LeaseLostError
from dicomfs.samples import Corpus
from tests.conftest import run_cli


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Acknowledger:
    """A job kind that 'sends' items by acknowledging them, failing those named in ``refuse``,
    and raising a transient error for its first ``outages`` runs."""

    def __init__(self, refuse: set[str] = frozenset(), outages: int = 0, step: int = 2) -> None:  # type: ignore[assignment]
        self.refuse, self.outages, self.step = refuse, outages, step
        self.sent: list[str] = []
        self.wait_reason: str | None = None

    def run(self, job: Job, work: JobWork) -> None:
        if self.outages:
            self.outages -= 1
            raise TransientJobError("the archive is down")
        while work.keep_going():
            pending = work.pending(self.step)
            if not pending:
                return
            items = [item for item, _ in pending]
            self.sent.extend(items)
            work.record([i for i in items if i not in self.refuse],
                        [(i, "refused by the archive") for i in items if i in self.refuse])

    def waiting_for(self, job: Job) -> str | None:
        return self.wait_reason


ITEMS = [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("a", 10)]


def test_a_job_runs_to_success_and_counts_exactly(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {"destination": "x"}, ITEMS, "four items")
    assert (job.total_items, job.total_bytes, job.state) == (4, 100, JobState.PENDING)  # "a" listed twice counts once
    kind = Acknowledger()
    ended = JobRunner(jobs, {"ack": kind}).run_once()
    assert ended is not None and ended.state is JobState.SUCCESS
    assert (ended.done_items, ended.done_bytes, ended.failed_items, ended.pending_items) == (4, 100, 0, 0)
    assert kind.sent == ["a", "b", "c", "d"]
    assert JobRunner(jobs, {"ack": kind}).run_once() is None  # nothing left to claim


def test_failed_items_fail_the_job_with_reasons_and_retry_sends_only_them(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {}, ITEMS, "with a refusal")
    kind = Acknowledger(refuse={"c"})
    ended = JobRunner(jobs, {"ack": kind}).run_once()
    assert ended is not None and ended.state is JobState.FAILURE and "1 of 4" in ended.last_error
    assert jobs.failures(job.id) == [("c", "refused by the archive")]
    retried = jobs.retry(job.id)
    assert retried.state is JobState.PENDING and retried.failed_items == 0 and retried.done_items == 3
    kind.refuse, kind.sent = set(), []
    ended = JobRunner(jobs, {"ack": kind}).run_once()
    assert ended is not None and ended.state is JobState.SUCCESS and kind.sent == ["c"]  # never the acknowledged ones


@pytest.mark.parametrize(("items", "in_flight", "concurrency", "per_request", "free", "sizes"), [
    (20, 0, 4, 2, 4, [2, 2, 2, 2]),  # plenty left: full batches
    (20, 0, 1, 16, 1, [16]),
    (6, 0, 4, 2, 4, [2, 2, 2]),  # the last ones shared out, none bigger than the rest
    (12, 6, 4, 2, 1, [2]),
    (9, 6, 4, 2, 1, [1]),  # 3 left beside those in flight: one each
    (3, 0, 4, 16, 4, [1, 1, 1]),
    (5, 5, 4, 2, 2, []),  # all in flight already
])
def test_export_batches_share_the_last_items_out(tmp_path: Path, items: int, in_flight: int, concurrency: int,
                                                 per_request: int, free: int, sizes: list[int]) -> None:
    jobs = JobStore(tmp_path / "jobs")
    names = [f"i{n:02d}" for n in range(items)]
    job = jobs.create(EXPORT, {}, [(name, 1) for name in names], "batches")
    work = JobWork(jobs, job, "me", 30.0, threading.Event())
    sending = set(names[:in_flight])
    batches = _next_batches(work, sending, per_request, concurrency, free)
    assert [len(batch) for batch in batches] == sizes
    assert [item for batch in batches for item in batch] == names[in_flight:in_flight + sum(sizes)]


def test_transient_errors_back_off_then_give_up(tmp_path: Path) -> None:
    clock = Clock()
    jobs = JobStore(tmp_path / "jobs", clock=clock)
    job = jobs.create("ack", {}, ITEMS, "flaky")
    runner = JobRunner(jobs, {"ack": Acknowledger(outages=3)}, retry=RetryPolicy(first_delay=2, max_delay=5, max_attempts=3))
    deferred = runner.run_once()
    assert deferred is not None and deferred.state is JobState.PENDING and deferred.next_attempt == clock.now + 2
    assert "the archive is down" in deferred.waiting_for
    assert runner.run_once() is None  # not due yet
    clock.now += 2
    assert runner.run_once().next_attempt == clock.now + 4  # type: ignore[union-attr]
    clock.now += 4
    failed = runner.run_once()
    assert failed is not None and failed.state is JobState.FAILURE and failed.last_error == "the archive is down"
    jobs.retry(job.id)
    assert runner.run_once().state is JobState.SUCCESS  # type: ignore[union-attr]


def test_a_lease_keeps_a_job_to_one_runner_until_it_runs_out(tmp_path: Path) -> None:
    clock = Clock()
    jobs = JobStore(tmp_path / "jobs", clock=clock)
    job = jobs.create("ack", {}, ITEMS, "leased")
    first = jobs.claim("runner-1", lease=30)
    assert first is not None and first.lease_owner == "runner-1"
    assert jobs.claim("runner-2", lease=30) is None
    jobs.record(job.id, "runner-1", done=["a"])
    clock.now += 31  # runner-1 died without renewing
    taken = jobs.claim("runner-2", lease=30)
    assert taken is not None and taken.lease_owner == "runner-2" and taken.done_items == 1
    with pytest.raises(LeaseLostError):
        jobs.record(job.id, "runner-1", done=["b"])
    assert [item for item, _ in jobs.pending_items(job.id, 10)] == ["b", "c", "d"]


def test_jobs_survive_reopening_and_resume_where_they_stopped(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {}, ITEMS, "interrupted")
    jobs.claim("old", lease=30)
    jobs.record(job.id, "old", done=["a", "b"])
    jobs.release(job.id, "old")  # the process stopped between two steps
    jobs.close()
    reopened = JobStore(tmp_path / "jobs")
    kind = Acknowledger()
    ended = JobRunner(reopened, {"ack": kind}).run_once()
    assert ended is not None and ended.state is JobState.SUCCESS and kind.sent == ["c", "d"]


def test_pause_resume_cancel_and_their_refusals(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {}, ITEMS, "steered")
    assert jobs.pause(job.id).state is JobState.PAUSED
    assert JobRunner(jobs, {"ack": Acknowledger()}).run_once() is None  # paused jobs are not claimed
    with pytest.raises(JobStateError):
        jobs.retry(job.id)
    assert jobs.resume(job.id).state is JobState.PENDING
    assert jobs.cancel(job.id).state is JobState.CANCELED
    with pytest.raises(JobStateError, match="cannot resume"):
        jobs.resume(job.id)


def test_a_running_job_stops_between_steps_when_paused(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {}, [(f"i{n}", 1) for n in range(10)], "long")
    entered, release = threading.Event(), threading.Event()

    class Slow(Acknowledger):
        def run(self, job: Job, work: JobWork) -> None:
            while True:
                entered.set()
                release.wait(5)
                work.lease = 0  # renew at every keep_going: the pause is seen at once
                if not work.keep_going():
                    return
                pending = work.pending(1)
                if not pending:
                    return
                work.record([pending[0][0]])

    runner = JobRunner(jobs, {"ack": Slow()})
    thread = threading.Thread(target=runner.run_once)
    thread.start()
    entered.wait(5)
    jobs.pause(job.id)
    release.set()
    thread.join(10)
    paused = jobs.get(job.id)
    assert paused.state is JobState.PAUSED and paused.done_items < 10 and paused.lease_owner == ""


def test_a_job_outside_its_window_waits_visibly(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs")
    job = jobs.create("ack", {}, ITEMS, "scheduled")
    kind = Acknowledger()
    kind.wait_reason = "outside pacs2's schedule (hour=18-6) until 2026-11-23 18:00"
    assert JobRunner(jobs, {"ack": kind}).run_once() is None
    assert jobs.get(job.id).waiting_for == kind.wait_reason
    kind.wait_reason = None
    assert JobRunner(jobs, {"ack": kind}).run_once().state is JobState.SUCCESS  # type: ignore[union-attr]


def test_jobs_command_lists_shows_and_steers(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    config = tmp_path / "dicomfs.toml"
    config.write_text('[destinations.pacs2]\ntype = "stowrs"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                      'bearer_token = "s3cret-token"\nschedule = "hour=25"\n')
    refused = run_cli("config", store=store, config=config)
    assert refused.returncode == 1 and "hour" in refused.stderr
    config.write_text('[destinations.pacs2]\ntype = "stowrs"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                      'bearer_token = "s3cret-token"\n')
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(small_corpus.root), store=store)
    unknown = run_cli("export", "--to", "nowhere", "PAT00001", store=store, config=config)
    assert unknown.returncode == 1 and "pacs2" in unknown.stderr
    queued = run_cli("export", "--to", "pacs2", "PAT00001", store=store, config=config, check=True)
    job_id = queued.stdout.split()[1].rstrip(":")
    shown = json.loads(run_cli("jobs", "show", job_id, store=store, config=config, check=True).stdout)
    expected = sum(1 for f in small_corpus.valid_files if f.patient_id == "PAT00001")
    assert shown["state"] == "pending" and 0 < shown["total_items"] <= expected
    assert "s3cret" not in json.dumps(shown) and "s3cret" not in run_cli("config", store=store, config=config).stdout
    assert "paused" in run_cli("jobs", "pause", job_id, store=store, config=config, check=True).stdout
    listed = run_cli("jobs", "ls", store=store, config=config, check=True).stdout
    assert job_id in listed and "paused" in listed
    assert run_cli("jobs", "retry", job_id, store=store, config=config).returncode == 1  # only failed or canceled
    assert "canceled" in run_cli("jobs", "cancel", job_id, store=store, config=config, check=True).stdout


def test_a_secret_is_read_only_when_something_is_sent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    config = tmp_path / "dicomfs.toml"
    config.write_text('[destinations.pacs2]\ntype = "stowrs"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                      'bearer_token_env = "DICOMFS_TEST_UNSET_TOKEN"\n')
    run_cli("init", store=store, check=True)
    assert run_cli("jobs", "ls", store=store, config=config).returncode == 0  # no secret needed to look
    shown = run_cli("config", store=store, config=config, check=True).stdout
    assert "bearer_token_env DICOMFS_TEST_UNSET_TOKEN" in shown
    refused = run_cli("export", "--to", "pacs2", "PAT00001", store=store, config=config)
    assert refused.returncode == 1 and "DICOMFS_TEST_UNSET_TOKEN is not set" in refused.stderr
    config.write_text('[destinations.pacs2]\ntype = "stowrs"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                      'bearer_token = "abc\\r\\nX-Evil: 1"\n')
    injected = run_cli("jobs", "ls", store=store, config=config)
    assert injected.returncode == 1 and "control characters" in injected.stderr and "X-Evil" not in injected.stderr


def test_routes_make_one_job_per_quiet_series_and_never_repeat(tmp_path: Path, small_corpus: Corpus) -> None:
    from dicomfs.config import Route
    from dicomfs.jobs.routes import Router
    from dicomfs.store import Instance, Series, Store
    from dicomfs.store.ids import Level

    clock = Clock()
    store = Store.create(tmp_path / "store")
    jobs = JobStore(tmp_path / "jobs", clock=clock)
    try:
        route = Route("pacs2", (("Modality", "ct"),), quiet_seconds=10)  # case does not matter
        router = Router(store, jobs, [route], lambda name: (EXPORT, {"destination": name}), owner="me", lease=60, clock=clock)
        assert router.step() == 0  # the first step only marks where routing starts
        list(store.ingest([small_corpus.root]))
        ct_series = {s.id for s in store.walk(Level.SERIES) if isinstance(s, Series) and s.modality == "CT"}
        assert ct_series, "the corpus should hold CT series"
        assert router.step() == 0  # gathering: the series are not quiet yet
        clock.now += 11
        assert router.step() == len(ct_series)
        exported = {item for job in jobs.all() for item, _ in jobs.pending_items(job.id, 10_000)}
        expected = {i.id for i in store.walk(Level.INSTANCE) if isinstance(i, Instance) and i.parent in ct_series}
        assert exported == expected and all(job.params["destination"] == "pacs2" for job in jobs.all())
        clock.now += 11
        assert router.step() == 0  # nothing new: nothing again
        other = Router(store, jobs, [route], lambda name: (EXPORT, {"destination": name}), owner="someone else", lease=60, clock=clock)
        assert other.step() == 0  # my lease holds
    finally:
        jobs.close()
        store.close()
