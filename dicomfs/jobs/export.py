"""The export job: send instances to a DICOMweb archive with STOW-RS, as dcm4chee's STOW-RS exporter does.

The job's items are instance ids. Up to ``concurrency`` requests of ``instances_per_request``
pending instances each are in flight at any time (the last ones smaller, so that they end
together), and the job records per instance what the archive answered: acknowledged (never sent
again, even after a restart), failed for good (with the archive's FailureReason), or, when the
archive could not be reached or answered 5xx, nothing at all: the job is deferred and those
instances go again on the next attempt. Answers are recorded together, within a quarter of a
second, and at once when the job stops, pauses or ends: only a crash in between sends what was
acknowledged again (archives answer it as stored).

An instance is sent as stored when its transfer syntax is acceptable to the destination;
otherwise it is decoded to Explicit (or Implicit) VR Little Endian first (``transcode``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Callable, Iterator, Mapping, Sequence

from dicomfs.config import Destination
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.jobs.model import QUEUED_UNDER, Job
from dicomfs.jobs.runner import JobWork, TransientJobError
from dicomfs.jobs.schedule import target_waiting
from dicomfs.jobs.stowrs import Outgoing, StowClient, StowRefusedError, StowTarget, StowTransientError
from dicomfs.store import Instance, Store

__all__ = ["StowExporter"]

_CHUNK = 1 << 20
# The longest an acknowledged instance waits to be recorded while the job goes on; a crash within
# it sends those instances again, which archives answer as stored.
_RECORD_EVERY = 0.25
_log = logging.getLogger("dicomfs.jobs")


class StowExporter:
    """The executor of ``export`` jobs (see ``jobs.runner.Executor``)."""

    def __init__(self, store: Store, destinations: Mapping[str, Destination],
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.store = store
        self.destinations = destinations
        self._clock = clock

    def waiting_for(self, job: Job) -> str | None:
        return target_waiting("destination", self.destinations, job.params.get("destination"), self._clock(),
                              job.params.get(QUEUED_UNDER))

    def run(self, job: Job, work: JobWork) -> None:
        destination = self.destinations[job.params["destination"]]
        target = StowTarget(url=destination.url, authorization=destination.authorization(), chunked=destination.chunked,
                            tls_verify=destination.tls_verify, tls_verify_hostname=destination.tls_verify_hostname,
                            tls_ca_file=destination.tls_ca_file or None, timeout=float(destination.timeout))
        accepted = _accepted(destination.transfer_syntaxes)
        per_request, concurrency = destination.instances_per_request, destination.concurrency
        client = StowClient(target)
        try:
            self._pipeline(work, client, accepted, per_request, concurrency, destination.name)
        finally:
            client.close()

    def _pipeline(self, work: JobWork, client: StowClient, accepted: frozenset[str], per_request: int,
                  concurrency: int, name: str) -> None:
        """Send the pending items, ``concurrency`` requests in flight, until none is left or the
        job must stop; TransientJobError when the archive could not be reached."""
        # Requests are pipelined: a new one starts as soon as one ends, so `concurrency` stay in
        # flight while answers are recorded (a step-by-step barrier left ~15% of the time idle).
        in_flight: dict[Future[tuple[list[str], list[tuple[str, str]]]], list[str]] = {}
        sending: set[str] = set()  # in flight, or answered and not yet recorded: not to be taken again
        answered: list[tuple[list[str], tuple[list[str], list[tuple[str, str]]]]] = []
        transient: StowTransientError | None = None
        recorded = time.monotonic()
        with ThreadPoolExecutor(concurrency, thread_name_prefix=f"export-{name}") as pool:
            while True:
                going = transient is None and work.keep_going()
                if going:
                    for batch in _next_batches(work, sending, per_request, concurrency, concurrency - len(in_flight)):
                        in_flight[pool.submit(self._send, client, accepted, batch)] = batch
                        sending.update(batch)
                # Answers are recorded once the freed slots are busy again, and together, at most
                # every _RECORD_EVERY while sending goes on: each record is a commit with an fsync
                # (milliseconds, far more on a busy disk) that would otherwise leave a slot idle
                # after every answer, and that competes with the archive's own writes when it
                # shares the disk. A stop, a pause, an error or the end records at once.
                if answered and (not going or not in_flight or time.monotonic() - recorded >= _RECORD_EVERY):
                    work.record([item for _, (done, _) in answered for item in done],
                                [item for _, (_, failed) in answered for item in failed])
                    for batch, _ in answered:
                        sending.difference_update(batch)
                    answered = []
                    recorded = time.monotonic()
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = in_flight.pop(future)
                    try:
                        answered.append((batch, future.result()))
                    except StowTransientError as error:
                        transient = error  # nothing of that request counts as sent: it goes again
                        sending.difference_update(batch)
        if transient is not None:
            raise TransientJobError(f"{name}: {transient}")

    def _send(self, client: StowClient, accepted: frozenset[str],
              batch: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Send one request; (acknowledged items, failed items with reasons)."""
        failed: list[tuple[str, str]] = []
        outgoing: list[Outgoing] = []
        by_uid: dict[str, str] = {}
        for item in batch:
            try:
                prepared = self._prepare(item, accepted)
            except NotFoundError:
                failed.append((item, "deleted from the store after the export was queued"))
                continue
            except DicomfsError as error:
                failed.append((item, str(error)))
                continue
            outgoing.append(prepared)
            by_uid[prepared.sop_instance_uid] = item
        if not outgoing:
            return [], failed
        try:
            response = client.send(outgoing)
        except StowRefusedError as error:  # the whole request refused (credentials, a wrong URL): a person must act
            return [], failed + [(item, str(error)) for item in by_uid.values()]
        done = []
        for uid, item in by_uid.items():
            result = response.results.get(uid)
            if result is not None and result.ok:
                done.append(item)
            else:
                failed.append((item, result.reason if result is not None else "not in the archive's answer"))
        return done, failed

    def _prepare(self, item: str, accepted: frozenset[str]) -> Outgoing:
        record = self.store.get(item)
        if not isinstance(record, Instance):
            raise NotFoundError(f"{item} is not an instance")
        if accepted:  # pydicom is imported only for a destination that names its syntaxes
            from dicomfs.jobs.transcode import choose_syntax, transcoded

            syntax = choose_syntax(record.transfer_syntax, accepted)
            if syntax is not None:
                with self.store.open_instance(item) as reader:
                    data = transcoded(b"".join(reader.iter_chunks(_CHUNK)), syntax)
                return Outgoing.from_bytes(record.sop_uid, record.sop_class_uid, data)
        # As stored, streamed a megabyte at a time.
        return Outgoing(record.sop_uid, record.sop_class_uid, record.size, lambda: self._stream(item))

    def _stream(self, item: str) -> Iterator[bytes]:
        with self.store.open_instance(item) as reader:
            yield from reader.iter_chunks(_CHUNK)


def _next_batches(work: JobWork, sending: set[str], per_request: int, concurrency: int, free: int) -> list[list[str]]:
    """The batches for ``free`` idle slots, from the pending items not in ``sending``.

    A batch holds ``per_request`` items until fewer than ``concurrency`` full batches are left;
    then what is left is shared out over the slots, so that the last requests end together rather
    than one slot sending a last full batch while the others idle (20 large instances, 2 a
    request, 4 at a time: 3 rounds of requests for the 2.5 rounds of work there were).
    """
    if free <= 0:
        return []
    waiting = [item for item, _ in work.pending(per_request * free + len(sending)) if item not in sending]
    left = work.job.pending_items - len(sending)  # all of them, not only those just read
    size = min(per_request, max(1, -(-left // concurrency)))
    return [waiting[start:start + size] for start in range(0, min(len(waiting), size * free), size)]


def _accepted(syntaxes: Sequence[str]) -> frozenset[str]:
    """The destination's transfer syntaxes as UIDs; pydicom is imported (~0.4 s) only when there are some."""
    if not syntaxes:
        return frozenset()
    from dicomfs.jobs.transcode import parse_syntaxes

    return parse_syntaxes(syntaxes)
