"""The ``dicomfs`` command.

Every subcommand prints one clear line on error (no traceback unless ``--debug``) and exits 1;
``--json`` output keys are stable because scripts and the other front ends read them.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import gc
import json
import logging
import logging.handlers
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dicomfs import __version__
from dicomfs.cli_output import human_size, record_line, show_rows, what_goes
from dicomfs.config import Config, LoadedConfig, load_config
from dicomfs.errors import DicomfsError, NotFoundError, StoreNotFoundError
from dicomfs.logformat import LOG_FORMAT, EscapingFormatter
from dicomfs.store.ids import Level
from dicomfs.store.records import Instance, Patient, Record, Series, Study
from dicomfs.store.settings import Limits, WriteSettings
from dicomfs.store.store import Store

__all__ = ["main", "open_store", "write_settings"]

log = logging.getLogger("dicomfs")

# How often `--wait` redraws its progress bar, and, with no bar, looks for the end of a job that
# another process runs (its own runner's end wakes it at once).
_BAR_REFRESH = 0.1
_OTHER_RUNNER_POLL = 0.5


def write_settings(config: Config) -> WriteSettings:
    """The store's write settings from the configuration."""
    s, i = config.storage, config.ingest
    return WriteSettings(
        codec=s.compression, level=s.compression_level, block_size=s.block_size,
        overwrite=s.overwrite_instances, limits=Limits(s.max_size, s.max_patients),
        batch_files=i.batch_files, batch_bytes=i.batch_bytes, batch_delay=i.batch_delay_ms / 1000,
        threads=i.threads, workers=i.workers, max_expanded_size=i.max_expanded_size,
    )


def open_store(loaded: LoadedConfig, *, readonly: bool = False, create: bool = False) -> Store:
    """Open (or create) the configured store."""
    config = loaded.config
    options: dict[str, Any] = dict(
        readonly=readonly, settings=write_settings(config), metadata_names=config.metadata,
        attachment_types={name: (a.key, a.mime) for name, a in config.attachments.items()},
    )
    if create:
        return Store.create(config.storage.folder, **options)
    return Store(config.storage.folder, **options)


# -- subcommands ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, create=True) as store:
        print(f"store ready at {store.folder}")
    return 0


def cmd_ingest(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    # imported here: only ingest draws a bar, and tqdm costs ~34 ms at every command's start
    from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

    from dicomfs.store.candidates import REJECTED
    from dicomfs.store.sources import Source, iter_sources

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise NotFoundError(f"{path}: no such file or folder")
    counts: Counter[str] = Counter()
    rejected: list[tuple[str, str]] = []
    total_bytes = 0
    started = time.monotonic()
    show_bar = not (args.json or args.quiet) and sys.stderr.isatty()
    # Only a progress bar needs the count up front; otherwise listing overlaps with ingesting.
    sources: Iterable[Source] = list(iter_sources(paths)) if show_bar else iter_sources(paths)
    bar = tqdm(total=len(sources) if isinstance(sources, list) else None, unit="file",
               disable=not show_bar, file=sys.stderr, dynamic_ncols=True)
    with open_store(loaded) as store:
        for result in store.ingest_sources(sources, origin="cli"):
            counts[result.status] += 1
            total_bytes += result.size
            if result.status == REJECTED:
                rejected.append((result.path, result.reason))
            if args.json:
                # flushed per line: a reader may act on each acknowledgement as it comes
                print(json.dumps(result.as_json(), ensure_ascii=False), flush=True)
            bar.update(1)
    bar.close()
    elapsed = time.monotonic() - started
    if not args.json and not args.quiet:
        _print_ingest_summary(counts, rejected, total_bytes, elapsed)
    elif args.quiet and rejected:
        for label, reason in rejected:
            print(f"rejected {label}: {reason}", file=sys.stderr)
    return 1 if rejected else 0


def _print_ingest_summary(counts: Counter[str], rejected: list[tuple[str, str]], size: int, elapsed: float) -> None:
    files = sum(counts.values())
    rows = [(status, counts[status]) for status in ("stored", "replaced", "already_stored", "skipped", "rejected")]
    width = max(len(s) for s, _ in rows)
    for status, count in rows:
        print(f"{status.replace('_', ' '):<{width}}  {count:>8}")
    rate = files / elapsed if elapsed > 0 else 0.0
    print(f"{'total':<{width}}  {files:>8}  ({human_size(size)} in {elapsed:.1f} s, {rate:.0f} files/s)")
    for path, reason in rejected:
        print(f"rejected: {path}: {reason}")


def cmd_ls(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    try:
        level = Level.parse(args.level)
    except ValueError as error:
        raise DicomfsError(str(error)) from None
    filters = [_parse_filter(f) for f in args.where]
    with open_store(loaded, readonly=True) as store:
        parent = store.resolve_one(args.parent).id if args.parent else None
        records = [r for r in store.walk(level, parent) if all(_matches(store, r, k, g) for k, g in filters)]
        # A study's line names its patient: a study's description alone says not whose it is.
        owners = {} if args.json or level != Level.STUDY else _patients_of(store, records)
        for record in sorted(records, key=_natural_order):
            print(json.dumps(_record_json(record), ensure_ascii=False) if args.json
                  else record_line(record, owners.get(record.parent) if record.parent else None))
    return 0


def _patients_of(store: Store, records: Iterable[Record]) -> dict[str, Patient]:
    """The patients of ``records`` (studies), each read once."""
    owners = {}
    for patient_id in {r.parent for r in records if r.parent is not None}:
        found = store.get(patient_id)
        if isinstance(found, Patient):
            owners[patient_id] = found
    return owners


def _natural_order(record: Record) -> tuple[object, ...]:
    """The order a person expects: by PatientID, study date, series and instance number."""
    if isinstance(record, Patient):
        return (record.patient_id, record.id)
    if isinstance(record, Study):
        return (record.parent, record.date, record.time, record.id)
    assert isinstance(record, (Series, Instance))
    return (record.parent, record.number is None, record.number or 0, record.id)


def _parse_filter(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise DicomfsError(f"--where wants FIELD=GLOB (got {text!r})")
    key, glob = text.split("=", 1)
    return key.strip(), glob


_STUDY_MODALITY_FIELDS = ("modality", "modalities")
"""Study fields matched against ModalitiesInStudy (its series' modalities, as C-FIND and QIDO-RS
answer it): true when one of them matches."""


def _matches(store: Store, record: Record, key: str, glob: str) -> bool:
    fields = _record_json(record)
    if isinstance(record, Study) and key in _STUDY_MODALITY_FIELDS:
        # Read only when a filter asks: listing studies reads no series otherwise.
        modalities = {child.modality for child in store.children(record.id) if isinstance(child, Series)}
        return any(fnmatch.fnmatchcase(modality, glob) for modality in modalities)
    if key not in fields:
        extra = _STUDY_MODALITY_FIELDS if isinstance(record, Study) else ()
        known = ", ".join(sorted([*fields, *extra]))
        raise DicomfsError(f"unknown field {key!r} for {record.level.label} (fields: {known})")
    return fnmatch.fnmatchcase(str(fields[key]), glob)


def _record_json(record: Record) -> dict[str, object]:
    fields = asdict(record)
    fields["level"] = record.level.label
    return fields


def cmd_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, readonly=True) as store:
        record = store.resolve_one(args.selector)
        shown = _record_json(record)
        shown["metadata"] = store.metadata(record.id)
        shown["attachments"] = [a.name for a in store.attachments(record.id)]
        shown["children"] = [c.id for c in store.children(record.id)] if record.level != Level.INSTANCE else []
    if args.json:
        print(json.dumps(shown, ensure_ascii=False, indent=1))
    else:
        rows = show_rows(shown)
        width = max(len(name) for name, _ in rows)
        for name, text in rows:
            print(f"{name:<{width}}  {text}")
    return 0


_CONFIRM_STUDIES = 2
"""``rm`` asks (or wants ``--yes``) from this many studies: one is what a slip of the hand costs
at most; a patient or a list of several is asked for, as ``apt-get`` asks before it removes."""
_PROTECTION_NOTE = "protection guards against recycling only: rm deletes it all the same"


def cmd_rm(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, readonly=args.dry_run) as store:
        # Every selector resolved before anything goes: a typo in the last one deletes nothing.
        chosen = _outermost(store, [store.resolve_one(selector) for selector in args.selectors])
        if args.dry_run:
            for record, patient in chosen:
                print(f"would delete {what_goes(record, patient)}")
                _say_if_protected(patient)
            return 0
        studies = sum(r.studies if isinstance(r, Patient) else int(isinstance(r, Study)) for r, _ in chosen)
        if studies >= _CONFIRM_STUDIES and not args.yes and not _confirmed(chosen, studies):
            return 1
        for record, patient in chosen:
            removed = store.delete(record.id)
            print(f"deleted {record.level.label} {record.id} ({removed} instances)")
            _say_if_protected(patient)
    return 0


def _outermost(store: Store, records: list[Record]) -> list[tuple[Record, Patient | None]]:
    """``records`` less repeats and those below another of them, each with its patient."""
    chosen = {r.id for r in records}
    found: dict[str, tuple[Record, Patient | None]] = {}
    for record in records:
        above = store.ancestors(record)
        if record.id in found or any(a.id in chosen for a in above):
            continue
        patient = record if isinstance(record, Patient) else above[0] if above else None
        found[record.id] = (record, patient if isinstance(patient, Patient) else None)
    return list(found.values())


def _say_if_protected(patient: Patient | None) -> None:
    if patient is not None and patient.protected:
        print(f"  patient {patient.patient_id} is protected; {_PROTECTION_NOTE}")


def _confirmed(chosen: list[tuple[Record, Patient | None]], studies: int) -> bool:
    """Ask on a terminal; without one, refuse: a script says ``--yes`` when it means it."""
    instances = sum(r.instances for r, _ in chosen)
    if not sys.stdin.isatty():
        raise DicomfsError(f"rm would delete {studies} studies ({instances} instances): "
                           "pass --yes to do it, or --dry-run to see what would go")
    for record, patient in chosen:
        print(f"  {what_goes(record, patient)}")
        _say_if_protected(patient)
    try:
        answer = input(f"delete {studies} studies ({instances} instances)? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing deleted", file=sys.stderr)
    return False


def cmd_protect(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded) as store:
        for selector in args.selectors:
            record = store.resolve_one(selector)
            store.set_protected(record.id, args.command == "protect")
            if args.command == "protect":
                print(f"protected patient {record.id} from recycling (rm still deletes it)")
            else:
                print(f"unprotected patient {record.id}: it may be recycled again")
    return 0


def cmd_meta(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, readonly=args.action == "get") as store:
        record = store.resolve_one(args.selector)
        if args.action == "get":
            values = store.metadata(record.id)
            if args.name:
                if args.name not in values:
                    raise NotFoundError(f"{record.id} has no metadata {args.name!r}")
                print(values[args.name])
            else:
                for name, value in values.items():
                    print(f"{name}={value}")
        elif args.action == "set":
            store.set_metadata(record.id, args.name, args.value)
        else:
            store.delete_metadata(record.id, args.name)
    return 0


def cmd_attach(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, readonly=args.action in ("get", "ls")) as store:
        record = store.resolve_one(args.selector)
        if args.action == "ls":
            for a in store.attachments(record.id):
                print(f"{a.name}\t{a.mime}\t{a.size}")
        elif args.action == "put":
            store.put_attachment(record.id, args.name, Path(args.file), args.mime)
        elif args.action == "get":
            with store.open_attachment(record.id, args.name) as reader:
                out = open(args.output, "wb") if args.output else sys.stdout.buffer
                try:
                    for chunk in reader.iter_chunks():
                        out.write(chunk)
                finally:
                    if args.output:
                        out.close()
        else:
            store.delete_attachment(record.id, args.name)
    return 0


def cmd_stats(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    with open_store(loaded, readonly=True) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats.as_json()))
        return 0
    for name in ("patients", "studies", "series", "instances"):
        print(f"{name:<18} {getattr(stats, name):>12}")
    print(f"{'bytes':<18} {stats.size:>12}  ({human_size(stats.size)})")
    print(f"{'bytes on disk':<18} {stats.stored_size:>12}  ({human_size(stats.stored_size)})")
    print(f"{'compression ratio':<18} {stats.compression_ratio:>12.3f}")
    print(f"{'attachment bytes':<18} {stats.attachment_bytes:>12}")
    return 0


def cmd_check(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from dicomfs.store.check import check_store  # imported here: only this command needs it (~6 ms at every start)

    # Opened writable: opening first finishes what killed writers left pending (as a journal replay).
    with open_store(loaded) as store:
        report = check_store(store, repair=args.repair, verify_hashes=not args.no_hash)
        if args.repair and report.repairs:
            after = check_store(store, verify_hashes=not args.no_hash)
            report.problems = after.problems
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        for problem in report.problems:
            print(f"problem: {problem}")
        for repair in report.repairs:
            print(f"repaired: {repair}")
        state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
        print(f"{state}: {report.records} records, {report.blobs} blobs checked in {report.seconds:.1f} s")
    return 0 if report.clean else 1


def cmd_mount(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from dicomfs.mount.daemon import MountOptions, mount  # pyfuse3 and trio: only this command needs them

    logging_to = _log_to(loaded.config, foreground=args.foreground, file=Path(args.log) if args.log else None)
    options = MountOptions(Path(args.mountpoint), foreground=args.foreground, read_only=args.read_only,
                           allow_other=args.allow_other, auto_unmount=args.auto_unmount,
                           webdav=args.webdav, allow_anonymous=args.allow_anonymous)
    status = mount(lambda: open_store(loaded, readonly=args.read_only), loaded.config, options,
                   lambda apply: _reloader(args, loaded, apply))
    if not args.foreground:  # the daemon is up: the last word of the command that started it
        print(f"mounted {options.mountpoint.resolve()}; logging to {logging_to}")
    return status


def _serve_until_stopped(started: str, reload: Callable[[], None]) -> None:
    """Print ``started``, tell systemd, and wait for SIGTERM or SIGINT (for the foreground servers);
    on SIGHUP call ``reload`` (from this, the main thread: never inside the signal handler)."""
    import signal
    import threading

    from dicomfs.systemd import notify_systemd

    wake = threading.Event()
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, note)
    print(f"{started} (Ctrl-C stops)", flush=True)
    notify_systemd("READY=1")
    while True:
        wake.wait()
        wake.clear()
        signals, received[:] = received[:], []
        if signal.SIGTERM in signals or signal.SIGINT in signals:
            break
        notify_systemd("RELOADING=1")
        reload()
        notify_systemd("READY=1")
    notify_systemd("STOPPING=1")


def _reloader(args: argparse.Namespace, loaded: LoadedConfig, apply: Callable[[Config], None]) -> Callable[[], None]:
    """What SIGHUP does in a long-running command: read the configuration again and apply it."""
    from dicomfs.reload import reload_config

    current = [loaded]

    def reload() -> None:
        current[0] = reload_config(current[0], Path(args.store) if args.store else None, apply)

    return reload


def cmd_webdav(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from bridge.server import Bridge  # wsgidav and cheroot: only this command needs them
    from dicomfs.jobs.service import reconfigure, start_jobs
    from dicomfs.servermemory import limit_malloc_arenas, tune_for_a_server

    limit_malloc_arenas()  # before the bridge's threads exist
    _log_to(loaded.config, foreground=True)
    with open_store(loaded, readonly=args.read_only) as store:
        bridge = Bridge(store, loaded.config, bind=args.bind, allow_anonymous=args.allow_anonymous)
        bridge.start()
        jobs = start_jobs(store, loaded.config) if not args.read_only else None
        tune_for_a_server()

        def apply(config: Config) -> None:
            bridge.credentials.replace_users(config.users)
            if jobs is not None:
                reconfigure(jobs, store, config)

        try:
            _serve_until_stopped(f"serving {store.folder} at {bridge.url}", _reloader(args, loaded, apply))
        finally:
            bridge.stop()
            if jobs is not None:
                jobs.stop()
    return 0


def cmd_passwd(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    import getpass

    from dicomfs.config import RIGHTS, check_user_name
    from dicomfs.errors import ConfigError
    from dicomfs.passwords import hash_password

    check_user_name(args.name)
    rights = [r.strip() for r in args.rights.split(",") if r.strip()]
    unknown = [r for r in rights if r not in RIGHTS]
    if unknown or not rights:
        raise ConfigError(f"--rights takes a comma-separated subset of {', '.join(RIGHTS)} (got {args.rights!r})")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ; nothing written")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise ConfigError("a password needs 8 characters or more")
    print(f"# add to {loaded.path or 'your dicomfs.toml'} (the password itself is kept nowhere)")
    bare = re.fullmatch(r"[A-Za-z0-9_-]+", args.name) is not None  # else TOML needs the name quoted
    print(f"[users.{args.name if bare else json.dumps(args.name)}]")
    print(f'password_hash = "{hash_password(password)}"')
    print(f"rights = {json.dumps(rights)}")
    return 0


def _instances_selected(store: Store, selectors: Sequence[str]) -> list[Instance]:
    """The instances selectors name, each once: paths in a mounted tree (their user.dicomfs.id),
    resource ids, DICOM UIDs or PatientIDs."""
    import os

    ids = []
    for selector in selectors:
        if os.path.exists(selector):
            try:
                selector = os.getxattr(selector, "user.dicomfs.id").decode()
            except OSError:
                raise NotFoundError(f"{selector} is not a file or folder of a dicomfs mount "
                                    "(it has no user.dicomfs.id)") from None
        ids.append(selector)
    return store.instances_of(ids)


def _check_secrets(config: Config, name: str) -> None:
    """Fail now, not when the job runs, on a secret that cannot be read or a syntax that is no syntax."""
    from dicomfs.config import Destination, XnatDestination

    destination = config.destinations.get(name)
    if isinstance(destination, Destination):
        if destination.transfer_syntaxes:  # pydicom only then
            from dicomfs.jobs.transcode import parse_syntaxes

            parse_syntaxes(destination.transfer_syntaxes)
        destination.authorization()
    elif isinstance(destination, XnatDestination):
        destination.password()
    elif name in config.peers:
        config.peers[name].authorization()


def _quick_exit() -> None:
    """Skip the interpreter's last garbage collections when this process ends.

    They walk every object the imports made, some 30 ms (more on a busy machine) at the end of a
    command that sends for a second or two. Frozen objects are not collected then and go with
    the process as the rest does; what must be durable is committed and closed before (the store,
    the jobs' transactions). Registered for the job commands only, at their start: an ``atexit``
    hook, so it changes nothing for a caller of :func:`main` until its own process ends.
    """
    atexit.register(gc.freeze)


def _queue(loaded: LoadedConfig, kind: str, params: dict[str, object], items: list[tuple[str, int]], description: str,
           *, wait: bool, store: Store) -> int:
    """Create the job, say so, and with ``wait`` run it here until it ends."""
    from dicomfs.jobs.model import QUEUED_UNDER
    from dicomfs.jobs.storage import open_jobs

    if loaded.path is not None:  # where the target is defined, for a runner started without it
        params = {**params, QUEUED_UNDER: str(loaded.path)}
    jobs = open_jobs(store)
    job = jobs.create(kind, params, items, description)
    print(f"job {job.id}: {job.description}")
    return _wait_for(store, jobs, loaded.config, job.id) if wait else 0


def cmd_export(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    """``export --to NAME`` (any destination or peer) and ``send --to PEER``."""
    _quick_exit()
    from dicomfs.jobs.service import job_for_target

    if args.command == "send" and args.to not in loaded.config.peers:
        from dicomfs.errors import ConfigError

        known = ", ".join(loaded.config.peers) or "none configured"
        raise ConfigError(f"no peer {args.to!r} in the configuration (known: {known})")
    kind, params = job_for_target(loaded.config, args.to)
    _check_secrets(loaded.config, args.to)
    # Read-only: sending only reads the store (the job lives in <store>/jobs, an environment of
    # its own), and a writable open would also start the group committer and look for what dead
    # writers left, neither of which an export needs.
    with open_store(loaded, readonly=True) as store:
        instances = _instances_selected(store, args.selectors)
        description = f"{args.command} {len(instances)} instances ({' '.join(args.selectors)[:80]}) to {args.to}"
        return _queue(loaded, kind, params, [(i.id, i.size) for i in instances], description, wait=args.wait, store=store)


def cmd_pull(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    _quick_exit()
    from dicomfs.errors import ConfigError
    from dicomfs.jobs.model import PULL
    from dicomfs.transfers.client import PeerClient

    peer = loaded.config.peers.get(args.from_peer)
    if peer is None:
        known = ", ".join(loaded.config.peers) or "none configured"
        raise ConfigError(f"no peer {args.from_peer!r} in the configuration (known: {known})")
    client = PeerClient(peer)  # reads the password: one that cannot be read fails here
    try:
        found = client.resolve(args.selectors)
    finally:
        client.close()
    with open_store(loaded) as store:
        description = f"pull {len(found)} instances ({' '.join(args.selectors)[:80]}) from peer {peer.name}"
        return _queue(loaded, PULL, {"peer": peer.name}, [(w.id, w.size) for w in found], description,
                      wait=args.wait, store=store)


def _wait_for(store: Store, jobs: Any, config: Config, job_id: str) -> int:
    """Run the job here (another runner may take it too: the lease decides) and show its progress."""
    import threading

    from dicomfs.jobs.model import FINAL, PULL, SEND, JobState
    from dicomfs.jobs.service import runner_for

    job = jobs.get(job_id)
    ran = threading.Event()
    runner = runner_for(store, jobs, config, only=job_id, kinds=(job.kind,))
    runner.after_run = lambda _: ran.set()
    runner.start()
    bar = None
    if sys.stderr.isatty():  # imported only then: tqdm costs ~15 ms of the command's start
        from tqdm import tqdm

        bar = tqdm(total=job.total_items, unit="inst")
    try:
        while job.state not in FINAL:
            # Woken as soon as this process's runner is done with the job; the timeout draws the
            # bar and notices the end of a run in another process (which holds the lease).
            ran.wait(_BAR_REFRESH if bar is not None else _OTHER_RUNNER_POLL)
            ran.clear()
            job = jobs.get(job_id)
            if bar is not None:
                bar.n = job.done_items + job.failed_items
                bar.set_postfix_str(job.waiting_for[:60] if job.state is JobState.PENDING else "")
                bar.refresh()
    finally:
        runner.stop()
        if bar is not None:
            bar.close()
    transfer = job.kind in (SEND, PULL)
    extra = {name: int(job.extra.get(name, 0)) for name in ("content_bytes", "wire_bytes", "skipped_items")}
    print(f"job {job.id}: {job.state.value}: {job.done_items} of {job.total_items} done, {job.failed_items} failed"
          + (f", {human_size(extra['content_bytes'])} moved ({human_size(extra['wire_bytes'])} on the wire), "
             f"{extra['skipped_items']} already there" if transfer else "")
          + (f" ({job.last_error})" if job.last_error else ""))
    return 0 if job.state is JobState.SUCCESS else 1


def cmd_jobs(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    _quick_exit()
    from dicomfs.jobs.storage import open_jobs

    with open_store(loaded, readonly=args.action in ("ls", "show")) as store:
        jobs = open_jobs(store)
        if args.action == "ls":
            listed = jobs.all()
            if args.json:
                print(json.dumps([j.as_json() for j in listed], indent=2))
            elif not listed:
                print("no jobs")  # not silence: an empty answer looks like a command that did nothing
            for job in [] if args.json else listed:
                note = job.waiting_for if job.state.value == "pending" else job.last_error
                print(f"{job.id}  {job.state.value:<8} {job.done_items:>6}/{job.total_items:<6} "
                      f"failed {job.failed_items:<5} {job.description}" + (f"  [{note}]" if note else ""))
            return 0
        job_id = args.job
        if not job_id:
            raise NotFoundError(f"jobs {args.action} needs a job id (see dicomfs jobs ls)")
        if args.action == "show":
            print(json.dumps(jobs.report(jobs.get(job_id)), indent=2))
            return 0
        steer = {"pause": jobs.pause, "resume": jobs.resume, "cancel": jobs.cancel, "retry": jobs.retry}[args.action]
        changed = steer(job_id)
        print(f"job {changed.id}: {changed.state.value}")
        return 0


def cmd_worker(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    _quick_exit()
    from dicomfs.jobs.service import reconfigure, runner_for
    from dicomfs.jobs.storage import open_jobs

    _log_to(loaded.config, foreground=True)
    with open_store(loaded) as store:
        runner = runner_for(store, open_jobs(store), loaded.config)
        runner.start()
        try:
            _serve_until_stopped(f"running jobs of {store.folder}",
                                 _reloader(args, loaded, lambda config: reconfigure(runner, store, config)))
        finally:
            runner.stop()
    return 0


def cmd_umount(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from dicomfs.mount.daemon import unmount

    unmount(Path(args.mountpoint))
    return 0


MOUNT_LOG = Path("log") / "mount.log"
"""Where a background mount logs by default, under the store's folder: its stdin, stdout and
stderr are /dev/null, and the store is the one place it surely may write (and where one looks)."""
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_ROTATE_KEEP = 5
"""A log file is cut at 10 MiB, the last 5 kept as ``FILE.1`` .. ``FILE.5`` (60 MiB at most,
beside the store's data): a daemon runs for months, with no logrotate set up for it."""


def _log_to(config: Config, *, foreground: bool, file: Path | None = None) -> str:
    """Daemon logging at log.level to ``file`` (``--log``), else log.file, else stderr in the
    foreground (the journal under systemd), else ``STORE/log/mount.log``; returns where to.
    An explicit file that cannot be written is an OSError; the default one, a said fallback."""
    root = logging.getLogger()
    chosen = file or (Path(config.log.file) if config.log.file else None)
    handler: logging.Handler
    if chosen is None and foreground:
        handler, where = logging.StreamHandler(), "stderr"
    elif chosen is not None:
        handler, where = _rotating(chosen), str(chosen)
    else:
        chosen = config.storage.folder / MOUNT_LOG
        try:
            if not any(config.storage.folder.iterdir()):
                # no store (the mount will say so): `dicomfs init` refuses a folder that holds anything
                return "nowhere"
            chosen.parent.mkdir(exist_ok=True)
            handler, where = _rotating(chosen), str(chosen)
        except OSError as error:  # no such folder; a read-only mount of a store this user may not write
            return f"nowhere (cannot write {chosen}: {error.strerror}; choose a file with --log)"
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    if root.level > logging.DEBUG:
        root.setLevel(config.log.level.upper())
    return where


def _rotating(file: Path) -> logging.Handler:
    return logging.handlers.RotatingFileHandler(file, maxBytes=LOG_ROTATE_BYTES, backupCount=LOG_ROTATE_KEEP,
                                                encoding="utf-8")


def cmd_config(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    rows = loaded.describe()
    width = max(len(key) for key, _, _ in rows)
    print(f"# configuration file: {loaded.path or 'none (built-in defaults)'}")
    for key, value, source in rows:
        print(f"{key:<{width}} = {json.dumps(value, default=str, ensure_ascii=False):<30} # {source}")
    return 0


# -- argument parsing -----------------------------------------------------------------------------


_SELECTOR_HELP = "a resource id, a DICOM UID or a PatientID"
_JSON_HELP = "print JSON (epoch seconds and DICOM dates as stored; the keys are stable for scripts)"
_ATTACHMENT_HELP = "a name of [attachments] in the configuration"


def _ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="a DICOM file, a folder (read recursively), a zip or a DICOMDIR")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary; rejections on stderr")


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("level", nargs="?", default="patients", help="patients (default), studies, series or instances")
    p.add_argument("--parent", metavar="SELECTOR", help="only below this resource (id, UID or PatientID)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=GLOB",
                   help="keep records whose field matches, e.g. modality=CT (for studies: one of their series) or description='*CHEST*'")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("selector", help=_SELECTOR_HELP)
    p.add_argument("--json", action="store_true", help=_JSON_HELP)


def _selectors_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("selectors", nargs="+", metavar="SELECTOR", help=_SELECTOR_HELP)


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    _selectors_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, with counts; delete nothing")
    p.add_argument("--yes", "-y", action="store_true",
                   help="delete two studies or more without asking (without a terminal, rm refuses them otherwise)")


def _meta_arguments(p: argparse.ArgumentParser) -> None:
    meta = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="get, set or rm")
    g = meta.add_parser("get", help="print one value, or every name=value of the resource")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", nargs="?", help="the metadata name (default: all of them)")
    g = meta.add_parser("set", help="set a user metadata value (names from [metadata] in the configuration)")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", help="a name of [metadata] in the configuration")
    g.add_argument("value", help="the text to store")
    g = meta.add_parser("rm", help="remove a user metadata value")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", help="a name of [metadata] in the configuration")


def _attach_arguments(p: argparse.ArgumentParser) -> None:
    attach = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="put, get, rm or ls")
    g = attach.add_parser("put", help="store a file as the resource's attachment NAME (replacing one there)")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", help=_ATTACHMENT_HELP)
    g.add_argument("file", help="the file to attach")
    g.add_argument("--mime", help="its media type (default: the one [attachments] gives NAME)")
    g = attach.add_parser("get", help="write an attachment to a file or to stdout")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", help=_ATTACHMENT_HELP)
    g.add_argument("-o", "--output", help="the file to write (default: stdout)")
    g = attach.add_parser("rm", help="delete an attachment")
    g.add_argument("selector", help=_SELECTOR_HELP)
    g.add_argument("name", help=_ATTACHMENT_HELP)
    g = attach.add_parser("ls", help="list a resource's attachments: name, media type, bytes")
    g.add_argument("selector", help=_SELECTOR_HELP)


def _json_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help=_JSON_HELP)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", action="store_true", help="fix what can be fixed; orphans go to quarantine/")
    p.add_argument("--no-hash", action="store_true", help="skip SHA-256 verification of blob contents")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty folder to show the store in")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground (systemd, debugging)")
    p.add_argument("--read-only", action="store_true", help="refuse every write with EROFS")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in: members of mount.group read and upload, others get nothing (needs user_allow_other)")
    p.add_argument("--auto-unmount", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--webdav", metavar="HOST:PORT", nargs="?", const="",
                   help="also serve the WebDAV bridge from this process (default address: webdav.bind)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="let the bridge listen beyond loopback with no users configured")
    p.add_argument("--log", metavar="FILE",
                   help="log to FILE (default: log.file, else STORE/log/mount.log, or stderr with --foreground)")


def _webdav_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", metavar="HOST:PORT", help="where to listen (default: webdav.bind, 127.0.0.1:8042)")
    p.add_argument("--read-only", action="store_true", help="refuse uploads and deletes")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="listen beyond loopback with no users configured (anyone who reaches it can read and write)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("selectors", nargs="+", metavar="SELECTOR",
                   help="a path in a mounted tree, a resource id, a DICOM UID or a PatientID")
    p.add_argument("--to", required=True, metavar="NAME", help="a [destinations.NAME] (or [peers.NAME]) of the configuration")
    p.add_argument("--wait", action="store_true", help="run it here and wait; exit 1 unless it succeeds")


def _send_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("selectors", nargs="+", metavar="SELECTOR",
                   help="a path in a mounted tree, a resource id, a DICOM UID or a PatientID")
    p.add_argument("--to", required=True, metavar="PEER", help="a [peers.NAME] of the configuration")
    p.add_argument("--wait", action="store_true", help="run it here and wait; exit 1 unless it succeeds")


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("selectors", nargs="+", metavar="SELECTOR",
                   help="on the peer: a path of its tree (by-patients/...), a resource id, a DICOM UID or a PatientID")
    p.add_argument("--from", dest="from_peer", required=True, metavar="PEER", help="a [peers.NAME] of the configuration")
    p.add_argument("--wait", action="store_true", help="run it here and wait; exit 1 unless it succeeds")


def _jobs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["ls", "show", "pause", "resume", "cancel", "retry"],
                   help="ls: every job; show: one job with its failures; pause, resume, cancel or retry one")
    p.add_argument("job", nargs="?", metavar="JOB", help="the job id (all but ls)")
    p.add_argument("--json", action="store_true", help="ls: a JSON list of the jobs (show always prints JSON)")


def _passwd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the user name")
    p.add_argument("--rights", default="read", help="comma-separated: read, upload, delete (default: read)")


def _umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the folder a dicomfs store is mounted on")


# (name, handler, help, what adds its arguments), in the order `dicomfs --help` lists them.
_COMMANDS: tuple[tuple[str, Callable[..., int], str, Callable[[argparse.ArgumentParser], None] | None], ...] = (
    ("init", cmd_init, "create the store folder", None),
    ("ingest", cmd_ingest, "store DICOM files, folders, zips and DICOMDIRs", _ingest_arguments),
    ("ls", cmd_ls, "list patients, studies, series or instances", _ls_arguments),
    ("show", cmd_show, "show one resource with its metadata", _show_arguments),
    ("rm", cmd_rm, "delete resources and everything below them (protected patients too)", _rm_arguments),
    ("protect", cmd_protect, "protect patients from recycling", _selectors_arguments),
    ("unprotect", cmd_protect, "let patients be recycled again", _selectors_arguments),
    ("meta", cmd_meta, "read core and user metadata, set or remove user metadata", _meta_arguments),
    ("attach", cmd_attach, "user attachments: put, get, rm, ls", _attach_arguments),
    ("stats", cmd_stats, "counts, bytes and compression ratio", _json_arguments),
    ("check", cmd_check, "verify the index against the blobs (exit 0 only when clean)", _check_arguments),
    ("config", cmd_config, "print the effective configuration and where each value came from", None),
    ("mount", cmd_mount, "mount the store as a file system (FUSE)", _mount_arguments),
    ("webdav", cmd_webdav, "serve the store over WebDAV (runs beside a mount)", _webdav_arguments),
    ("export", cmd_export, "send instances to a configured archive (DICOMweb STOW-RS, XNAT) or peer, as a job",
     _export_arguments),
    ("send", cmd_export, "push instances to a configured peer dicomfs ([peers.NAME]), as a job", _send_arguments),
    ("pull", cmd_pull, "fetch instances from a configured peer dicomfs into this store, as a job", _pull_arguments),
    ("jobs", cmd_jobs, "list and steer jobs (exports, transfers)", _jobs_arguments),
    ("worker", cmd_worker, "run queued jobs until stopped (beside or instead of a mount)", None),
    ("passwd", cmd_passwd, "make a WebDAV user's salted password hash for the configuration", _passwd_arguments),
    ("umount", cmd_umount, "unmount a dicomfs mount", _umount_arguments),
)
_OPTIONS_WITH_VALUES = ("--store", "--config")


def named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names when it names a known one, found without argparse: the first
    word that is neither a global option nor the value of one. None when in doubt (an abbreviated
    option, a misspelt command, none at all); the full parser decides then."""
    words = iter(argv)
    for word in words:
        if word in _OPTIONS_WITH_VALUES:
            next(words, None)
        elif not word.startswith("-"):
            return word if any(word == name for name, *_ in _COMMANDS) else None
    return None


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: only its command's sub-parser when it names one. Building all 21
    (and their arguments) took ~10 ms of every command's start, more than opening the store."""
    parser = argparse.ArgumentParser(prog="dicomfs", description="A DICOM archive you can mount.")
    parser.add_argument("--store", metavar="DIR", help="the store folder (default: storage.folder)")
    parser.add_argument("--config", metavar="FILE", help="configuration file (default: see docs/configuration.md)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"dicomfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these (dicomfs COMMAND --help describes its arguments)")
    chosen = named_command(argv)
    for name, handler, help_text, arguments in _COMMANDS:
        if chosen is not None and name != chosen:
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        if arguments is not None:
            arguments(command)
    return parser


def _init_line(args: argparse.Namespace) -> str:
    """The ``dicomfs init`` that creates the store this command looked for, to paste as it is:
    with the ``--store`` and ``--config`` given here (the store folder may come from either)."""
    words = ["dicomfs"]
    for option in _OPTIONS_WITH_VALUES:
        value = getattr(args, option.lstrip("-"))
        if value is not None:
            words += [option, value]
    return shlex.join([*words, "init"])


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = _parser(words).parse_args(words)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, handlers=[handler])
    try:
        loaded = load_config(Path(args.config) if args.config else None,
                             store_folder=Path(args.store) if args.store else None)
        return int(args.handler(args, loaded))
    except StoreNotFoundError:
        if args.debug:
            raise
        print(f"dicomfs: no dicomfs store at {loaded.config.storage.folder} (create one with `{_init_line(args)}`)",
              file=sys.stderr)
        return 1
    except DicomfsError as error:
        if args.debug:
            raise
        print(f"dicomfs: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`: not an error worth a line
        return 0
    except OSError as error:  # a folder that cannot be read or written, a full disk, ...
        if args.debug:
            raise
        print(f"dicomfs: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dicomfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
