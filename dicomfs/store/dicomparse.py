"""Read the identifying tags of a DICOM file, and check that the file is whole.

pydicom reads a header in about 1.2 ms on our machines and accepts some broken files silently
(a dataset cut in the middle, garbage after the ``DICM`` marker, short pixel data), so ingest uses
this walker instead: it steps over the top-level elements of the dataset without building a
Dataset, decodes only the ~25 tags the index keeps, and proves on the way that every element fits
in the file. It handles the encodings nearly every file uses (explicit and implicit VR little
endian, deflated, and every encapsulated syntax); big-endian and meta-less files go through
pydicom, which is slower but rare.

The result records ``header_length``, the offset of Pixel Data, so readers can fetch "everything
but the pixels" without touching pixel bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Union

from dicomfs.errors import MissingIdentifierError, NotDicomError, TruncatedError
from dicomfs.store.inflate import Expansion, expanded, inflate_raw

__all__ = ["DicomHeader", "parse_header", "DICOMDIR_SOP_CLASS"]

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]
"""Anything sliceable into bytes: the parser slices it directly (bytes and mmap slice fastest)."""

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
_NATIVE_SYNTAXES = {IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE}

# VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_SPECIFIC_CHARACTER_SET = 0x00080005

# The tags the index keeps, by tag number. Value kinds: "str" text, "int" IS text, "us" unsigned short.
_WANTED: dict[int, tuple[str, str]] = {
    0x00080016: ("SOPClassUID", "uid"),
    0x00080018: ("SOPInstanceUID", "uid"),
    0x00080020: ("StudyDate", "str"),
    0x00080030: ("StudyTime", "str"),
    0x00080050: ("AccessionNumber", "str"),
    0x00080060: ("Modality", "str"),
    0x00081030: ("StudyDescription", "str"),
    0x0008103E: ("SeriesDescription", "str"),
    0x00100010: ("PatientName", "pn"),
    0x00100020: ("PatientID", "str"),
    0x00100030: ("PatientBirthDate", "str"),
    0x00100040: ("PatientSex", "str"),
    0x0020000D: ("StudyInstanceUID", "uid"),
    0x0020000E: ("SeriesInstanceUID", "uid"),
    0x00200010: ("StudyID", "str"),
    0x00200011: ("SeriesNumber", "int"),
    0x00200013: ("InstanceNumber", "int"),
    0x00201002: ("ImagesInAcquisition", "int"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280008: ("NumberOfFrames", "int"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280100: ("BitsAllocated", "us"),
}
_KEPT = frozenset(_WANTED) | {_SPECIFIC_CHARACTER_SET}
_SHORT_VRS = frozenset(vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST",
    "TM", "UI", "UL", "US"))
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT_HEADER = struct.Struct("<HH0sI")  # group, element, no VR (b""), 32-bit length
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_META_KEPT = frozenset({0x0002, 0x0003, 0x0010})  # MediaStorageSOPClass/InstanceUID, TransferSyntaxUID


@dataclass(frozen=True)
class DicomHeader:
    """What ingest needs to know about one DICOM file.

    ``tags`` maps keywords of ``_WANTED`` to decoded values (``str`` or ``int``); absent
    elements are missing from it, empty ones map to ``""``. ``header_length`` is the offset of
    the Pixel Data element (the file size when there is none, or when the dataset is deflated).
    """

    transfer_syntax: str
    sop_class_uid: str
    tags: dict[str, object] = field(default_factory=dict)
    header_length: int = 0
    has_pixel_data: bool = False

    def text(self, keyword: str) -> str:
        """The value of a text tag, ``""`` when absent."""
        value = self.tags.get(keyword)
        return "" if value is None else str(value)

    def number(self, keyword: str) -> int | None:
        """The value of an integer tag, ``None`` when absent or not a number."""
        value = self.tags.get(keyword)
        return value if isinstance(value, int) else None

    @property
    def is_dicomdir(self) -> bool:
        """True for a DICOMDIR (Media Storage Directory), which is an index, not an instance."""
        return self.sop_class_uid == DICOMDIR_SOP_CLASS


class _Cut(Exception):
    """Raised internally when an element runs past the end of the buffer."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset


def parse_header(data: Buffer, *, require_identifiers: bool = True, expansion: Expansion = Expansion()) -> DicomHeader:
    """Parse a whole DICOM Part 10 file held in ``data`` (bytes, bytearray, memoryview or mmap).

    Parameters
    ----------
    data
        The complete file content: bytes, or an mmap so that pixel pages are never read.
    require_identifiers
        Check that Study, Series and SOP Instance UIDs are present (not for DICOMDIRs).
    expansion
        How far a deflated dataset may expand, and where it goes when too large for memory.

    Returns
    -------
    DicomHeader

    Raises
    ------
    NotDicomError
        Empty file, no DICOM marker, or no file meta information after ``DICM``.
    TruncatedError
        An element, the dataset or the pixel data runs past the end of the file.
    MissingIdentifierError
        A UID needed to file the instance is absent or empty.
    ExpansionError
        A deflated dataset expands past ``expansion.most``.
    """
    return _parse(data, require_identifiers, expansion)


def _parse(view: Buffer, require_identifiers: bool, expansion: Expansion = Expansion()) -> DicomHeader:
    size = len(view)
    if size == 0:
        raise NotDicomError("not DICOM: the file is empty")
    if size >= 132 and bytes(view[128:132]) == b"DICM":
        position = 132
    elif size >= 8 and bytes(view[0:2]) == b"\x02\x00" and bytes(view[4:6]).isalpha():
        position = 0  # a file meta group without the 128-byte preamble (seen from old writers)
    elif size >= 8 and bytes(view[0:2]) in (b"\x08\x00", b"\x00\x08"):
        return _parse_with_pydicom(bytes(view), require_identifiers)
    else:
        raise NotDicomError("not DICOM: no 'DICM' marker at byte 128 and no DICOM dataset at the start")
    meta, position = _read_file_meta(view, position)
    syntax = meta.get(0x00020010, "")
    if not syntax:
        raise NotDicomError("not DICOM: the file meta information has no TransferSyntaxUID")
    if syntax == EXPLICIT_VR_BE:
        return _parse_with_pydicom(bytes(view), require_identifiers)
    if syntax == DEFLATED_EXPLICIT_VR_LE:
        # Inflated in steps, counted against the cap, in memory or spilled to a mapped file (see
        # inflate): a 2 MB file can inflate to gigabytes. The file is stored as received.
        with expanded(inflate_raw(view, position), expansion) as (inflated, _):
            tags, _, pixel_found = _walk_dataset(inflated, 0, explicit=True)
        header_length = size  # pixels are inside the deflate stream: no separate pixel region
    else:
        explicit = _dataset_is_explicit(view, position, syntax)
        tags, pixel_offset, pixel_found = _walk_dataset(view, position, explicit=explicit)
        header_length = pixel_offset if pixel_found else size
        if pixel_found:
            _check_pixel_data(view, pixel_offset, explicit)
    sop_class = str(tags.get("SOPClassUID") or meta.get(0x00020002, ""))
    header = DicomHeader(syntax, sop_class, tags, header_length, pixel_found)
    if require_identifiers and not header.is_dicomdir:
        _require_identifiers(header)
    return header


def _dataset_is_explicit(view: Buffer, position: int, syntax: str) -> bool:
    """Whether the dataset really uses explicit VR: some writers declare one and write the other.

    pydicom makes the same check; the first element's bytes 4-5 are a VR exactly when explicit.
    """
    declared = syntax != IMPLICIT_VR_LE
    if position + 6 > len(view):
        return declared
    vr = bytes(view[position + 4 : position + 6])
    looks_explicit = vr.isalpha() and vr.isupper()
    return looks_explicit


def _read_file_meta(view: Buffer, position: int) -> tuple[dict[int, str], int]:
    """Read group 0002 (always explicit VR little endian); return its text values and the end."""
    values: dict[int, str] = {}
    size = len(view)
    unpack_header = _EXPLICIT_HEADER.unpack_from
    while position + 8 <= size:
        group, element, vr, length = unpack_header(view, position)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if position + 12 > size:
                raise TruncatedError("truncated: the file ends inside the file meta information")
            length = _U32.unpack_from(view, position + 8)[0]
            start = position + 12
        elif vr in _SHORT_VRS:
            start = position + 8
        else:
            raise NotDicomError("not DICOM: the file meta information is damaged")
        if length == _UNDEFINED or start + length > size:
            raise TruncatedError("truncated: the file ends inside the file meta information")
        if element in _META_KEPT:
            values[(group << 16) | element] = bytes(view[start : start + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        position = start + length
    if not values:
        raise NotDicomError("not DICOM: 'DICM' marker present but no file meta information follows")
    return values, position


def _walk_dataset(view: Buffer, position: int, *, explicit: bool) -> tuple[dict[str, object], int, bool]:
    """Step over top-level elements up to Pixel Data; return (wanted tags, pixel offset, found).

    This loop is ingest's hottest code: one precompiled unpack per element header, set lookups
    for the VR and the tag, and a slice only for the ~25 values the index keeps.
    """
    size = len(view)
    raw: dict[int, bytes] = {}
    unpack_header = _EXPLICIT_HEADER.unpack_from if explicit else _IMPLICIT_HEADER.unpack_from
    unpack_u32 = _U32.unpack_from
    try:
        while position < size:
            if position + 8 > size:
                raise _Cut("an element header", position)
            group, element, vr, length = unpack_header(view, position)
            tag = (group << 16) | element
            if tag in _PIXEL_TAGS:
                return _decode_wanted(raw), position, True
            if not explicit:
                start = position + 8
            elif vr in _SHORT_VRS:
                start = position + 8
            elif vr in _LONG_VRS:
                if position + 12 > size:
                    raise _Cut("an element header", position)
                length = unpack_u32(view, position + 8)[0]
                start = position + 12
            else:
                length, start, vr = _element_header(view, position, explicit)
            if length == _UNDEFINED:
                position = _skip_undefined(view, start, explicit and vr != b"UN")
                continue
            end = start + length
            if end > size:
                raise _Cut(f"element ({group:04X},{element:04X})", position)
            if tag in _KEPT:
                raw[tag] = bytes(view[start:end])
            position = end
    except _Cut as cut:
        raise TruncatedError(f"truncated: the file ends inside {cut.what} at byte {cut.offset}") from None
    except struct.error:
        raise TruncatedError("truncated: the file ends inside the dataset") from None
    return _decode_wanted(raw), size, False


def _element_header(view: Buffer, position: int, explicit: bool) -> tuple[int, int, bytes]:
    """Return (value length, value start, VR) of the element at ``position``."""
    if not explicit:
        (length,) = struct.unpack_from("<I", view, position + 4)
        return length, position + 8, b""
    vr = bytes(view[position + 4 : position + 6])
    if vr in _LONG_VRS:
        if position + 12 > len(view):
            raise _Cut("an element header", position)
        (length,) = struct.unpack_from("<I", view, position + 8)
        return length, position + 12, vr
    if not (vr[:1].isalpha() and vr[1:].isalpha()):
        # Item tags (FFFE,xxxx) have no VR even in explicit datasets; anything else is damage.
        group = struct.unpack_from("<H", view, position)[0]
        if group != 0xFFFE:
            raise _Cut("an element with an invalid VR", position)
        (length,) = struct.unpack_from("<I", view, position + 4)
        return length, position + 8, b""
    (length,) = struct.unpack_from("<H", view, position + 6)
    return length, position + 8, vr


def _skip_undefined(view: Buffer, position: int, explicit: bool) -> int:
    """Skip an undefined-length sequence's items up to and past its delimiter; return the end."""
    size = len(view)
    while True:
        if position + 8 > size:
            raise _Cut("a sequence", position)
        group, element, length = struct.unpack_from("<HHI", view, position)
        tag = (group << 16) | element
        position += 8
        if tag == _SEQ_END:
            return position
        if tag != _ITEM:
            raise _Cut("a sequence (an item tag was expected)", position - 8)
        if length != _UNDEFINED:
            position += length
            continue
        position = _skip_item_dataset(view, position, explicit)


def _skip_item_dataset(view: Buffer, position: int, explicit: bool) -> int:
    """Skip the elements of an undefined-length item up to and past its delimiter."""
    size = len(view)
    while True:
        if position + 8 > size:
            raise _Cut("a sequence item", position)
        group, element = struct.unpack_from("<HH", view, position)
        if (group << 16) | element == _ITEM_END:
            return position + 8
        length, start, vr = _element_header(view, position, explicit)
        if length == _UNDEFINED:
            position = _skip_undefined(view, start, explicit and vr != b"UN")
        else:
            position = start + length
            if position > size:
                raise _Cut("a sequence item", start)


def _check_pixel_data(view: Buffer, offset: int, explicit: bool) -> None:
    """Prove the Pixel Data element is whole: its declared length present, fragments delimited.

    Comparing with Rows x Columns x frames would also catch short values, but subsampled
    colour (YBR_FULL_422) and odd vendor padding make that test reject good files.
    """
    size = len(view)
    if offset + (12 if explicit else 8) > size:
        raise TruncatedError("truncated: the file ends at the start of the pixel data")
    length, start, _ = _element_header(view, offset, explicit)
    if length == _UNDEFINED:
        try:
            _skip_undefined(view, start, explicit)
        except _Cut:
            raise TruncatedError("truncated: the encapsulated pixel data has no end delimiter") from None
        return
    present = size - start
    if length > present:
        raise TruncatedError(f"truncated: pixel data holds {present} of its {length} bytes")


def _decode_wanted(raw: dict[int, bytes]) -> dict[str, object]:
    """Decode the raw values of the wanted tags, honouring SpecificCharacterSet for text.

    Every wanted tag has a fixed VR, so explicit and implicit encodings decode alike.
    """
    charset_raw = raw.pop(_SPECIFIC_CHARACTER_SET, b"")
    terms = tuple(t.strip() for t in charset_raw.decode("ascii", "replace").split("\\")) if charset_raw else ()
    decoded: dict[str, object] = {}
    for tag, value in raw.items():
        keyword, kind = _WANTED[tag]
        if kind == "str" or kind == "pn":
            text = value.rstrip(b" \x00")
            # the common case, inline: plain ASCII (ISO 2022 escapes are 7-bit but not plain)
            decoded[keyword] = text.decode("ascii") if text.isascii() and 27 not in text else _decode_text(text, terms, kind == "pn")
        elif kind == "uid":
            decoded[keyword] = value.rstrip(b"\x00 ").decode("ascii", "replace").strip()
        elif kind == "us":
            decoded[keyword] = _U16.unpack_from(value)[0] if len(value) >= 2 else None
        else:
            number = value.strip(b" \x00").split(b"\\")[0]
            decoded[keyword] = int(number) if number.isdigit() or (number[:1] in (b"-", b"+") and number[1:].isdigit()) else None
    return decoded


def _decode_text(value: bytes, charset_terms: tuple[str, ...], person_name: bool) -> str:
    """Decode a text value: trailing padding stripped, leading spaces kept (they are data).

    pydicom's charset code is imported only here, for non-ASCII text: importing pydicom costs
    ~0.5 s (it brings numpy), paid by every command and every ingest worker otherwise.
    """
    value = value.rstrip(b" \x00")
    if value.isascii() and b"\x1b" not in value:  # ISO 2022 escapes are 7-bit but not ASCII text
        return value.decode("ascii")
    if not charset_terms or charset_terms == ("ISO_IR 6",):
        return value.decode("utf-8", "replace")  # no charset declared, but UTF-8 is the common case
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.valuerep import PersonName

    encodings = convert_encodings(list(charset_terms))
    if person_name:
        return str(PersonName(value, encodings))  # decodes each component group on its own
    return decode_bytes(value, encodings, {0x5C})


def _parse_with_pydicom(data: bytes, require_identifiers: bool) -> DicomHeader:
    """Slow path for big-endian and meta-less files: let pydicom read them."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    buffer = io.BytesIO(data)
    try:
        dataset = pydicom.dcmread(buffer, stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, struct.error) as error:
        raise NotDicomError(f"not DICOM: {error}") from None
    header_length = buffer.tell()
    tags: dict[str, object] = {}
    for keyword, kind in _WANTED.values():
        if keyword not in dataset:
            continue
        value = dataset.get(keyword)
        if kind in ("int", "us"):
            try:
                tags[keyword] = int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                tags[keyword] = None
        else:
            tags[keyword] = "" if value is None else str(value).strip()
    meta = getattr(dataset, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or IMPLICIT_VR_LE)
    has_pixels = header_length < len(data)
    header = DicomHeader(syntax, str(tags.get("SOPClassUID", "")), tags, header_length if has_pixels else len(data), has_pixels)
    if not tags:
        raise NotDicomError("not DICOM: no DICOM elements found")
    if require_identifiers and not header.is_dicomdir:
        _require_identifiers(header)
    return header


def _require_identifiers(header: DicomHeader) -> None:
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not header.text(keyword):
            raise MissingIdentifierError(f"rejected: no {keyword}")

