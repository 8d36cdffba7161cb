"""The virtual tree: folder listings made from the store's index, cached until the store changes.

A path is a tuple of names from the root, e.g. ``("by-uids", "1.2.3", "series.json")``. Each folder
entry carries a *node* saying what it lists (``("study", "by-patients", <study id>)``), so listing a
folder never needs its path's names parsed back. Listings are cached by path; when the store's
change number moves (``refresh``), the change log says which of them are stale (``freshness``) and
only those go. Front ends call ``refresh`` when they changed the store and on a timer for changes
made by other processes.

Siblings whose names collide are told apart by numbers the store keeps (see ``names``): a listing
reads its folder's with one range read (usually empty) and writes only when it first meets a
collision.

A folder is found by listing its parent, except a ``by-uids/<StudyInstanceUID>/`` whose name is
a plain UID that no other study's name can be confused with: that one comes from the UID index,
so opening one study of a million never lists them all.

The tree is safe to use from several threads: a listing is computed outside the lock and
published under it.
"""

from __future__ import annotations

import collections
import json
import mimetypes
import re
import threading
import time
from typing import Callable, Mapping, Sequence

from dicomfs.errors import NotFoundError
from dicomfs.jobs.model import Job
from dicomfs.jobs.storage import JobStore
from dicomfs.store import Attachment, Instance, Level, Patient, Record, ResourceId, Series, Store, Study
from dicomfs.store.blobs import BlobReader
from dicomfs.views.documents import series_document, study_document
from dicomfs.views.entries import Entry, EntryKind, Listing, Node
from dicomfs.views.freshness import listing_sources, touched
from dicomfs.views.names import MAX_NAME_BYTES, disambiguate, join_fields, number_siblings, safe_text

__all__ = ["ATTACHMENTS", "JOBS", "UPLOADS", "VIEWS", "NotAFolderError", "Path", "Tree", "attachment_mime", "attachment_sha256"]

Path = tuple[str, ...]
VIEWS = ("by-patients", "by-studies", "by-dates", "by-uids")
UPLOADS = "uploads"
JOBS = "jobs"
"""A read-only folder of ``<job id>.json`` files: what is queued, running and failed, for people browsing."""
_FAILURES_SHOWN = 1000
UNDATED = "unknown"
"""The by-dates folder of studies without a valid StudyDate (Orthanc leaves them out entirely)."""
STUDY_DOCUMENT, SERIES_DOCUMENT = "study.json", "series.json"
ATTACHMENTS = "attachments"
"""The read-only folder of a patient's, study's or series' attachments, shown only when it has one.
No sibling can take the name: those are joined fields (``A - B``) or UIDs."""
_ATTACHMENT = "attachment"
"""The node kind of an attachment file: (kind, resource id, attachment name, MIME type, sha256)."""
_EXTENSIONS = mimetypes.MimeTypes()
"""Python's own table, not /etc/mime.types: a name must not change with the machine that shows it."""
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
"""What an attachment's MIME type (``attach put --mime`` takes any text) must be to be sent as one."""
_CACHED_FOLDERS = 4096
_CHANGES_READ = 256
"""Commits a refresh reads the change log of to keep what they left exact; after more (a bulk
ingest, a long idle bridge) dropping every listing is cheaper than reading the log."""
_BY_UIDS = "by-uids"
"""The numbering context of by-uids/ (and, with an id, of the folders in it)."""
_PLAIN_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
"""A UID that is its own by-uids folder name: digits and dots, no dot at the end, so no case,
Unicode form, unsafe character or trimming changes it (see ``names``)."""
_READ_BETWEEN_RELEASES = 512
"""Records listings read before the store lets go of the index pages they mapped
(``Store.release_pages``, ~1 ms): each record read at random maps ~64-100 KiB, so this bounds what
listings add to a daemon's RSS (~50 MB) however large the archive, where a listing of every study
of a million instances added ~300 MB. Pages let go of stay in the page cache: reading them again
is cheap."""
_LONGEST_UID = 64
"""DICOM's limit; longer names are left to the listing, so only a padded UID (``_TRIMMED``) can
reach the 255 bytes at which names are cut."""
_TRIMMED = " .?"
"""What names lose at their ends (spaces, dots; ``?`` is any other character in the UID index):
a UID that is a plain one with these added may have the same folder name."""


class NotAFolderError(NotFoundError):
    """A path goes through (or lists) a file."""

    errno = 20  # ENOTDIR


class Tree:
    """The browsable tree of one store (see the package docstring for its shape)."""

    def __init__(self, store: Store, *, uploads: bool = True, jobs: JobStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.uploads = uploads
        self.jobs = jobs
        self._jobs_token = jobs.change_token() if jobs is not None else 0
        self._started = clock()
        self._lock = threading.Lock()
        # path -> (listing, its sources: see freshness); documents: node -> (content, sources)
        self._cache: collections.OrderedDict[Path, tuple[Listing, frozenset[str]]] = collections.OrderedDict()
        self._documents: dict[Node, tuple[bytes, frozenset[str]]] = {}
        self._change = store.change_number()
        self._reads = 0  # records read since the index pages were last let go of

    # -- freshness ---------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Drop the cached listings and documents the store's changes since made stale; True when
        the store changed.

        A change of the jobs alone drops only the ``jobs/`` folder (and says False: no stored
        resource changed)."""
        if self.jobs is not None:
            token = self.jobs.change_token()
            if token != self._jobs_token:
                with self._lock:
                    self._jobs_token = token
                    self._cache.pop((JOBS,), None)
                    for node in [n for n in self._documents if n[0] == "job-document"]:
                        del self._documents[node]
        since = self._change
        changed = self.store.changes_after(since, _CHANGES_READ)
        current = self.store.change_number() if changed is None else changed[0]
        with self._lock:
            if current == self._change:
                return False
            if since != self._change:  # refreshed meanwhile by another thread: that one is enough
                return True
            if changed is None:
                self._change = current
                self._cache.clear()
                self._documents.clear()
                return True
            self._change, changes = changed
            stale = touched(changes)
            for path in [p for p, (_, sources) in self._cache.items() if not sources.isdisjoint(stale)]:
                del self._cache[path]
            for node in [n for n, (_, sources) in self._documents.items() if not sources.isdisjoint(stale)]:
                del self._documents[node]
        return True

    @property
    def change_number(self) -> int:
        """The store change the cached listings show."""
        return self._change

    # -- paths -----------------------------------------------------------------------------------

    def listing(self, path: Sequence[str]) -> Listing:
        """The listing of the folder at ``path``; NotFoundError or NotAFolderError otherwise."""
        path = tuple(path)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None:
                self._cache.move_to_end(path)
                return cached[0]
        if path:
            entry = self.lookup(path)
            if not entry.is_folder:
                raise NotAFolderError(f"{'/'.join(path)} is a file, not a folder")
            node = entry.node
        else:
            node = ("root",)
        change = self._change
        listing = self._list_node(node)
        with self._lock:
            if change == self._change:  # not refreshed meanwhile: the listing is current
                documents = {e.node: self._documents[e.node][1] for e in listing.entries
                             if e.kind is EntryKind.DOCUMENT and e.node in self._documents}
                self._cache[path] = (listing, listing_sources(node, listing, documents))
                if len(self._cache) > _CACHED_FOLDERS:
                    self._cache.popitem(last=False)
        return listing

    def cached(self, path: Sequence[str]) -> Listing | None:
        """The listing of ``path`` if it is cached (a front end's event loop can use it without blocking)."""
        with self._lock:
            cached = self._cache.get(tuple(path))
        return None if cached is None else cached[0]

    def lookup(self, path: Sequence[str]) -> Entry:
        """The entry at ``path`` (which must not be the root); NotFoundError when there is none.

        From the parent's listing when it is cached or must be made; a plain UID's study folder
        in ``by-uids/`` from the UID index (see the module docstring)."""
        path = tuple(path)
        if not path:
            raise ValueError("the root has no entry; use root_entry()")
        parent = self.cached(path[:-1])
        if (parent is None and len(path) == 2 and path[0] == "by-uids" and len(path[1]) <= _LONGEST_UID
                and _PLAIN_UID.fullmatch(path[1])):
            studies = self.store.with_uid(path[1], Level.STUDY, padding=_TRIMMED, longest=MAX_NAME_BYTES)
            if studies is not None and len(studies) < 2:  # else names like "<uid> (2)" are in play
                if not studies:
                    raise NotFoundError(f"no {'/'.join(path)} in the tree")
                study = studies[0]
                if self.store.name_numbers(_BY_UIDS).get(study.id, 1) == 1:  # else it is "<uid> (n)" since a collision
                    return Entry(path[1], EntryKind.FOLDER, 0, study.last_update, ("study", "by-uids", study.id), study.id)
        found = (parent or self.listing(path[:-1])).find(path[-1])
        if found is None:
            raise NotFoundError(f"no {'/'.join(path)} in the tree")
        return found

    def root_entry(self) -> Entry:
        return Entry("", EntryKind.FOLDER, 0, self.listing(()).mtime, ("root",))

    def document(self, entry: Entry) -> bytes:
        """The content of a document entry (``study.json``, ``series.json``)."""
        with self._lock:
            cached = self._documents.get(entry.node)
        if cached is not None:
            return cached[0]
        kind, resource_id = entry.node[0], entry.node[-1]
        if kind == "job-document":
            assert self.jobs is not None
            return self._job_document(self.jobs.get(resource_id))
        if kind == "study-document":
            return self._study_document(resource_id, [r for r in self._children(resource_id) if isinstance(r, Series)])
        if kind == _ATTACHMENT:
            raise ValueError("an attachment is read with open_attachment, not whole")
        return self._series_document(resource_id, [r for r in self._children(resource_id) if isinstance(r, Instance)])

    def open_attachment(self, entry: Entry) -> BlobReader | None:
        """A reader of an attachment file's content (streamed from the store: an attachment can be
        large); None when ``entry`` is another document. NotFoundError when it is gone."""
        if entry.node[0] != _ATTACHMENT:
            return None
        return self.store.open_attachment(entry.node[1], entry.node[2])

    def _study_document(self, study_id: str, series: list[Series]) -> bytes:
        change = self._change
        study = self.store.find(study_id)
        if not isinstance(study, Study):
            raise NotFoundError(f"no study {study_id}")
        patient = self.store.find(study.parent)
        content = study_document(study, patient if isinstance(patient, Patient) else None, series, self.store.metadata(study_id))
        self._keep_document(("study-document", study_id), content, frozenset((study_id, study.parent, *(s.id for s in series))), change)
        return content

    def _series_document(self, series_id: str, instances: list[Instance]) -> bytes:
        change = self._change
        series = self.store.find(series_id)
        if not isinstance(series, Series):
            raise NotFoundError(f"no series {series_id}")
        content = series_document(series, instances, self.store.metadata(series_id))
        self._keep_document(("series-document", series_id), content, frozenset((series_id, *(i.id for i in instances))), change)
        return content

    def _keep_document(self, node: Node, content: bytes, sources: frozenset[str], change: int) -> None:
        """Cache a document read while the tree showed ``change``, unless a refresh came meanwhile
        (it could have been made from what that refresh found stale)."""
        with self._lock:
            if change == self._change:
                self._documents[node] = (content, sources)

    def _job_document(self, job: Job) -> bytes:
        assert self.jobs is not None
        data = self.jobs.report(job, most_failures=_FAILURES_SHOWN)
        content = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._documents[("job-document", job.id)] = (content, frozenset())  # dropped when the jobs change
        return content

    def _jobs(self) -> Listing:
        assert self.jobs is not None
        entries = []
        for job in self.jobs.all():
            content = self._job_document(job)
            entries.append(Entry(f"{job.id}.json", EntryKind.DOCUMENT, len(content), job.updated, ("job-document", job.id)))
        return Listing.of(entries, max((e.mtime for e in entries), default=self._started))

    # -- listing each kind of folder ---------------------------------------------------------------

    def _list_node(self, node: Node) -> Listing:
        kind = node[0]
        if kind == "root":
            return self._root()
        if kind == "view":
            return {"by-patients": self._patients, "by-studies": self._all_studies,
                    "by-dates": self._years, "by-uids": self._all_studies}[node[1]](node[1])
        if kind == "patient":
            return self._studies_of(node[1], node[2])
        if kind == "study":
            return self._series_of(node[1], node[2])
        if kind == "series":
            return self._instances_of(node[1], node[2])
        if kind == "year":
            return self._months(node[1])
        if kind == "month":
            return self._studies_on(node[1] + node[2][5:7])
        if kind == "undated":
            return self._studies_on("")
        if kind == ATTACHMENTS:
            return self._attachments(node[2])
        if kind == JOBS and self.jobs is not None:
            return self._jobs()
        raise NotFoundError(f"unknown folder kind {kind!r}")

    def _root(self) -> Listing:
        entries = [Entry(view, EntryKind.FOLDER, 0, self._started, ("view", view)) for view in VIEWS]
        if self.uploads:
            entries.append(Entry(UPLOADS, EntryKind.FOLDER, 0, self._started, ("uploads",)))
        if self.jobs is not None:
            entries.append(Entry(JOBS, EntryKind.FOLDER, 0, self._started, (JOBS,)))
        return Listing.of(entries, self._started)

    # -- reading the store, letting go of mapped pages as listings read -----------------------------

    def _children(self, parent: str | None) -> list[Record]:
        records = self.store.children(parent)
        self._count_reads(len(records))
        return records

    def _records(self, ids: Sequence[str]) -> list[Record]:
        """The records of ``ids`` that exist, read in batches with the mapped pages let go of between
        them: a view's root reads every patient or study."""
        found: list[Record] = []
        for start in range(0, len(ids), _READ_BETWEEN_RELEASES):
            batch = ids[start : start + _READ_BETWEEN_RELEASES]
            found += [r for r in self.store.records(batch) if r is not None]
            self._count_reads(len(batch))
        return found

    def _count_reads(self, count: int) -> None:
        with self._lock:
            self._reads += count
            release = self._reads >= _READ_BETWEEN_RELEASES
            if release:
                self._reads = 0
        if release:
            self.store.release_pages()

    def _patients(self, view: str) -> Listing:
        patients = [r for r in self._records(self.store.child_ids(None)) if isinstance(r, Patient)]
        names = self._names(view, patients, [(_patient_name(p), "") for p in patients], [(p.created, p.patient_id) for p in patients])
        return self._folders(view, "patient", patients, names)

    def _studies_of(self, view: str, patient_id: str) -> Listing:
        studies = [r for r in self._children(patient_id) if isinstance(r, Study)]
        names = self._names(f"{view}/{patient_id}", studies, [(_dated_study_name(s), "") for s in studies],
                            [(s.created, s.study_uid) for s in studies])
        return self._with_attachments(self._folders(view, "study", studies, names), view, patient_id)

    def _all_studies(self, view: str) -> Listing:
        return self._study_folders(view, view, self._with_patients([study_id for _, study_id in self.store.studies_by_date()]))

    def _with_patients(self, study_ids: list[ResourceId]) -> list[tuple[Patient, Study]]:
        """(patient, study) of each of these studies whose patient exists. Callers find every study
        through the date index, which holds them in a few pages, rather than through each patient's
        links: one random read less per patient."""
        studies = [s for s in self._records(study_ids) if isinstance(s, Study)]
        patients = {p.id: p for p in self._records(list(dict.fromkeys(s.parent for s in studies))) if isinstance(p, Patient)}
        return [(patients[s.parent], s) for s in studies if s.parent in patients]

    def _study_folders(self, view: str, context: str, pairs: list[tuple[Patient, Study]]) -> Listing:
        studies = [study for _, study in pairs]
        if view == "by-uids":
            stems = [(safe_text(s.study_uid) or "(no uid)", "") for s in studies]
        else:
            stems = [(_patient_study_name(p, s), "") for p, s in pairs]
        names = self._names(context, studies, stems, [(s.created, s.study_uid, s.id) for s in studies])
        return self._folders(view, "study", studies, names)

    def _series_of(self, view: str, study_id: str) -> Listing:
        series = [r for r in self._children(study_id) if isinstance(r, Series)]
        if view == "by-uids":
            stems = [(safe_text(s.series_uid) or "(no uid)", "") for s in series]
        else:
            stems = [(_series_name(s), "") for s in series]
        # One name in by-patients, by-studies and by-dates (same siblings, same stems): one context.
        context = f"{_BY_UIDS}/{study_id}" if view == "by-uids" else f"series/{study_id}"
        names = self._names(context, series, stems, [(s.created, s.series_uid) for s in series])
        listing = self._with_attachments(self._folders(view, "series", series, names), view, study_id)
        if view != "by-uids":
            return listing
        content = self._study_document(study_id, series)  # from the series just read
        document = Entry(STUDY_DOCUMENT, EntryKind.DOCUMENT, len(content), listing.mtime, ("study-document", study_id), study_id)
        return Listing.of([*listing.entries, document], listing.mtime)

    def _instances_of(self, view: str, series_id: str) -> Listing:
        instances = [r for r in self._children(series_id) if isinstance(r, Instance)]
        if view == "by-uids":
            stems = [(safe_text(i.sop_uid) or "(no uid)", ".dcm") for i in instances]
        else:
            stems = [(f"{_number(i.number)} - {safe_text(i.sop_uid) or '(no uid)'}", ".dcm") for i in instances]
        context = f"{_BY_UIDS}/{series_id}" if view == "by-uids" else f"instances/{series_id}"
        names = self._names(context, instances, stems, [(i.received, i.sop_uid) for i in instances])
        entries = [Entry(name, EntryKind.INSTANCE, i.size, i.received, (), i.id) for name, i in zip(names, instances, strict=True)]
        mtime = max((e.mtime for e in entries), default=self._started)
        if view == "by-uids":
            content = self._series_document(series_id, instances)  # from the instances just read
            entries.append(Entry(SERIES_DOCUMENT, EntryKind.DOCUMENT, len(content), mtime, ("series-document", series_id), series_id))
        return self._with_attachments(Listing.of(entries, mtime), view, series_id)

    def _with_attachments(self, listing: Listing, view: str, resource_id: ResourceId) -> Listing:
        """``listing`` with an ``attachments/`` folder when the resource has an attachment (one range
        read, usually empty). The folder stands for no resource: removing it deletes nothing."""
        if not self._attachments_of(resource_id):
            return listing
        folder = Entry(ATTACHMENTS, EntryKind.FOLDER, 0, listing.mtime, (ATTACHMENTS, view, resource_id))
        return Listing.of([*listing.entries, folder], listing.mtime)

    def _attachments_of(self, resource_id: ResourceId) -> list[Attachment]:
        try:
            return self.store.attachments(resource_id)
        except NotFoundError:  # deleted meanwhile: its folder goes with it
            return []

    def _attachments(self, resource_id: ResourceId) -> Listing:
        """One read-only file per attachment: its name, the extension of its MIME type, its exact size."""
        attachments = self._attachments_of(resource_id)
        record = self.store.find(resource_id)
        mtime = record.last_update if record is not None else self._started
        stems = [(safe_text(a.name) or "(no name)", _extension(a.mime)) for a in attachments]
        names = disambiguate(stems, [a.key for a in attachments])  # keys never change: nor do the names
        return Listing.of([Entry(name, EntryKind.DOCUMENT, a.size, mtime,
                                 (_ATTACHMENT, resource_id, a.name, _served_mime(a.mime), a.sha256))
                           for name, a in zip(names, attachments, strict=True)], mtime)

    def _years(self, view: str) -> Listing:
        dated = self.store.studies_by_date()
        by_year: dict[str, list[str]] = {}
        for date, study_id in dated:
            by_year.setdefault(date[:4] or UNDATED, []).append(study_id)
        entries = []
        for year, study_ids in by_year.items():
            mtime = _latest(self._records(study_ids), self._started)
            entries.append(Entry(year, EntryKind.FOLDER, 0, mtime, ("undated",) if year == UNDATED else ("year", year)))
        return Listing.of(entries, max((e.mtime for e in entries), default=self._started))

    def _months(self, year: str) -> Listing:
        by_month: dict[str, list[ResourceId]] = {}
        for date, study_id in self.store.studies_by_date(year):
            by_month.setdefault(f"{year}-{date[4:6]}", []).append(study_id)
        entries = [Entry(month, EntryKind.FOLDER, 0, _latest(self._records(ids), self._started), ("month", year, month))
                   for month, ids in by_month.items()]
        return Listing.of(entries, max((e.mtime for e in entries), default=self._started))

    def _studies_on(self, prefix: str) -> Listing:
        """by-dates studies whose date starts with ``prefix`` (blank: those without a date)."""
        ids = [study_id for date, study_id in self.store.studies_by_date(prefix) if bool(date) == bool(prefix)]
        return self._study_folders("by-dates", f"by-dates/{prefix}", self._with_patients(ids))

    def _names(self, context: str, records: Sequence[Record], items: list[tuple[str, str]], order: Sequence[object]) -> list[str]:
        """The names of sibling ``records`` in the folder ``context`` stands for (see ``names``):
        computed with the numbers the store keeps there, and any new ones decided and kept first."""
        kept = self.store.name_numbers(context)
        names, numbers = number_siblings(items, order, _positions(records, kept))
        if not numbers:
            return names

        def decide(kept: Mapping[ResourceId, int]) -> dict[ResourceId, int]:
            return {records[p].id: n for p, n in number_siblings(items, order, _positions(records, kept))[1].items()}

        return number_siblings(items, order, _positions(records, self.store.keep_name_numbers(context, decide)))[0]

    def _folders(self, view: str, kind: str, records: Sequence[Record], names: list[str]) -> Listing:
        entries = [Entry(name, EntryKind.FOLDER, 0, r.last_update, (kind, view, r.id), r.id) for name, r in zip(names, records, strict=True)]
        return Listing.of(entries, max((e.mtime for e in entries), default=self._started))


def attachment_mime(entry: Entry) -> str | None:
    """The MIME type an attachment file is served with; None for any other entry."""
    return entry.node[3] if entry.node[:1] == (_ATTACHMENT,) else None


def attachment_sha256(entry: Entry) -> str | None:
    """An attachment file's SHA-256 (its ETag: known without reading it); None for any other entry."""
    return entry.node[4] if entry.node[:1] == (_ATTACHMENT,) else None


def _served_mime(mime: str) -> str:
    """The type an attachment is served with: its own when it looks like one, else bytes."""
    return mime if _MIME.fullmatch(mime) else "application/octet-stream"


def _extension(mime: str) -> str:
    """``.pdf`` for application/pdf; nothing for a type without one of its own (octet-stream's
    ``.bin`` would only hide the attachment's name)."""
    if mime == "application/octet-stream" or not _MIME.fullmatch(mime):
        return ""
    return _EXTENSIONS.guess_extension(mime.lower()) or ""


def _positions(records: Sequence[Record], kept: Mapping[ResourceId, int]) -> dict[int, int]:
    """``kept`` by position in ``records`` (a folder with none kept reads no entry)."""
    return {p: kept[r.id] for p, r in enumerate(records) if r.id in kept} if kept else {}


def _latest(records: Sequence[Record], default: float) -> float:
    return max((r.last_update for r in records), default=default)


def _number(number: int | None) -> str:
    return f"{number:04d}" if number is not None else "(no number)"


def _patient_name(patient: Patient) -> str:
    return join_fields([(patient.patient_id, "(no id)"), (patient.patient_name, "(no name)")])


def _dated_study_name(study: Study) -> str:
    return join_fields([(study.date, "(no date)"), (study.description, "(no description)")])


def _patient_study_name(patient: Patient, study: Study) -> str:
    return join_fields([(patient.patient_id, "(no id)"), (patient.patient_name, "(no name)"),
                        (study.description, "(no description)")])


def _series_name(series: Series) -> str:
    return join_fields([(series.modality, "(no modality)"), (series.description, "(no description)")])
