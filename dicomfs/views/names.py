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
  by ``(2)``, ``(3)``…, and a name once shown never changes while its resource exists: not when
  siblings arrive, not when they go, not across restarts.

That last rule needs memory. Names computed from the siblings present alone cannot keep it: with
A and B both "X", one of them is "X (2)"; once A is deleted, B alone would be "X" again, and
``rm -r`` of the folder, which lists it and then removes each name, found "X (2)" gone (ENOENT) and
"X" a folder it had not listed. A suffix from the UID for every holder but the first has the same
flaw (the second becomes the first). So the number is given once, when a listing first sees the
collision, and kept in the index (``Store.keep_name_numbers``): ``n`` for `` (n)``, and ``1``
for the sibling that keeps the plain name, so that which one keeps it never rests on stored times
(a clock set back) again. The store deletes a resource's numbers with it, so a resource stored
again is a newcomer: it takes the plain name or the first free number. Numbers are decided in an LMDB write transaction that reads
the kept ones first, so a mount and a bridge over one store agree whoever lists first; a
read-only store computes them the same way without keeping them.

Ordinary names do not change: a sibling whose name collides with nothing keeps no number and is
named as before, and a folder that collides nowhere costs one empty range read and no write (no
read per entry). When a collision is first seen, numbers go to the siblings in the order they
were first stored (then by UID), each taking its plain name if free, else the first free
`` (n)``: the order names were given before numbers were kept, so an archive's names stay as
they were shown.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Mapping, Sequence, TypeVar

__all__ = ["MAX_NAME_BYTES", "disambiguate", "fit_name", "join_fields", "number_siblings", "safe_text"]

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


def number_siblings(items: Sequence[tuple[str, str]], order: Sequence[K], kept: Mapping[int, int]
                    ) -> tuple[list[str], dict[int, int]]:
    """Unique names for siblings, and the numbers to keep for them (see the module docstring).

    Parameters
    ----------
    items : sequence of (stem, extension)
        What each sibling would be called alone.
    order : sequence of sort keys
        The order siblings take names in: first stored first, then by UID.
    kept : mapping of position to number
        The numbers kept for siblings (1: the plain name, n: `` (n)``).

    Returns
    -------
    names : list of str
        One per sibling, unique ignoring case and Unicode form.
    numbers : dict of position to number
        Numbers to keep: for each sibling that collides and keeps none yet (or whose kept name
        another kept one holds, which only a damaged index could cause).
    """
    bases = [fit_name(stem, extension=extension) for stem, extension in items]
    folded = [_folded(base) for base in bases]
    if not kept and len(set(folded)) == len(folded):
        return bases, {}  # the usual folder: nothing collides, nothing is kept
    sharing = collections.Counter(folded)
    names: list[str | None] = [None] * len(items)
    taken: set[str] = set()
    for position, number in sorted(kept.items(), key=lambda kept_at: order[kept_at[0]]):  # type: ignore[arg-type,return-value]
        name = _numbered(items[position], number, bases[position])
        if _folded(name) not in taken:  # shown under this name: nothing else may take it
            taken.add(_folded(name))
            names[position] = name
    numbers: dict[int, int] = {}
    # Per name, the number to try next: every one below it is taken, so the search goes on from
    # there and n siblings of one name cost n tries, not n²/2 (a hostile series of 20,000 took minutes).
    untried: dict[str, int] = {}
    for position in sorted(range(len(items)), key=lambda p: order[p]):  # type: ignore[arg-type,return-value]
        if names[position] is not None:
            continue
        name, number = bases[position], 1
        if _folded(name) in taken:
            number = untried.get(folded[position], 2)
            name = _numbered(items[position], number, bases[position])
            while _folded(name) in taken:
                number += 1
                name = _numbered(items[position], number, bases[position])
            untried[folded[position]] = number + 1
        taken.add(_folded(name))
        names[position] = name
        if number > 1 or sharing[folded[position]] > 1 or position in kept:
            numbers[position] = number
    return [name for name in names if name is not None], numbers


def disambiguate(items: Sequence[tuple[str, str]], order: Sequence[K]) -> list[str]:
    """The names ``number_siblings`` gives siblings of which none keeps a number yet."""
    return number_siblings(items, order, {})[0]


def _numbered(item: tuple[str, str], number: int, base: str) -> str:
    stem, extension = item
    return base if number == 1 else fit_name(stem, suffix=f" ({number})", extension=extension)


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()
