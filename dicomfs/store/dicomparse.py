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

What is indexed must be what pydicom reads: where the walker meets something pydicom may read
another way (a VR code that is none, an undefined length on an element that is not a sequence, an
item that ends before or after its declared length, an item delimiter at the top level), it hands
the file to pydicom (``_Odd``), and a file pydicom cannot read either is rejected. Every value that
reaches the index is bounded, as it is decoded: UIDs as PS3.5 9.1 says, text to
``MAX_VALUE_LENGTH``, numbers to what IS allows, sequences nested to ``MAX_NESTING``.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from dicomfs.errors import MalformedError, MissingIdentifierError, NotDicomError, TruncatedError
from dicomfs.store.inflate import Expansion, expanded, inflate_raw

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # imported only where a file needs pydicom: see _decode_text

__all__ = ["DicomHeader", "parse_header", "DICOMDIR_SOP_CLASS", "MAX_NESTING", "MAX_UID_LENGTH", "MAX_VALUE_LENGTH"]

Buffer = Union[bytes, bytearray, mmap.mmap]
"""Anything sliceable into bytes: the parser slices it directly (bytes and mmap slice fastest)."""

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
_NATIVE_SYNTAXES = {IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE}

MAX_UID_LENGTH = 64
"""PS3.5 9.1: a UID is at most 64 characters, each a digit or a dot. The index keys UIDs
(``uids`` table: UID + 22 bytes), and LMDB refuses keys over 511 bytes (``MDB_BAD_VALSIZE``)."""
MAX_VALUE_LENGTH = 1024
"""The longest value of an element the index reads, in bytes as written (characters, when pydicom
decoded it): 16 times what the standard allows the longest of them (LO, and a PN component group:
64 characters), room for sloppy writers. Records are copied into every listing of their parent, so
a 10 MB PatientName would be read again and again."""
MAX_NESTING = 64
"""Sequences nested deeper than this are refused. Real files nest a few levels (an SR content tree
a dozen or two); every level costs a few Python frames here and ~5 in pydicom, so 2,000 levels
ended in RecursionError. 64 levels stay far below Python's recursion limit on any thread."""
_MAX_NUMBER_LENGTH = 12
"""IS values are at most 12 characters (PS3.5 6.2); a longer one is not a number the index keeps."""
_UID = re.compile(r"[0-9.]{1,%d}" % MAX_UID_LENGTH)
_UID_CHARACTERS = b"0123456789."
_UID_TEXT = "0123456789."
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD) little endian

# VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_STOP_TAGS = _PIXEL_TAGS | {_ITEM_END}  # where the top-level walk stops: pixels, or pydicom's end of dataset
_SPECIFIC_CHARACTER_SET = 0x00080005
_PATIENT_ID = 0x00100020

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
_META_INDEXED = ((0x00020002, "MediaStorageSOPClassUID"), (0x00020010, "TransferSyntaxUID"))


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


class _Odd(Exception):
    """Raised internally where pydicom may read the file another way than the walker: pydicom decides."""


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
    MalformedError
        A UID that is not one, a value too long to index, sequences nested too deep.
    """
    try:
        return _parse(data, require_identifiers, expansion)
    except _Odd:
        return _parse_with_pydicom(bytes(data), require_identifiers)


def _check_indexable(header: DicomHeader) -> None:
    """Refuse what the index cannot hold: UIDs that are none, values too long (what pydicom
    read; the walker makes the same checks as it decodes, on the bytes).

    A UID keeps no padding: a trailing NUL (the standard's pad to an even length) or trailing
    spaces (a common writer's slip) are dropped, as pydicom drops them, so ``1.2.3\\0`` and
    ``1.2.3 `` are filed as ``1.2.3``; anything else that is not a digit or a dot (a leading
    space, a NUL inside, a second value) makes the file rejected.
    """
    uids = [(k, header.tags.get(k)) for k in _UID_KEYWORDS]
    for keyword, value in [*uids, ("TransferSyntaxUID", header.transfer_syntax)]:
        if value and not (isinstance(value, str) and _UID.fullmatch(value)):
            raise _not_a_uid(keyword, str(value))
    for keyword, value in header.tags.items():
        if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
            raise _too_long(keyword, len(value))


def _not_a_uid(keyword: str, value: str) -> MalformedError:
    return MalformedError(f"rejected: {keyword} is not a UID ({_shown(value)}): "
                          f"at most {MAX_UID_LENGTH} digits and dots (PS3.5 9.1)")


def _too_long(keyword: str, length: int) -> MalformedError:
    return MalformedError(f"rejected: {keyword} is {length} characters long; dicomfs indexes values of at most {MAX_VALUE_LENGTH}")


def _shown(value: object) -> str:
    """A hostile value, short enough for a reason line."""
    text = str(value)
    return repr(text) if len(text) <= 24 else f"{len(text)} characters, {text[:24]!r}..."


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
            try:
                tags, _, pixel_found = _walk_dataset(inflated, 0, explicit=True)
            except _Odd:  # pydicom would inflate the whole dataset in memory: the cap's way around
                raise MalformedError("rejected: a deflated dataset the header parser cannot read, and pydicom "
                                     "would inflate it whole in memory") from None
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
    return _looks_explicit(view, position)


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
    for tag, keyword in _META_INDEXED:  # a record may keep them: the dataset's syntax, its SOP class
        uid = values.get(tag, "")
        if len(uid) > MAX_UID_LENGTH or uid.strip(_UID_TEXT):
            raise _not_a_uid(keyword, uid)
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
            if tag in _STOP_TAGS:
                if tag == _ITEM_END:
                    raise _Odd()  # pydicom ends the dataset at an item delimiter; what follows it, it never sees
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
                raise _Odd()  # no VR: pydicom reads this element as implicit VR, or with a 16-bit length
            if length == _UNDEFINED:
                position = _skip_sequence(view, start, explicit, vr, 1)
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


def _skip_sequence(view: Buffer, start: int, explicit: bool, vr: bytes, depth: int) -> int:
    """Skip the value of an undefined-length element at ``start``, as pydicom reads it; return its end.

    pydicom reads items where it knows a sequence (VR SQ or UN; in implicit VR, a sequence in its
    data dictionary, or a private tag followed by an item) and otherwise scans for the first
    sequence delimiter. Explicit VR says which; implicit VR does not, and the two readings agree
    exactly when the first delimiter after ``start`` is the sequence's own.
    """
    if explicit:
        if vr not in (b"SQ", b"UN"):
            raise _Odd()
        return _skip_items(view, start, True, depth)
    end = _skip_items(view, start, False, depth)
    if view.find(_SEQUENCE_DELIMITER, start, end) != end - 8:
        raise _Odd()
    return end


def _skip_items(view: Buffer, position: int, explicit: bool, depth: int, *, datasets: bool = True) -> int:
    """Skip a sequence's items up to and past its delimiter; return the end.

    With ``datasets`` the items are datasets, walked as pydicom reads them (an item pydicom would
    read past its declared length is odd); without, they are pixel data fragments.
    """
    if depth > MAX_NESTING:
        raise MalformedError(f"rejected: sequences nested more than {MAX_NESTING} deep")
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
        if not datasets:
            if length == _UNDEFINED:
                raise _Cut("the pixel data (a fragment of undefined length)", position - 8)
            position += length
        else:
            position = _skip_item_dataset(view, position, explicit, depth, None if length == _UNDEFINED else position + length)


def _skip_item_dataset(view: Buffer, position: int, explicit: bool, depth: int, end: int | None) -> int:
    """Skip the elements of an item up to ``end``, or (undefined length) past its delimiter.

    pydicom reads an item of an explicit VR dataset as implicit VR when its first element shows
    no VR, and so does this.
    """
    size = len(view)
    if explicit and position + 6 <= size:
        explicit = _looks_explicit(view, position)
    unpack_header = _EXPLICIT_HEADER.unpack_from if explicit else _IMPLICIT_HEADER.unpack_from
    while True:
        if end is not None and position >= end:
            if position > end:
                raise _Odd()  # pydicom reads on past the item's declared end
            return position
        if position + 8 > size:
            raise _Cut("a sequence item", position)
        group, element, vr, length = unpack_header(view, position)
        tag = (group << 16) | element
        if tag == _ITEM_END:
            if end is not None:
                raise _Odd()  # pydicom ends a defined-length item here, and reads its next item from here
            return position + 8
        start = position + 8
        if explicit and vr not in _SHORT_VRS:
            if vr not in _LONG_VRS:
                raise _Odd()
            if position + 12 > size:
                raise _Cut("a sequence item", position)
            length = _U32.unpack_from(view, position + 8)[0]
            start = position + 12
        if length == _UNDEFINED:
            position = _skip_sequence(view, start, explicit, vr, depth + 1)
        else:
            position = start + length
            if position > size:
                raise _Cut("a sequence item", start)


def _looks_explicit(view: Buffer, position: int) -> bool:
    """Whether the element at ``position`` has a VR: two capital letters, pydicom's test."""
    vr = bytes(view[position + 4 : position + 6])
    return vr.isalpha() and vr.isupper()


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
            _skip_items(view, start, explicit, 1, datasets=False)
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
    if raw and max(map(len, raw.values())) > MAX_VALUE_LENGTH:  # one C loop: ~0.5 us a file
        tag, longest = max(raw.items(), key=lambda item: len(item[1]))
        raise _too_long(_WANTED[tag][0], len(longest))
    for tag, value in raw.items():
        keyword, kind = _WANTED[tag]
        if kind == "str" or kind == "pn":
            text = value.rstrip(b" \x00")
            # the common case, inline: plain ASCII (ISO 2022 escapes are 7-bit but not plain)
            decoded[keyword] = text.decode("ascii") if text.isascii() and 27 not in text else \
                _decode_text(text, terms, kind == "pn", identifier=tag == _PATIENT_ID)
        elif kind == "uid":
            uid = value.rstrip(b"\x00 ")
            if len(uid) > MAX_UID_LENGTH or uid.strip(_UID_CHARACTERS):  # strip: a C loop, ~0.1 us
                raise _not_a_uid(keyword, uid.decode("ascii", "replace"))
            decoded[keyword] = uid.decode("ascii")
        elif kind == "us":
            decoded[keyword] = _U16.unpack_from(value)[0] if len(value) >= 2 else None
        else:
            number = value.strip(b" \x00").split(b"\\")[0]
            decoded[keyword] = int(number) if len(number) <= _MAX_NUMBER_LENGTH and (
                number.isdigit() or (number[:1] in (b"-", b"+") and number[1:].isdigit())) else None
    return decoded


def _decode_text(value: bytes, charset_terms: tuple[str, ...], person_name: bool, *, identifier: bool = False) -> str:
    """Decode a text value: trailing padding stripped, leading spaces kept (they are data).

    pydicom's charset code is imported only here, for non-ASCII text: importing pydicom costs
    ~0.5 s (it brings numpy), paid by every command and every ingest worker otherwise.
    An ``identifier`` (PatientID: the patient's id is its hash) without a declared character set
    is decoded as pydicom decodes it (``_Odd``), not as the UTF-8 that names are taken for.
    """
    import warnings

    value = value.rstrip(b" \x00")
    if value.isascii() and b"\x1b" not in value:  # ISO 2022 escapes are 7-bit but not ASCII text
        return value.decode("ascii")
    if not charset_terms or charset_terms == ("ISO_IR 6",):
        if identifier:
            raise _Odd()
        return value.decode("utf-8", "replace")  # no charset declared, but UTF-8 is the common case
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.valuerep import PersonName

    with warnings.catch_warnings():  # an unknown charset term: pydicom warns and decodes as ASCII, so do we, quietly
        warnings.simplefilter("ignore")
        encodings = convert_encodings(list(charset_terms))
        if person_name:
            return str(PersonName(value, encodings))  # decodes each component group on its own
        return decode_bytes(value, encodings, {0x5C})


def _parse_with_pydicom(data: bytes, require_identifiers: bool) -> DicomHeader:
    """Slow path for big-endian and meta-less files, and for files the walker finds odd: index
    what pydicom reads, or reject the file when pydicom cannot read it whole."""
    import io
    import warnings

    import pydicom
    from pydicom.dataelem import RawDataElement

    buffer = io.BytesIO(data)
    try:
        # pydicom warns about what it reads around (lengths past the end among them); those warnings
        # are this file's verdict, not the program's output.
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(buffer, stop_before_pixels=True, force=True)
            header_length = buffer.tell()
            tags = _pydicom_tags(dataset)
            meta = getattr(dataset, "file_meta", None)
            syntax = str(getattr(meta, "TransferSyntaxUID", "") or IMPLICIT_VR_LE)
            encoding = dataset.original_encoding
            short = any(isinstance(e, RawDataElement) and e.value is not None and e.length != _UNDEFINED
                        and len(e.value) < e.length for e in dataset.elements())
    except RecursionError:
        raise MalformedError("rejected: sequences nested too deep to read") from None
    except Exception as error:  # pydicom meets hostile bytes with any exception: each means "unreadable"
        raise NotDicomError(f"not DICOM: pydicom cannot read it ({type(error).__name__}: {str(error)[:100]})") from None
    if short or any("End of file" in str(w.message) or "EOF" in str(w.message) for w in warned):
        raise TruncatedError("truncated: the file ends inside the dataset")
    if not tags:
        raise NotDicomError("not DICOM: no DICOM elements found")
    has_pixels = header_length < len(data)
    is_implicit, is_little = encoding
    if has_pixels and is_little and is_implicit is not None and header_length + 4 <= len(data):
        group, element = struct.unpack_from("<HH", data, header_length)
        if (group << 16) | element in _PIXEL_TAGS:  # not where pydicom stopped at an item delimiter
            _check_pixel_data(data, header_length, not is_implicit)
    header = DicomHeader(syntax, str(tags.get("SOPClassUID", "")), tags, header_length if has_pixels else len(data), has_pixels)
    _check_indexable(header)
    if require_identifiers and not header.is_dicomdir:
        _require_identifiers(header)
    return header


def _pydicom_tags(dataset: Dataset) -> dict[str, object]:
    """The wanted tags of a pydicom dataset, as ``_decode_wanted`` gives them."""
    from pydicom.multival import MultiValue

    tags: dict[str, object] = {}
    for keyword, kind in _WANTED.values():
        if keyword not in dataset:
            continue
        value = dataset.get(keyword)
        if kind in ("int", "us"):
            try:
                number = int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                number = None
            tags[keyword] = number if number is None or abs(number) < 1 << 31 else None
        elif isinstance(value, MultiValue):
            tags[keyword] = "\\".join(str(v) for v in value)
        else:
            tags[keyword] = "" if value is None else str(value).rstrip(" \x00")
    return tags


def _require_identifiers(header: DicomHeader) -> None:
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not header.text(keyword):
            raise MissingIdentifierError(f"rejected: no {keyword}")

