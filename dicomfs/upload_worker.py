"""The ingest of completed uploads, in a helper process of the front end's own.

Parsing, hashing, writing and committing an upload costs ~0.5 ms of Python per small file. Done
in a thread of the mount or the bridge, it held the GIL their request loop needs: while `cp -r`
of a CD was being ingested, each file's creation in the mount waited twice as long. The helper
opens the same store (several writers are safe: each has its own pending marks, see
``store.owners``) and runs ``UploadArea.ingest_many`` for the front end's queue, one group at a
time; its log lines come back with each answer and are logged by the front end.

If the helper dies, the group is given once more to a new one: what the dead one stored is
found stored again (or already gone from uploads/), so nothing is lost or counted twice. If the
fresh helper dies too, the files stay in uploads/ with the reason.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import multiprocessing
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping, Sequence

from dicomfs.childprocess import become_helper_of
from dicomfs.errors import DicomfsError
from dicomfs.logformat import EscapingFormatter
from dicomfs.store import Store
from dicomfs.store.committer import WriteSettings
from dicomfs.uploads import Stamp, UploadArea, UploadOutcome

__all__ = ["UploadIngester", "UploadIngesterError"]

_log = logging.getLogger(__name__)
_STOP_SECONDS = 60.0
"""How long a stopping front end waits for the helper to finish the group it is on."""


class UploadIngesterError(DicomfsError):
    """The helper could not ingest a group (it died twice, or the store refused the group)."""


class UploadIngester:
    """``UploadArea.ingest_many`` for one store, run in a helper process (started on first use,
    unless ``start`` was called; started again if it died).

    Not thread-safe: one queue thread calls it.
    """

    def __init__(self, store: Store, area: UploadArea) -> None:
        self._arguments = (str(store.folder), store.settings, dict(store.metadata_names),
                           dict(store.attachment_types), str(area.root))
        self._area = area
        self._process: Any = None  # a SpawnProcess: multiprocessing's types are not public
        self._connection: Connection | None = None

    def start(self) -> None:
        """Start the helper ahead of the first group, unless it runs."""
        if not self._alive():
            self._start()

    def ingest_many(self, batch: Sequence[Sequence[str]], stamps: Sequence[Stamp | None], *, origin: str,
                    remote: str = "") -> list[UploadOutcome]:
        """``UploadArea.ingest_many`` of ``batch`` (parts under uploads/) in the helper; the
        outcomes in batch order."""
        # with the level this process logs at now: the helper logs what would be logged here
        request = ([tuple(parts) for parts in batch], list(stamps), origin, remote, logging.getLogger().getEffectiveLevel())
        for attempt in (1, 2):
            connection = self._connection if self._alive() and self._connection is not None else self._start()
            try:
                connection.send(request)
                kind, payload, records = connection.recv()
            except (EOFError, OSError) as error:
                code = self._stop(kill=True)
                _log.warning("the upload ingest process ended (exit status %s) during a group of %d files%s",
                             code, len(batch), "; trying once more" if attempt == 1 else "")
                if attempt == 2:
                    raise UploadIngesterError(f"the ingest process ended twice ({error or 'exit status ' + str(code)})") from None
                continue
            for record in records:
                logging.getLogger(record.name).handle(record)
            if kind == "error":
                raise UploadIngesterError(payload)
            outcomes: list[UploadOutcome] = payload
            self._keep_reasons(batch, outcomes)
            return outcomes
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Let the helper finish and end (it ends with this process anyway)."""
        if self._alive():
            assert self._connection is not None
            try:
                self._connection.send(None)
            except OSError:
                pass
        self._stop(kill=False)

    def _alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> Connection:
        self._stop(kill=True)
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, os.getpid(), *self._arguments),
                                  name="dicomfs-upload-ingest", daemon=True)
        process.start()
        theirs.close()
        self._process, self._connection = process, ours
        _log.info("upload ingest process %d started", process.pid)
        return ours

    def _stop(self, *, kill: bool) -> int | None:
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if process is None:
            return None
        if kill:
            process.kill()
        process.join(None if kill else _STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
        code: int | None = process.exitcode
        return code

    def _keep_reasons(self, batch: Sequence[Sequence[str]], outcomes: list[UploadOutcome]) -> None:
        """Where uploads/ has no extended attributes, the helper could keep a file's reason only in
        its own memory: record it here, where ``reason`` is asked."""
        for parts, outcome in zip(batch, outcomes, strict=True):
            if not outcome.removed and outcome.reason:
                path = self._area.path(parts)
                if self._area.reason(path) is None:
                    try:
                        self._area.set_reason(path, outcome.reason)
                    except OSError:
                        pass  # gone meanwhile


class _Records(list[logging.LogRecord]):
    """A QueueHandler's queue: the records of the group being ingested, sent with its answer."""

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.append(record)

    def take(self) -> list[logging.LogRecord]:
        taken = list(self)
        self.clear()
        return taken


class _Forwarder(logging.handlers.QueueHandler):
    """Queues the helper's records for the front end, which formats them: the message with its
    arguments applied, and a traceback as text (what pickles), formatted as the front end's
    formatter would, rather than folded into the message, where it would be escaped to one line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = EscapingFormatter()


def _serve(connection: Connection, parent: int, folder: str, settings: WriteSettings,
           metadata_names: Mapping[str, int], attachment_types: Mapping[str, tuple[int, str]], root: str) -> None:
    """The helper: ingest each group the front end sends, until it sends None or goes."""
    become_helper_of(parent)
    records = _Records()
    logger = logging.getLogger()
    logger.handlers[:] = [_Forwarder(records)]  # type: ignore[arg-type]
    with Store(Path(folder), settings=settings, metadata_names=metadata_names,
               attachment_types=attachment_types) as store:
        area = UploadArea(Path(root))
        while True:
            try:
                request = connection.recv()
            except EOFError:
                return
            if request is None:
                return
            batch, stamps, origin, remote, log_level = request
            logger.setLevel(log_level)
            try:
                outcomes = area.ingest_many(store, batch, origin=origin, remote=remote, stamps=stamps)
            except Exception as error:  # a store error (a full disk): the front end keeps the files
                logging.getLogger(__name__).exception("ingest of %d uploaded files failed", len(batch))
                connection.send(("error", f"{type(error).__name__}: {error}" if not isinstance(error, DicomfsError)
                                 else str(error), records.take()))
                continue
            connection.send(("done", outcomes, records.take()))
