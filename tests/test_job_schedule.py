"""Export schedules: dcm4chee's ``hour=... dayOfWeek=...`` text, parsed and evaluated in wall-clock time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dicomfs.errors import ConfigError
from dicomfs.jobs.schedule import Schedule, allowed, next_allowed, parse_schedule, parse_schedules

# 1 June 2024 is a Saturday: SAT, SUN, MON, ... FRI, SAT2 are the dates of one week and a day.
SAT, SUN, MON, TUE, WED, THU, FRI, SAT2 = (datetime(2024, 6, day) for day in range(1, 9))

NIGHTS = "hour=18-6 dayOfWeek=*"
WEEKENDS = "hour=* dayOfWeek=0,6"


def at(day: datetime, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute, second=second)


def test_nights_wrap_round_midnight_and_include_the_whole_last_hour() -> None:
    nights = parse_schedule(NIGHTS)
    assert nights.hours == frozenset({18, 19, 20, 21, 22, 23, 0, 1, 2, 3, 4, 5, 6})
    assert nights.days == frozenset(range(7))
    assert nights.text == NIGHTS
    assert not nights.allows(at(TUE, 17, 59, 59))
    assert nights.allows(at(TUE, 18))
    assert nights.allows(at(TUE, 23, 59, 59))
    assert nights.allows(at(WED, 0))
    assert nights.allows(at(WED, 6, 59, 59))
    assert not nights.allows(at(WED, 7))
    assert not nights.allows(at(WED, 12, 30))


def test_weekends_are_saturday_and_sunday_all_day() -> None:
    weekends = parse_schedule(WEEKENDS)
    assert weekends.days == frozenset({0, 6})
    assert weekends.hours == frozenset(range(24))
    assert not weekends.allows(at(FRI, 23, 59, 59))
    assert weekends.allows(at(SAT, 0))
    assert weekends.allows(at(SAT, 12))
    assert weekends.allows(at(SUN, 23, 59, 59))  # the Sunday/Saturday ends of the week, both in
    assert not weekends.allows(at(MON, 0))
    assert not weekends.allows(at(WED, 12))


def test_several_schedules_allow_what_any_of_them_allows() -> None:
    both = parse_schedules([NIGHTS, WEEKENDS])
    assert [s.text for s in both] == [NIGHTS, WEEKENDS]
    assert allowed(both, at(WED, 3))          # a weekday night
    assert not allowed(both, at(WED, 12))     # a weekday during business hours
    assert allowed(both, at(SAT, 12))         # the weekend by day
    assert allowed(both, at(SUN, 12))
    assert not allowed(both, at(MON, 7))      # the weekend is over, and so is the night


def test_no_schedules_means_no_restriction() -> None:
    assert parse_schedules([]) == ()
    assert allowed((), at(WED, 12))
    assert allowed([], at(WED, 12))
    assert next_allowed((), at(WED, 12, 34, 56)) == at(WED, 12, 34, 56)


def test_missing_fields_mean_any() -> None:
    assert parse_schedule("hour=9").days == frozenset(range(7))
    assert parse_schedule("dayOfWeek=3").hours == frozenset(range(24))
    assert parse_schedule("dayOfWeek=3  hour=9 ").hours == frozenset({9})  # either order, any spacing


def test_values_numbers_ranges_and_lists() -> None:
    assert parse_schedule("hour=5").hours == frozenset({5})
    assert parse_schedule("hour=05").hours == frozenset({5})
    assert parse_schedule("hour=9-17").hours == frozenset(range(9, 18))
    assert parse_schedule("hour=4-4").hours == frozenset({4})  # a one-hour range, not an empty or whole day
    assert parse_schedule("hour=23-0").hours == frozenset({23, 0})
    assert parse_schedule("hour=0-23").hours == frozenset(range(24))
    assert parse_schedule("hour=1,3,20-22").hours == frozenset({1, 3, 20, 21, 22})
    assert parse_schedule("hour=22-1,12").hours == frozenset({22, 23, 0, 1, 12})
    assert parse_schedule("hour=3,3,2-4").hours == frozenset({2, 3, 4})
    assert parse_schedule("dayOfWeek=1-5").days == frozenset({1, 2, 3, 4, 5})  # Monday to Friday
    assert parse_schedule("dayOfWeek=5-1").days == frozenset({5, 6, 0, 1})    # Friday round to Monday
    assert parse_schedule("dayOfWeek=0-6").days == frozenset(range(7))
    assert parse_schedule("dayOfWeek=6,0").days == frozenset({0, 6})


def test_weekday_numbering_follows_dcm4chee_not_python() -> None:
    days = [SUN, MON, TUE, WED, THU, FRI, SAT]
    for number, day in enumerate(days):
        only = parse_schedule(f"dayOfWeek={number}")
        assert [only.allows(at(d, 12)) for d in days] == [d is day for d in days], number


def test_next_allowed_is_when_itself_if_allowed() -> None:
    nights = parse_schedules([NIGHTS])
    assert next_allowed(nights, at(WED, 18, 20, 7)) == at(WED, 18, 20, 7)
    assert next_allowed(nights, at(WED, 6, 59, 59)) == at(WED, 6, 59, 59)


def test_next_allowed_waits_for_the_start_of_the_next_allowed_hour() -> None:
    nights = parse_schedules([NIGHTS])
    assert next_allowed(nights, at(WED, 7)) == at(WED, 18)
    assert next_allowed(nights, at(WED, 17, 59, 59).replace(microsecond=999_999)) == at(WED, 18)
    # dcm4chee's own example: Thursday 8 October 2015 10:00 waits for 18:00, Saturday 10:00 runs at once.
    both = parse_schedules([NIGHTS, WEEKENDS])
    assert next_allowed(both, datetime(2015, 10, 8, 10)) == datetime(2015, 10, 8, 18)
    assert next_allowed(both, datetime(2015, 10, 10, 10)) == datetime(2015, 10, 10, 10)


def test_next_allowed_crosses_midnight_into_the_next_day() -> None:
    early = parse_schedules(["hour=2-4"])
    assert next_allowed(early, at(WED, 5)) == at(THU, 2)
    assert next_allowed(early, at(WED, 23, 30)) == at(THU, 2)
    assert next_allowed(parse_schedules(["hour=0"]), at(SAT, 23, 59, 59)) == at(SUN, 0)  # and a month end: 31 May -> 1 June
    assert next_allowed(parse_schedules(["hour=0"]), datetime(2024, 5, 31, 1)) == datetime(2024, 6, 1, 0)


def test_next_allowed_crosses_the_week_boundary() -> None:
    weekends = parse_schedules([WEEKENDS])
    assert next_allowed(weekends, at(FRI, 23, 30)) == at(SAT2, 0)
    assert next_allowed(weekends, at(MON, 0)) == at(SAT2, 0)
    sundays = parse_schedules(["hour=3 dayOfWeek=0"])
    assert next_allowed(sundays, at(SAT, 23)) == at(SUN, 3)             # Saturday -> Sunday, across the week's end
    assert next_allowed(sundays, at(SUN, 4)) == at(SUN + timedelta(days=7), 3)  # just missed: nearly a whole week on
    assert next_allowed(sundays, at(SUN, 3, 59)) == at(SUN, 3, 59)


def test_next_allowed_takes_the_earliest_of_several() -> None:
    both = parse_schedules(["hour=20 dayOfWeek=3", "hour=9 dayOfWeek=4", "hour=21"])
    assert next_allowed(both, at(WED, 10)) == at(WED, 20)
    assert next_allowed(both, at(WED, 21, 30)) == at(WED, 21, 30)
    assert next_allowed(both, at(WED, 22)) == at(THU, 9)


def test_next_allowed_gives_up_on_a_schedule_that_allows_nothing() -> None:
    # parse_schedule never makes an empty field; only a hand-built Schedule can.
    never = Schedule(hours=frozenset(), days=frozenset(range(7)), text="hand-built")
    with pytest.raises(ValueError, match="hand-built"):
        next_allowed([never], at(WED, 12))


def test_wall_clock_times_need_no_dst_handling() -> None:
    # Europe's clocks went forward at 02:00 on 31 March 2024; naive local times just count hours on the clock.
    two_am = parse_schedules(["hour=2"])
    assert next_allowed(two_am, datetime(2024, 3, 30, 23)) == datetime(2024, 3, 31, 2)
    assert next_allowed(parse_schedules(["hour=3"]), datetime(2024, 10, 27, 2, 30)) == datetime(2024, 10, 27, 3)
    # An aware time is judged by its own wall clock, and the answer keeps its zone.
    tokyo = timezone(timedelta(hours=9))
    nights = parse_schedules([NIGHTS])
    assert allowed(nights, datetime(2024, 6, 5, 9, tzinfo=timezone.utc)) is False
    assert allowed(nights, datetime(2024, 6, 5, 9, tzinfo=timezone.utc).astimezone(tokyo)) is True  # 18:00 in Tokyo
    assert next_allowed(nights, datetime(2024, 6, 5, 12, tzinfo=tokyo)) == datetime(2024, 6, 5, 18, tzinfo=tokyo)


@pytest.mark.parametrize(("text", "quoted", "hint"), [
    ("hour=25", "hour='25'", "hours 0-23"),
    ("dayOfWeek=7", "dayOfWeek='7'", "days 0-6 (0 = Sunday)"),
    ("hour=3-", "hour='3-'", "missing a number"),
    ("hour=-3", "hour='-3'", "missing a number"),
    ("hour=3-25", "hour='3-25'", "out of range"),
    ("hour=1-2-3", "hour='1-2-3'", "'2-3' where a number belongs"),
    ("hour=", "hour=''", "missing a number"),
    ("hour=1,,2", "hour='1,,2'", "missing a number"),
    ("hour=*,3", "hour='*,3'", "'*' where a number belongs"),
    ("hour=+3", "hour='+3'", "'+3' where a number belongs"),
    ("hour=six", "hour='six'", "'six' where a number belongs"),
    ("foo=1", "'foo=1' is not hour=VALUE or dayOfWeek=VALUE", "hour=18-6 dayOfWeek=*"),
    ("Hour=3", "'Hour=3' is not hour=VALUE or dayOfWeek=VALUE", "either may be left out"),
    ("hour 3", "'hour' is not hour=VALUE", "hour=VALUE dayOfWeek=VALUE"),
    ("hour=1 hour=2", "gives hour twice", "hour=VALUE dayOfWeek=VALUE"),
    ("", "'' is empty", "hour=VALUE dayOfWeek=VALUE"),
    ("   ", "'   ' is empty", "hour=VALUE dayOfWeek=VALUE"),
])
def test_bad_schedules_are_config_errors_that_quote_the_text_and_say_what_is_allowed(text: str, quoted: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert f"schedule {text!r}" in message
    assert quoted in message
    assert hint in message


def test_the_message_for_an_out_of_range_value_names_the_range() -> None:
    with pytest.raises(ConfigError, match=r"has 25, which is out of range; hour takes hours 0-23"):
        parse_schedule("hour=25")
    with pytest.raises(ConfigError, match=r"has 7, which is out of range; dayOfWeek takes days 0-6 \(0 = Sunday\)"):
        parse_schedule("dayOfWeek=7")


def test_a_bad_schedule_in_a_list_fails_the_list() -> None:
    with pytest.raises(ConfigError, match="dayOfWeek=9"):
        parse_schedules([NIGHTS, "hour=* dayOfWeek=9"])


def test_a_lone_string_is_not_taken_for_a_list() -> None:
    with pytest.raises(TypeError):
        parse_schedules(NIGHTS)
