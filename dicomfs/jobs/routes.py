"""Routing rules: newly stored instances that match a ``[[routes]]`` rule are exported (or sent to a
peer), one job per series once the series has been quiet for ``quiet_seconds``.

The router reads the store's change log from where it last stopped, and keeps that cursor and
the series still gathering with the jobs (``JobStore`` meta), in the transaction that creates
their jobs: a restart neither misses an instance nor exports one twice. Only one process routes
at a time, under a lease like a job's.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Callable, Sequence

from dicomfs.config import Route
from dicomfs.jobs.storage import JobStore
from dicomfs.store import Instance, Store
from dicomfs.store.ids import Level
from dicomfs.views.tags import main_tags

__all__ = ["Router", "matches"]

_log = logging.getLogger("dicomfs.jobs")
_META = "routes"


def matches(route: Route, tags: dict[str, str]) -> bool:
    """Whether every (keyword, glob) of the rule matches the tags, ignoring case."""
    return all(fnmatch.fnmatchcase(tags.get(keyword, "").casefold(), pattern.casefold()) for keyword, pattern in route.match)


class Router:
    """Turns newly stored instances into export jobs by the configured rules; ``job_for`` gives the
    kind and parameters of a job to a rule's destination (``service.job_for_target``)."""

    def __init__(self, store: Store, jobs: JobStore, routes: Sequence[Route],
                 job_for: Callable[[str], tuple[str, dict[str, object]]], *, owner: str, lease: float,
                 clock: Callable[[], float]) -> None:
        self.store, self.jobs, self.routes, self.job_for = store, jobs, routes, job_for
        self.owner, self.lease, self._clock = owner, lease, clock

    def step(self) -> int:
        """Route what was stored since the last step; the number of jobs created."""
        if not self.routes:
            return 0
        now = self._clock()
        state = self.jobs.meta(_META)
        if state is None:  # the first step starts from now: rules apply to what arrives after them
            state = {"cursor": self.store.change_number(), "pending": {}}
            self.jobs.create_with_meta([], _META, state, expected_cursor=state["cursor"])
        if state.get("owner") not in (None, "", self.owner) and state.get("lease_until", 0) > now:
            return 0  # another process routes
        cursor = int(state["cursor"])
        latest = self.store.change_number()
        pending: dict[str, dict[str, object]] = state["pending"]
        for op, level, resource_id in self.store.changes_since(cursor) if latest > cursor else []:
            if op != "+" or level != Level.INSTANCE:
                continue
            record = self.store.find(resource_id)
            if not isinstance(record, Instance):
                continue
            tags = main_tags([*self.store.ancestors(record), record])
            for number, route in enumerate(self.routes):
                if matches(route, tags):
                    key = f"{number}:{record.parent}"
                    gathering = pending.setdefault(key, {"items": [], "last": now})
                    gathering["items"].append([record.id, record.size])  # type: ignore[attr-defined]
                    gathering["last"] = now
        due = {key: gathering for key, gathering in pending.items()
               if now - float(gathering["last"]) >= self.routes[int(key.split(":")[0])].quiet_seconds}  # type: ignore[arg-type]
        holding = state.get("owner") == self.owner and float(state.get("lease_until", 0)) - now > self.lease / 2
        if latest == cursor and not due and holding:
            return 0  # nothing new, nothing due, lease good: no write (each would refresh every jobs/ view)
        jobs: list[tuple[str, dict[str, object], list[tuple[str, int]], str]] = []
        for key, gathering in due.items():
            route = self.routes[int(key.split(":")[0])]
            items = [(str(i), int(s)) for i, s in gathering["items"]]  # type: ignore[attr-defined]
            kind, params = self.job_for(route.destination)
            jobs.append((kind, {**params, "route": dict(route.match)}, items,
                         f"route {' '.join(f'{k}={v}' for k, v in route.match)}: {len(items)} instances of series "
                         f"{key.split(':')[1]} to {route.destination}"))
            del pending[key]
        state = {"cursor": latest, "pending": pending, "owner": self.owner, "lease_until": now + self.lease}
        created = self.jobs.create_with_meta(jobs, _META, state, expected_cursor=cursor)
        for job in created:
            _log.info("job %s: %s", job.id, job.description)
        return len(created)
