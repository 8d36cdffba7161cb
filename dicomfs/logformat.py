"""How dicomfs writes a log record: one line, whatever the names and strings in it hold.

A log line quotes what clients choose: upload names, WebDAV paths, peer names, DICOM values. A
name holding CR or LF (``touch "uploads/x\\n2026-01-01 INFO forged"``) would write a line of the
attacker's choosing into the log, and terminal escapes or bidi controls would make a line read
otherwise than it is. So every handler dicomfs sets up formats with ``EscapingFormatter``, which
writes C0 and C1 control characters, DEL, bidi controls and the Unicode line separators as
escapes (``\\n``, ``\\x1b``, ``\\u202e``), the way journald and nginx's access log do: no call site
can forget. A traceback keeps its lines, each indented, so that even an exception message holding
a line break cannot start a line that reads as a record of its own.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LOG_FORMAT", "EscapingFormatter", "escape_controls"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BIDI_AND_SEPARATORS = ("\u061c", "\u200e", "\u200f", "\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)),
                        *map(chr, range(0x2066, 0x206A)))
_TRACEBACK_INDENT = "    "
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{ord(char): f"\\u{ord(char):04x}" for char in _BIDI_AND_SEPARATORS},
    **{ord(char): text for char, text in _NAMED.items()},
}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (see the module's docstring)."""
    return text.translate(_ESCAPES)


def _indented(text: str) -> str:
    return "\n".join(_TRACEBACK_INDENT + escape_controls(line) for line in text.split("\n"))


class EscapingFormatter(logging.Formatter):
    """A Formatter whose record line never holds a control character, and whose tracebacks
    follow it indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))
