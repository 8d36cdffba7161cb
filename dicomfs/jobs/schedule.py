"""When a job may run: dcm4chee-style schedules such as ``hour=18-6 dayOfWeek=*``.

Sending studies to another archive uses the same network and disks as the people reading
images at a workstation, so a site often holds exports back until after business hours. dcm4chee
writes that rule in its ``dcmSchedule`` attribute, and dicomfs reads the same text so that a
rule can be copied from there::

    hour=18-6 dayOfWeek=*       from 18:00 until 06:59, every day
    hour=* dayOfWeek=0,6        all day on Sunday (0) and Saturday (6)

A schedule is up to two ``field=value`` words separated by spaces:

* ``hour`` takes 0-23 and ``dayOfWeek`` takes 0-6 with 0 = Sunday, 6 = Saturday;
* a value is ``*`` (any), a number, a range ``a-b``, or a comma list of numbers and ranges;
* a range includes both ends and wraps when ``a > b``: ``hour=18-6`` is the hours
  18, 19, ..., 23, 0, 1, ..., 6 and ``dayOfWeek=5-1`` is Friday to Monday;
* an hour stands for the whole hour, so ``hour=6`` allows 06:00:00 up to 06:59:59;
* a field left out is ``*``; a schedule must name at least one field.

A job given several schedules may run when any one of them allows it, and a job given none may
always run; with the two lines above, exports run on weekday nights and all weekend.

Ranges include their end here as they do in cron (``hour=9-17`` includes 17:xx, ``dayOfWeek=1-5``
is Monday to Friday). dcm4chee's own parser stops one short of the end instead (its ``18-6``
ends at 05:59 and its ``1-5`` is Monday to Thursday), so a rule copied from dcm4chee runs one hour
or one day longer here; write ``hour=18-5`` for dcm4chee's exact window.

Times are wall-clock times: the hour and weekday are read from the ``datetime`` as it stands, naive
(local) or aware (its own zone; call ``.astimezone()`` first for the machine's zone), and
``next_allowed`` steps by wall-clock hours. Daylight saving time therefore needs no special case;
on the night the clocks change an allowed hour is simply one hour longer or shorter, or missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping, Protocol, Sequence

from dicomfs.errors import ConfigError

__all__ = ["Schedule", "Scheduled", "allowed", "next_allowed", "parse_schedule", "parse_schedules", "target_waiting"]

# field name -> (count of values, what the values mean, for error messages)
_FIELDS: dict[str, tuple[int, str]] = {
    "hour": (24, "hours 0-23"),
    "dayOfWeek": (7, "days 0-6 (0 = Sunday)"),
}
_FORMAT_HINT = ("write 'hour=VALUE dayOfWeek=VALUE' (either may be left out), each VALUE being *, "
                "a number, a range a-b, or a comma list of those, e.g. 'hour=18-6 dayOfWeek=*'")
# ASCII digits only: int() alone would also take '+3', ' 3' and other scripts' digits.
_NUMBER = re.compile(r"[0-9]+")
# Every (weekday, hour) pair comes round within a week, so 8 days of hours is a safe search bound.
_SEARCH_HOURS = 8 * 24


@dataclass(frozen=True)
class Schedule:
    """One schedule: the hours of the day and the days of the week in which a job may run."""

    hours: frozenset[int]
    days: frozenset[int]  # 0 = Sunday, as in dcm4chee (Python's weekday() has 0 = Monday)
    text: str

    def allows(self, when: datetime) -> bool:
        """Whether the wall-clock time of ``when`` (naive = local) falls in this schedule."""
        return when.hour in self.hours and _day_of_week(when) in self.days


def parse_schedule(text: str) -> Schedule:
    """Parse one schedule such as ``hour=18-6 dayOfWeek=*``; raise ``ConfigError`` if it is malformed."""
    words = text.split()
    if not words:
        raise ConfigError(f"schedule {text!r} is empty; {_FORMAT_HINT}")
    values: dict[str, frozenset[int]] = {}
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name not in _FIELDS:
            raise ConfigError(f"schedule {text!r}: {word!r} is not hour=VALUE or dayOfWeek=VALUE; {_FORMAT_HINT}")
        if name in values:
            # dcm4chee silently keeps the last one; a repeated field is more likely a typo than a wish.
            raise ConfigError(f"schedule {text!r} gives {name} twice; {_FORMAT_HINT}")
        values[name] = _parse_field(text, name, value)
    return Schedule(hours=values.get("hour", _every("hour")), days=values.get("dayOfWeek", _every("dayOfWeek")), text=text)


def parse_schedules(texts: Sequence[str]) -> tuple[Schedule, ...]:
    """Parse each schedule; an empty sequence gives ``()``, which places no restriction."""
    if isinstance(texts, str):
        # A lone string is a Sequence[str] too, and would be parsed one character at a time.
        raise TypeError("parse_schedules takes a list of schedules; use parse_schedule for one")
    return tuple(parse_schedule(text) for text in texts)


def allowed(schedules: Sequence[Schedule], when: datetime) -> bool:
    """Whether ``when`` falls in any of ``schedules``; always true when there are none."""
    return not schedules or any(schedule.allows(when) for schedule in schedules)


def next_allowed(schedules: Sequence[Schedule], when: datetime) -> datetime:
    """``when`` itself if it is allowed, else the start (minute 0) of the next allowed hour.

    The answer is at most a week away for any schedule ``parse_schedule`` makes. ``ValueError``
    if none comes within 8 days, which only a hand-built ``Schedule`` with no hours or days can cause.
    """
    if allowed(schedules, when):
        return when
    hour = when.replace(minute=0, second=0, microsecond=0)
    for _ in range(_SEARCH_HOURS):
        # Wall-clock arithmetic (Python adds to the fields, even for aware times), see the module notes on DST.
        hour += timedelta(hours=1)
        if allowed(schedules, hour):
            return hour
    raise ValueError(f"no schedule of {[s.text for s in schedules]!r} allows any hour within 8 days of {when}")


class Scheduled(Protocol):
    """A target jobs go to (a destination, a peer), with its schedule windows."""

    @property
    def name(self) -> str: ...

    @property
    def schedule(self) -> tuple[str, ...]: ...


def target_waiting(what: str, targets: Mapping[str, Scheduled], name: object, now: datetime,
                   queued_under: object = None) -> str | None:
    """Why a job for target ``name`` (a ``what``: "destination", "peer") must wait at ``now``: the
    target is not configured in this process (``queued_under``: the configuration file the job was
    queued with, which did name it), or ``now`` is outside its schedule; None if it may run."""
    target = targets.get(name) if isinstance(name, str) else None
    if target is None:
        where = f" (the job was queued under {queued_under})" if isinstance(queued_under, str) and queued_under else ""
        return f"{what} {name!r} is not configured in this process{where}"
    schedules = parse_schedules(target.schedule)
    if allowed(schedules, now):
        return None
    return (f"outside {target.name}'s schedule ({' or '.join(target.schedule)}) "
            f"until {next_allowed(schedules, now):%Y-%m-%d %H:%M}")


def _day_of_week(when: datetime) -> int:
    return (when.weekday() + 1) % 7  # Monday=0 .. Sunday=6  ->  Sunday=0 .. Saturday=6


def _every(name: str) -> frozenset[int]:
    return frozenset(range(_FIELDS[name][0]))


def _parse_field(text: str, name: str, value: str) -> frozenset[int]:
    """The set of values one field names: ``*``, numbers, ranges ``a-b`` (wrapping) and comma lists."""
    if value == "*":
        return _every(name)
    size, meaning = _FIELDS[name]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"schedule {text!r}: {name}={value!r} {why}; {name} takes {meaning}, "
                           "a range a-b (wrapping round when a > b), a comma list of those, or *")

    def number(part: str) -> int:
        if not _NUMBER.fullmatch(part):
            raise bad(f"has {part!r} where a number belongs" if part else "is missing a number")
        n = int(part)
        if n >= size:
            raise bad(f"has {n}, which is out of range")
        return n

    chosen: set[int] = set()
    for item in value.split(","):
        first, dash, last = item.partition("-")
        if not dash:
            chosen.add(number(item))
            continue
        start, end = number(first), number(last)
        # Count round the clock (or the week) from start to end, both included: 18-6 is 18..23, 0..6.
        span = (end - start) % size + 1
        chosen.update((start + i) % size for i in range(span))
    return frozenset(chosen)
