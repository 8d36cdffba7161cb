"""The export job: send instances to a DICOMweb archive with STOW-RS, as dcm4chee's STOW-RS exporter does.

The job's items are instance ids. Each step takes up to ``concurrency x instances_per_request``
pending instances, sends them in ``concurrency`` parallel requests, and records per instance
what the archive answered: acknowledged (never sent again, even after a restart), failed for good
(with the archive's FailureReason), or, when the archive could not be reached or answered 5xx,
nothing at all: the job is deferred and those instances go again on the next attempt.

An instance is sent as stored when its transfer syntax is acceptable to the destination;
otherwise it is decoded to Explicit (or Implicit) VR Little Endian first (``transcode``).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Callable, Iterator, Mapping, Sequence

from dicomfs.config import Destination
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.jobs.model import Job
from dicomfs.jobs.runner import JobWork, TransientJobError
from dicomfs.jobs.schedule import target_waiting
from dicomfs.jobs.stowrs import Outgoing, StowRefusedError, StowTarget, StowTransientError, send
from dicomfs.store import Instance, Store

__all__ = ["StowExporter"]

_CHUNK = 1 << 20
_log = logging.getLogger("dicomfs.jobs")


class StowExporter:
    """The executor of ``export`` jobs (see ``jobs.runner.Executor``)."""

    def __init__(self, store: Store, destinations: Mapping[str, Destination],
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.store = store
        self.destinations = destinations
        self._clock = clock

    def waiting_for(self, job: Job) -> str | None:
        return target_waiting("destination", self.destinations, job.params.get("destination"), self._clock())

    def run(self, job: Job, work: JobWork) -> None:
        destination = self.destinations[job.params["destination"]]
        target = StowTarget(url=destination.url, authorization=destination.authorization(), chunked=destination.chunked,
                            tls_verify=destination.tls_verify, tls_verify_hostname=destination.tls_verify_hostname,
                            tls_ca_file=destination.tls_ca_file or None, timeout=float(destination.timeout))
        accepted = _accepted(destination.transfer_syntaxes)
        per_request, concurrency = destination.instances_per_request, destination.concurrency
        # Requests are pipelined: a new one starts as soon as one ends, so `concurrency` stay in
        # flight while answers are recorded (a step-by-step barrier left ~15% of the time idle).
        in_flight: dict[Future[tuple[list[str], list[tuple[str, str]]]], list[str]] = {}
        sending: set[str] = set()
        transient: StowTransientError | None = None
        with ThreadPoolExecutor(concurrency, thread_name_prefix=f"export-{destination.name}") as pool:
            while True:
                if transient is None and work.keep_going():
                    free = concurrency - len(in_flight)
                    if free:
                        waiting = [item for item, _ in work.pending(per_request * free + len(sending)) if item not in sending]
                        for start in range(0, min(len(waiting), per_request * free), per_request):
                            batch = waiting[start:start + per_request]
                            in_flight[pool.submit(self._send, target, accepted, batch)] = batch
                            sending.update(batch)
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = in_flight.pop(future)
                    sending.difference_update(batch)
                    try:
                        done, failed = future.result()
                    except StowTransientError as error:
                        transient = error  # nothing of that request counts as sent: it goes again
                        continue
                    work.record(done, failed)
        if transient is not None:
            raise TransientJobError(f"{destination.name}: {transient}")

    def _send(self, target: StowTarget, accepted: frozenset[str],
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
            response = send(target, outgoing)
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


def _accepted(syntaxes: Sequence[str]) -> frozenset[str]:
    """The destination's transfer syntaxes as UIDs; pydicom is imported (~0.4 s) only when there are some."""
    if not syntaxes:
        return frozenset()
    from dicomfs.jobs.transcode import parse_syntaxes

    return parse_syntaxes(syntaxes)
