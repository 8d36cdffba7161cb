"""When the mount makes small uploads/ file calls on a thread instead of the loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfs.mount.diskpressure import (
    BUSY_PERCENT,
    MOST_HOLD_SECONDS,
    SLOW_CALL_SECONDS,
    SLOW_HOLD_SECONDS,
    DiskPressure,
    io_pressure,
)

PSI = "some avg10={some:.2f} avg60=0.50 avg300=0.20 total=123456\nfull avg10=0.00 avg60=0.10 avg300=0.05 total=4567\n"


def test_io_pressure_reads_the_some_line_avg10(tmp_path: Path) -> None:
    psi = tmp_path / "io"
    psi.write_text(PSI.format(some=42.5))
    assert io_pressure(psi) == 42.5


@pytest.mark.parametrize("text", ["", "garbage\n", "some avg10=x total=1\n", "full avg10=3.0\n"])
def test_io_pressure_that_does_not_read_as_psi_is_none(tmp_path: Path, text: str) -> None:
    psi = tmp_path / "io"
    psi.write_text(text)
    assert io_pressure(psi) is None


def test_io_pressure_without_psi_is_none(tmp_path: Path) -> None:
    assert io_pressure(tmp_path / "missing") is None


def test_this_kernel_reports_io_pressure_or_none() -> None:
    figure = io_pressure()
    assert figure is None or 0.0 <= figure <= 100.0


def test_busy_when_the_pressure_passes_the_threshold() -> None:
    disk = DiskPressure()
    assert not disk.busy
    disk.measured(BUSY_PERCENT + 0.1)
    assert disk.busy
    disk.measured(BUSY_PERCENT)
    assert not disk.busy
    disk.measured(None)  # no PSI: only slow calls tell
    assert not disk.busy


def test_one_slow_call_sends_the_next_seconds_to_threads() -> None:
    now = [1000.0]
    disk = DiskPressure(clock=lambda: now[0])
    disk.took(SLOW_CALL_SECONDS / 2)
    assert not disk.busy
    disk.took(SLOW_CALL_SECONDS * 2)
    assert disk.busy
    now[0] += SLOW_HOLD_SECONDS - 0.1
    disk.measured(0.0)  # quiet figures do not end the hold early
    assert disk.busy
    now[0] += 0.2
    assert not disk.busy


def test_a_lag_that_lasts_holds_longer_and_a_single_stall_does_not() -> None:
    now = [1000.0]
    disk = DiskPressure(clock=lambda: now[0])
    holds = []
    for _ in range(6):  # slow again each time the loop tries: the hold doubles up to its cap
        disk.took(SLOW_CALL_SECONDS * 2)
        start = now[0]
        while disk.busy:
            now[0] += 0.05
        holds.append(round(now[0] - start, 1))
    assert holds[:3] == [SLOW_HOLD_SECONDS, 2 * SLOW_HOLD_SECONDS, 4 * SLOW_HOLD_SECONDS]
    assert max(holds) == MOST_HOLD_SECONDS
    now[0] += MOST_HOLD_SECONDS + 0.1  # quiet for longer than the last hold: the next stall starts over
    disk.took(SLOW_CALL_SECONDS * 2)
    now[0] += SLOW_HOLD_SECONDS + 0.05
    assert not disk.busy
