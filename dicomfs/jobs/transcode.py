"""Transfer syntaxes for export: which one to send in, and decoding an instance when it must change.

dcm4chee's STOW-RS exporter has a ``transfer-syntax`` property, the list of syntaxes the
destination accepts. An instance whose stored syntax is in the list (or any instance, when the list
is empty) is sent as stored; any other is sent decompressed, in Explicit VR Little Endian, or in
Implicit VR Little Endian when only that one of the two is listed. :func:`choose_syntax` is that
rule, :func:`parse_syntaxes` reads the list, :func:`transcoded` does the decoding.

Deflate and RLE Lossless are decoded by pydicom itself; the JPEG family (baseline, extended,
lossless, JPEG-LS, JPEG 2000, HTJ2K) needs a pydicom pixel data plugin such as ``pylibjpeg`` with
``pylibjpeg-libjpeg`` or ``pylibjpeg-openjpeg``; :class:`TranscodeError` says which to install.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from io import BytesIO

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary  # the only table with the retired syntaxes too
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomfs.errors import ConfigError, DicomfsError

__all__ = ["TARGET_SYNTAXES", "TranscodeError", "choose_syntax", "parse_syntaxes", "transcoded"]

# What transcoded() can produce.
TARGET_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

_TRANSFER_SYNTAXES = {uid: entry[4] for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"}
_BY_KEYWORD = {keyword.lower(): UID(uid) for uid, keyword in _TRANSFER_SYNTAXES.items() if keyword}
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)+")


class TranscodeError(DicomfsError):
    """An instance cannot be converted to the transfer syntax the destination accepts.

    The message says why: no decoder for its syntax in pydicom, a decoder plugin to install
    (``pip install pylibjpeg pylibjpeg-libjpeg``), or a file that does not decode.
    """


def choose_syntax(stored: str, accepted: frozenset[str]) -> str | None:
    """The transfer syntax to send an instance stored in `stored` in, or None to send it as stored.

    dcm4chee's rule: with no `accepted` list or `stored` in it, as stored; otherwise Explicit VR
    Little Endian if accepted, else Implicit VR Little Endian if accepted, else Explicit VR Little
    Endian anyway (decompressed is the best guess at what an archive can take). None as well
    when that choice is `stored` itself.
    """
    if not accepted or stored in accepted:
        return None
    if ExplicitVRLittleEndian in accepted:
        target = ExplicitVRLittleEndian
    elif ImplicitVRLittleEndian in accepted:
        target = ImplicitVRLittleEndian
    else:
        target = ExplicitVRLittleEndian
    return None if target == stored else str(target)


def parse_syntaxes(values: Sequence[str]) -> frozenset[str]:
    """Transfer syntax UIDs from UIDs or pydicom keywords (``JPEGLosslessSV1``, ``ExplicitVRLittleEndian``).

    Keywords are matched without regard to case; a value may also be a comma-separated list, as in
    dcm4chee's ``transfer-syntax=`` property; blanks are ignored. Raises
    :class:`~dicomfs.errors.ConfigError` naming every value that is not a known transfer syntax.
    """
    found: set[str] = set()
    unknown: list[str] = []
    for value in _split(values):
        if _UID_PATTERN.fullmatch(value):
            if value in _TRANSFER_SYNTAXES:
                found.add(value)
            elif value in UID_dictionary:
                unknown.append(f"{value} (that is {UID_dictionary[value][0]}, not a transfer syntax)")
            else:
                unknown.append(f"{value} (not a transfer syntax UID pydicom knows)")
        elif value.lower() in _BY_KEYWORD:
            found.add(str(_BY_KEYWORD[value.lower()]))
        else:
            unknown.append(repr(value))
    if unknown:
        raise ConfigError(f"unknown transfer syntax {', '.join(unknown)}; use UIDs or pydicom keywords such as "
                          "ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGBaseline8Bit, JPEG2000Lossless, RLELossless")
    return frozenset(found)


def _split(values: Sequence[str]) -> Iterator[str]:
    if isinstance(values, str):  # one string given where a list was meant: still a list of one
        values = [values]
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                yield part.strip()


def transcoded(data: bytes, target: str) -> bytes:
    """The Part 10 file `data`, decoded and written again in `target` (Explicit or Implicit VR Little Endian).

    Compressed pixel data is decompressed (to RGB for YCbCr JPEG, as pydicom does); the SOP
    Instance UID and every other element are kept. This needs the whole instance in memory, a few
    times over (the file, the dataset, the decoded pixels, the result): acceptable only because it
    is done for the instances that must be transcoded, one at a time per request, never for those
    sent as stored, which are streamed.

    Raises
    ------
    TranscodeError
        No decoder in pydicom for the stored syntax, a decoder plugin missing (the message says
        what to ``pip install``), big endian data, or a file that does not decode.
    ValueError
        `target` is neither Explicit nor Implicit VR Little Endian.
    """
    target_uid = UID(target)
    if target_uid not in TARGET_SYNTAXES:
        raise ValueError(f"cannot transcode to {target_uid.name}; only to Explicit or Implicit VR Little Endian")
    try:
        ds = dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as error:
        raise TranscodeError(f"cannot read the instance to transcode it: {error}") from error
    stored = UID(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else UID("")
    if not stored:
        raise TranscodeError("the instance has no transfer syntax in its file meta information")
    if stored == ExplicitVRBigEndian:
        raise TranscodeError("Explicit VR Big Endian instances cannot be converted to little endian (pydicom does not)")
    if stored.is_compressed and "PixelData" in ds:
        _decompress(ds, stored)
    _drop_compressed_icons(ds)
    ds.file_meta.TransferSyntaxUID = target_uid
    out = BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError) as error:
        raise TranscodeError(f"cannot write the instance as {target_uid.name}: {error}") from error
    return out.getvalue()


def _decompress(ds: Dataset, stored: UID) -> None:
    name = stored.name or str(stored)
    try:
        decoder = get_decoder(stored)
    except NotImplementedError:
        raise TranscodeError(f"pydicom cannot decode {name}; send such instances to a destination that accepts "
                             f"{stored} as stored") from None
    if not decoder.is_available:
        raise TranscodeError(f"cannot decode {name}: no decoder plugin installed; {_install_hint(decoder.missing_dependencies)}")
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as error:  # decoder plugins raise anything; the caller needs one type
        raise TranscodeError(f"cannot decode the {name} pixel data: {type(error).__name__}: {error}") from error


def _install_hint(missing: Sequence[str]) -> str:
    """``pip install ...`` for one plugin, pylibjpeg's preferred, from pydicom's missing dependencies.

    pydicom describes them as ``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"``.
    """
    ordered = sorted(missing, key=lambda text: not text.startswith("pylibjpeg"))
    for text in ordered:
        _, _, requirements = text.partition("requires ")
        packages = [m.group(0) for part in requirements.split(" and ")
                    if (m := re.match(r"[A-Za-z0-9_.\-]+", part.strip())) and m.group(0) != "numpy"]
        if packages:
            return f"install one with: pip install {' '.join(packages)}"
    return "install a pydicom pixel data plugin (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"


def _drop_compressed_icons(ds: Dataset) -> None:
    """Remove icon images still encapsulated: decompress() only decodes the top-level pixel data."""
    if "IconImageSequence" not in ds:
        return
    for item in ds.IconImageSequence:
        element = item.get("PixelData")
        if element is not None and element.is_undefined_length:
            del ds.IconImageSequence  # optional (type 3); better none than one that cannot be read
            return
