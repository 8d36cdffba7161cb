"""Names of the files inside an XNAT zip, made from a ``structure`` template as CTP's compressor makes them.

A template is path elements separated by ``/``, the last one naming the file; each element is text
and DICOM tags, whose values replace them::

    (0010,0020)/(0020,000D) - [00080050]/(0040,0275)::(0040,1001).dcm
    └PatientID┘ └StudyInstanceUID " - " AccessionNumber┘ └first RequestAttributesSequence item's
                                                            RequestedProcedureID┘

Tags are hexadecimal, in parentheses or square brackets. Commas are removed before a tag is read,
so ``(0010,0020)``, ``(10,0020)``, ``[00100020]`` and ``[100020]`` are one tag: leading zeros may
be left out of the group but not out of the element (CTP reads ``(20,D)`` as ``0x20D``, element
020D of group 0, which is never what was meant, so it is refused here). ``A::B`` reads B in the
first item of sequence A, at any depth. Private tags such as ``(0019,10A2)`` work like any other.

:func:`parse_structure` refuses a bad template with a :class:`~dicomfs.errors.ConfigError` that
gives the 1-based character position and what was expected there, so a typo fails when the
configuration is loaded rather than in the middle of an export.

Naming rules (:meth:`Structure.name_for`), per path element:

1. Each tag is replaced by its value: a missing or empty element, a sequence path through an
   element that is not a sequence or has no item, and a sequence as the last tag all give
   ``default_string``; the values of a multi-valued element are joined with a backslash.
2. Whitespace around the element is dropped (CTP trims each element of the template, so
   ``(0010,0020) / (0020,000D)`` names a folder ``P1``, not ``P1_``); inside, runs of whitespace,
   ``/``, ``\\`` and control characters become ``whitespace_replacement`` (CTP replaces whitespace,
   slashes and backslashes; control characters are added because a name holding one is unreadable
   wherever the zip is unpacked).
3. An element that is then empty, ``.`` or ``..`` becomes ``default_string`` (after rule 2), so no
   name climbs out of the folder the zip is unpacked in.

The name ends in ``.dcm`` unless it already does (whatever the case): CTP always appends ``.dcm``,
which turns a template ending in ``.dcm`` into ``x.dcm.dcm``; keeping one is what such a template
means. An empty template names every file ``default_string``, as CTP does without a structure.
:func:`unique_names` then makes the names of one zip distinct as CTP does: ``UNKNOWN.dcm``,
``UNKNOWN[1].dcm``, ``UNKNOWN[2].dcm``.

Pure: no I/O, and pydicom is only a type here, so loading the configuration does not import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicomfs.errors import ConfigError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["DCM_SUFFIX", "Structure", "TagPath", "check_naming", "parse_structure", "unique_names"]

DCM_SUFFIX = ".dcm"

TagPath = tuple[int, ...]
"""One tag, or a sequence path: every tag but the last names a sequence whose first item is searched."""

Part = str | TagPath
"""Literal text, or the tag path whose value replaces it."""

_OPENERS = {"(": ")", "[": "]"}
_HEX = frozenset("0123456789abcdefABCDEF")
# Whitespace (Unicode's too), both slashes and the C0/C1 control characters, in runs.
_SEPARATORS = re.compile(r"[\s/\\\x00-\x1f\x7f-\x9f]+")
_UNSAFE = frozenset({"", ".", ".."})


@dataclass(frozen=True)
class Structure:
    """A parsed ``structure`` template: path elements, each a sequence of text and tag paths."""

    text: str
    elements: tuple[tuple[Part, ...], ...]

    def name_for(self, dataset: Dataset, default_string: str, whitespace_replacement: str) -> str:
        """The name of ``dataset``'s file inside the zip, ``/`` between folders.

        Parameters
        ----------
        dataset : pydicom.dataset.Dataset
            The instance's header (read with ``stop_before_pixels``: pixels are never named).
        default_string : str
            Stands for a missing or empty value, and for an element that would be empty, ``.`` or ``..``.
        whitespace_replacement : str
            Replaces each run of whitespace, slashes, backslashes and control characters.

        Returns
        -------
        str
            A relative name whose elements are neither empty, ``.`` nor ``..``, ending in ``.dcm``.

        Raises
        ------
        ConfigError
            ``default_string`` or ``whitespace_replacement`` cannot make safe names (see :func:`check_naming`).
        """
        check_naming(default_string, whitespace_replacement)
        folders = []
        for parts in self.elements:
            text = "".join(part if isinstance(part, str) else (_value(dataset, part) or default_string) for part in parts)
            folders.append(_safe_element(text.strip(), default_string, whitespace_replacement))
        name = "/".join(folders)
        return name if name.lower().endswith(DCM_SUFFIX) else name + DCM_SUFFIX


def check_naming(default_string: str, whitespace_replacement: str) -> None:
    """Refuse values that would not give safe names: ConfigError naming the key at fault.

    ``whitespace_replacement`` must not be empty (CTP falls back to ``_`` for an empty one) nor
    hold what it replaces; ``default_string`` must not be empty, ``.`` or ``..`` once replaced.
    """
    if not whitespace_replacement or _SEPARATORS.search(whitespace_replacement):
        raise ConfigError("whitespace_replacement must be a non-empty text without whitespace, '/', '\\' or control "
                          f"characters (got {whitespace_replacement!r})")
    if _SEPARATORS.sub(whitespace_replacement, default_string) in _UNSAFE:
        raise ConfigError(f"default_string must name a file: not empty, '.' or '..' (got {default_string!r})")


def parse_structure(text: str) -> Structure:
    """Parse a ``structure`` template (see the module's docstring for the syntax).

    Raises
    ------
    ConfigError
        The message gives the 1-based character position and what was expected there, e.g.
        ``character 9: expected 4 hex digits of the element (leading zeros are required there), found ')'``.
    """
    elements: list[tuple[Part, ...]] = []
    parts: list[Part] = []
    literal_start = 0
    position = 0
    while position < len(text):
        char = text[position]
        if char in _OPENERS:
            _flush(text[literal_start:position], parts)
            path, position = _tag_path(text, position)
            parts.append(path)
            literal_start = position
        elif char == "/":
            _flush(text[literal_start:position], parts)
            if not parts:
                raise _error(text, position, "a folder name before '/'")
            elements.append(tuple(parts))
            parts, position = [], position + 1
            literal_start = position
        elif char in ")]":
            raise _error(text, position, "text or a tag ('(' or '[' opens one)")
        else:
            position += 1
    _flush(text[literal_start:], parts)
    if elements and not parts:
        raise _error(text, len(text), "a file name after the last '/'")
    elements.append(tuple(parts))
    return Structure(text, tuple(elements))


def unique_names(names: Iterable[str]) -> list[str]:
    """The same names in the same order, later repeats made distinct as CTP does.

    The second ``a/x.dcm`` becomes ``a/x[1].dcm``, the third ``a/x[2].dcm`` (the number goes before
    a ``.dcm`` ending, else at the end); a number already taken by another name is skipped. Names are
    compared without case, so the zip unpacks whole on Windows and macOS too.
    """
    taken: set[str] = set()
    counts: dict[str, int] = {}
    unique: list[str] = []
    for name in names:
        has_suffix = name.lower().endswith(DCM_SUFFIX)
        stem, suffix = (name[:-len(DCM_SUFFIX)], name[-len(DCM_SUFFIX):]) if has_suffix else (name, "")
        key = name.casefold()
        count, candidate = counts.get(key, 0), name
        while candidate.casefold() in taken:
            count += 1
            candidate = f"{stem}[{count}]{suffix}"
        counts[key] = count
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _flush(literal: str, parts: list[Part]) -> None:
    if literal:
        parts.append(literal)


def _error(text: str, index: int, expected: str) -> ConfigError:
    found = repr(text[index]) if index < len(text) else "the end"
    return ConfigError(f"character {index + 1}: expected {expected}, found {found}")


def _tag_path(text: str, start: int) -> tuple[TagPath, int]:
    """The tag path starting at ``text[start]`` (an opener) and the index just after it."""
    tags = []
    position = start
    while True:
        tag, position = _tag(text, position)
        tags.append(tag)
        if not text.startswith("::", position):
            return tuple(tags), position
        position += 2
        if position >= len(text) or text[position] not in _OPENERS:
            raise _error(text, position, "a tag after '::'")


def _tag(text: str, start: int) -> tuple[int, int]:
    """The tag opened at ``text[start]`` and the index just after its closer."""
    closer = _OPENERS[text[start]]
    body_start = start + 1
    end = body_start
    while end < len(text) and text[end] != closer:
        if text[end] not in _HEX and text[end] != ",":
            raise _error(text, end, f"a hex digit, ',' or {closer!r} in the tag opened at character {start + 1}")
        end += 1
    if end == len(text):
        raise _error(text, end, f"{closer!r} closing the tag opened at character {start + 1}")
    body = text[body_start:end]
    if body.count(",") > 1:
        raise _error(text, body_start + body.index(",", body.index(",") + 1), "one ',' at most in a tag")
    if "," in body:
        group, element = body.split(",")
        if not 1 <= len(group) <= 4:
            raise _error(text, body_start + (4 if group else 0), "1 to 4 hex digits of the group")
        if len(element) != 4:
            where = body_start + len(group) + 1 + min(len(element), 4)
            raise _error(text, where, "4 hex digits of the element (leading zeros are required there)")
    elif not 5 <= len(body) <= 8:
        raise _error(text, body_start + min(len(body), 8),
                     "5 to 8 hex digits: 1 to 4 of the group, then 4 of the element, e.g. [00100020]")
    return int(body.replace(",", ""), 16), end + 1


def _value(dataset: Dataset, path: TagPath) -> str:
    """The text of the element at ``path``, "" when it is missing, empty or a sequence."""
    current = dataset
    for tag in path[:-1]:
        if tag not in current:
            return ""
        sequence = current[tag]
        if sequence.VR != "SQ" or not sequence.value:
            return ""
        current = sequence.value[0]
    if path[-1] not in current:
        return ""
    element = current[path[-1]]
    value = element.value
    if element.VR == "SQ" or value is None:
        return ""
    if isinstance(value, bytes | bytearray):  # UN, a private element read without its dictionary
        text = bytes(value).decode("latin-1")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, Sequence):  # MultiValue
        text = "\\".join(str(item) for item in value)
    else:
        text = str(value)
    return text.strip(" \x00")


def _safe_element(text: str, default_string: str, whitespace_replacement: str) -> str:
    element = _SEPARATORS.sub(whitespace_replacement, text)
    if element in _UNSAFE:
        element = _SEPARATORS.sub(whitespace_replacement, default_string)
    return element
