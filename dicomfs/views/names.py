"""File and folder names that every client can use, made from DICOM values.

Orthanc's WebDAV share deletes every non-ASCII byte (``MÜLLER`` becomes ``MLLER``), deletes ``/``
and ``\\`` (so ``PAT/0005`` collides with ``PAT0005``), keeps ``: * ? " < > |`` that Windows
refuses, never cuts long names, and numbers colliding names in the order it first met them, so a
name can change after a restart. Here:

- UTF-8 stays readable, normalised to NFC (macOS would otherwise show two spellings of é);
- characters Windows, macOS or Linux refuse (``/ \\ : * ? " < > |`` and control characters) become
  ``_``; trailing dots and spaces go; device names (``CON``, ``LPT1``, ``nul.txt``…) get a ``_``;
- so do characters that change how a name reads without showing themselves (Unicode format
  characters: bidi controls such as U+202E, which made ``MÜLLER<U+202E>gpj.exe`` read as
  ``MÜLLERexe.jpg``, zero-width ones, the soft hyphen) and lone surrogates, and a leading dot,
  which would hide the folder; no name is ``.`` or ``..``;
- an empty value gets a placeholder such as ``(no name)``;
- a component is cut to 255 bytes of UTF-8 at a character boundary, keeping its suffix and
  extension;
- siblings that would share a name (compared as Windows and macOS do, ignoring case) are told apart
  by ``(2)``, ``(3)``… given in the order the resources were first stored, then by UID, so a
  name never changes when other data arrives or the mount restarts.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence, TypeVar

__all__ = ["MAX_NAME_BYTES", "disambiguate", "fit_name", "join_fields", "safe_text"]

MAX_NAME_BYTES = 255
"""The longest file name ext4, NTFS, APFS and SMB accept (bytes on Linux, UTF-16 units elsewhere:
255 UTF-8 bytes never exceed 255 UTF-16 units)."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_SPACES = re.compile(r"\s+")
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{device}{n}" for device in ("COM", "LPT") for n in (*"123456789", "¹", "²", "³")]
)
"""Windows device names: refused as a name with any extension, in any case."""
_SEPARATOR = " - "
_INVISIBLE = frozenset({"Cc", "Cf", "Cs"})
"""Unicode categories replaced: controls (C1 ones too), format characters, lone surrogates.
Unassigned (Cn) and private-use (Co) characters stay: a character a newer Unicode assigns would
otherwise change a name that was shown before."""

K = TypeVar("K")


def safe_text(value: str) -> str:
    """A DICOM value made safe inside a name: unsafe and invisible characters replaced, spaces
    tidied, NFC."""
    text = unicodedata.normalize("NFC", value)
    text = _UNSAFE.sub("_", text)
    text = _SPACES.sub(" ", text).strip()
    if not text.isprintable():  # rare (isprintable is one C loop): only then look at each character
        text = "".join("_" if unicodedata.category(c) in _INVISIBLE else c for c in text)
    return text


def join_fields(fields: Sequence[tuple[str, str]]) -> str:
    """``"A - B - C"`` from (value, placeholder) pairs; an empty value shows its placeholder."""
    return _SEPARATOR.join(safe_text(value).rstrip(". ") or placeholder for value, placeholder in fields)


def fit_name(stem: str, *, suffix: str = "", extension: str = "") -> str:
    """``stem + suffix + extension`` made a valid name of at most 255 bytes.

    The stem is cut when the whole would be too long (the suffix, e.g. `` (2)``, and the
    extension, e.g. ``.dcm``, are kept), then trailing dots and spaces are removed and device
    names are escaped, since Windows would refuse or silently alter them.
    """
    room = MAX_NAME_BYTES - len((suffix + extension).encode("utf-8"))
    encoded = stem.encode("utf-8")
    if len(encoded) > room:
        stem = encoded[:room].decode("utf-8", "ignore")  # drop a character cut in half
    stem = stem.rstrip(". ")
    if not stem:
        stem = "_"
    elif stem[0] == ".":  # a leading dot hides the folder from ls and file managers
        stem = "_" + stem[1:]
    name = stem + suffix + extension
    if name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        name = "_" + name if len(name.encode("utf-8")) < MAX_NAME_BYTES else "_" + name[1:]
    if name.rstrip(". ") != name:  # only when the extension itself ends so; never for ours
        name = name.rstrip(". ") or "_"
    return name


def disambiguate(items: Sequence[tuple[str, str]], order: Sequence[K]) -> list[str]:
    """Unique names for siblings, from their (stem, extension) and sort keys.

    Siblings take names in ``order`` (first stored, then UID): each keeps its own name when no
    earlier sibling has it, else gets the first free `` (2)``, `` (3)``…. A name therefore depends
    only on siblings stored before it: data arriving later never renames anything, and neither
    does a restart. (Deleting a sibling can free a name for a later one.) Names are compared
    ignoring case and Unicode form, as Windows and macOS clients compare them.
    """
    names = [""] * len(items)
    taken: set[str] = set()
    for position in sorted(range(len(items)), key=lambda p: order[p]):  # type: ignore[arg-type,return-value]
        stem, extension = items[position]
        name = fit_name(stem, extension=extension)
        number = 1
        while _folded(name) in taken:
            number += 1
            name = fit_name(stem, suffix=f" ({number})", extension=extension)
        taken.add(_folded(name))
        names[position] = name
    return names


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()
