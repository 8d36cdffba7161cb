"""How dicomfs writes a log record: one line, whatever the names and strings in it hold.

A log line quotes what clients choose: upload names, WebDAV paths, peer names, DICOM values. A
name holding CR or LF (``touch "uploads/x\\n2026-01-01 INFO forged"``) would write a line of the
attacker's choosing into the log, and terminal escapes or bidi controls would make a line read
otherwise than it is. So every handler dicomfs sets up formats with ``EscapingFormatter``, which
writes C0 and C1 control characters, DEL, bidi controls, the Unicode line separators and a
name's undecodable bytes as escapes (``\\n``, ``\\x1b``, ``\\u202e``, ``\\xff``), the way journald
and nginx's access log do: no call site can forget. A traceback keeps its lines, each indented,
so that even an exception message holding a line break cannot start a line that reads as a
record of its own.
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
    # A name's undecodable bytes arrive as lone surrogates (os.fsdecode's surrogateescape): the
    # UTF-8 log file cannot encode them and would drop the whole line, so they become the bytes'
    # escapes (U+DCFF is the byte 0xFF) and any other surrogate its code point.
    **{code: f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code < 0xDD00 else f"\\u{code:04x}" for code in range(0xD800, 0xE000)},
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
