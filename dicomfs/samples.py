"""Synthetic DICOM files for tests, benchmarks and the demo.

Everything derives from the arguments and a seed, so the same call writes the same bytes (for
the same pydicom and numpy versions): UIDs are name-based UUIDs (``2.25.<uuid5>``), names and
dates come from a seeded :class:`random.Random`, pixels from a seeded numpy generator. Only
pydicom and numpy are needed.

:func:`write_corpus` lays the files out like this::

    OUT/
    ├── PAT00001/ST01/SE01/IM0001.dcm …   the regular grid (patients x studies x series x instances)
    ├── large/IM0001.dcm …                 --large K: K single-frame 512x512 16-bit CT, one patient
    ├── bad/                               --bad: files an importer must reject (valid=False)
    │   ├── notes.txt, empty.dcm, garbage-after-preamble.dcm
    │   └── truncated-header.dcm, truncated-pixel-data.dcm, no-sop-instance-uid.dcm
    └── tricky/<case>.dcm                  --tricky: valid files that break naive importers

Run ``python -m dicomfs.samples OUT [--patients N] … [--large K] [--bad] [--tricky] [--seed N]``.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from dicomfs.sample_encoder import PREAMBLE, SeriesEncoder

__all__ = ["Corpus", "SampleFile", "main", "make_instance", "write_corpus", "write_instance"]

_SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
    "OT": SecondaryCaptureImageStorage,
    "SR": BasicTextSRStorage,
}
_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless)
# Every UID we make is a name-based (version 5) UUID under this namespace, written as 2.25.<int>.
_NAMESPACE = uuid.UUID("6f1d8a52-3f3e-4d5b-9a57-0f6c1e2d7c41")
_IMPLEMENTATION_UID = UID(f"2.25.{uuid.uuid5(_NAMESPACE, 'implementation').int}")
_IMPLEMENTATION_VERSION = "DICOMFS_SAMPLES"


_FAMILY_NAMES = ("SMITH", "JONES", "GARCIA", "NGUYEN", "KOWALSKI", "OBRIEN", "SATO", "LARSEN")
_GIVEN_NAMES = ("ANNA", "JOHN", "MARIA", "PETER", "LINA", "OMAR", "EVA", "TOMAS")
_GRID_MODALITIES = ("CT", "MR", "CR", "PT", "US")
_BODY_PARTS = ("HEAD", "CHEST", "ABDOMEN", "PELVIS", "SPINE", "KNEE")
_UNSAFE_DESCRIPTION = 'CT: Head/Neck w/o *contrast?* "quoted" <a> | b'


@dataclass(frozen=True)
class SampleFile:
    """One file written by :func:`write_corpus` and what an importer should make of it.

    ``valid`` files are readable Part 10 files; ``reason`` says what is special about a file
    (empty for plain grid files) or, for invalid files, how it is broken. The identifiers are
    empty strings for invalid files.
    """

    path: Path
    valid: bool
    reason: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int


@dataclass(frozen=True)
class Corpus:
    """The files :func:`write_corpus` wrote under ``root``, in the order it wrote them."""

    root: Path
    files: tuple[SampleFile, ...]

    @property
    def valid_files(self) -> tuple[SampleFile, ...]:
        """The files an importer should store."""
        return tuple(f for f in self.files if f.valid)

    @property
    def invalid_files(self) -> tuple[SampleFile, ...]:
        """The files an importer should reject."""
        return tuple(f for f in self.files if not f.valid)

    @property
    def patients(self) -> int:
        """Distinct PatientIDs among the valid files."""
        return len({f.patient_id for f in self.valid_files})

    @property
    def studies(self) -> int:
        """Distinct StudyInstanceUIDs among the valid files."""
        return len({f.study_uid for f in self.valid_files})

    @property
    def series(self) -> int:
        """Distinct SeriesInstanceUIDs among the valid files."""
        return len({f.series_uid for f in self.valid_files})

    @property
    def instances(self) -> int:
        """Distinct SOPInstanceUIDs among the valid files (a duplicate counts once)."""
        return len({f.sop_uid for f in self.valid_files})


def make_instance(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    modality: str = "CT",
    study_date: str = "20240101",
    study_description: str = "",
    series_description: str = "",
    series_number: int = 1,
    instance_number: int | None = 1,
    rows: int = 64,
    columns: int = 64,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    **extra: object,
) -> FileDataset:
    """Build one valid Part 10 dataset with seeded pixels.

    Parameters
    ----------
    patient_id, patient_name, study_uid, series_uid, sop_uid : str
        The identifying values; an empty string writes the element with an empty value.
    modality : str
        CT, MR, CR, PT or OT (16-bit MONOCHROME2), US (8-bit RGB) or SR (Basic Text SR
        document without pixel data; `rows`, `columns`, `frames` and `seed` are then unused).
        ``frames > 1`` selects the multi-frame SOP class (US multi-frame or multi-frame
        grayscale word secondary capture).
    study_date, study_description, series_description : str
        Written as given, empty values included.
    series_number : int
        SeriesNumber.
    instance_number : int or None
        InstanceNumber, left out when None.
    rows, columns, frames : int
        Image size.
    transfer_syntax : str
        Explicit or Implicit VR Little Endian, Deflated Explicit VR Little Endian or RLE Lossless.
    seed : int
        Seed of the pixel noise.
    **extra : object
        More elements by DICOM keyword, set after the others (so they may override them), e.g.
        ``SpecificCharacterSet="ISO_IR 192"``; a value of None removes the element.

    Returns
    -------
    pydicom.dataset.FileDataset
        The dataset with its file meta information, ready for :func:`write_instance`.

    Raises
    ------
    ValueError
        For an unknown modality, transfer syntax or keyword.
    """
    syntax = UID(transfer_syntax)
    if syntax not in _SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    if modality not in _SOP_CLASSES:
        raise ValueError(f"unsupported modality {modality!r}; use one of {', '.join(_SOP_CLASSES)}")
    sop_class = _sop_class(modality, frames)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=PREAMBLE)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if modality == "SR":
        _add_text_report(ds)
    else:
        _add_image(ds, modality, rows, columns, frames, seed)
    for keyword, value in extra.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)  # keep the caller's SOPInstanceUID
    return ds


def write_instance(path: Path, ds: FileDataset) -> int:
    """Write `ds` as a Part 10 file at `path` (replacing a file there).

    Parameters
    ----------
    path : Path
        Where to write; the folder must exist.
    ds : pydicom.dataset.FileDataset
        A dataset with file meta information, e.g. from :func:`make_instance`.

    Returns
    -------
    int
        The number of bytes written.
    """
    return _write(path, _encode(ds))


def write_corpus(
    out: Path,
    *,
    patients: int = 2,
    studies_per_patient: int = 2,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    pixels: int = 64,
    large: int = 0,
    large_pixels: int = 512,
    bad: bool = False,
    tricky: bool = False,
    seed: int = 0,
) -> Corpus:
    """Write a deterministic corpus under `out` (layout in the module docstring).

    Parameters
    ----------
    out : Path
        Output folder; must be empty or absent.
    patients, studies_per_patient, series_per_study, instances_per_series : int
        The regular grid ``out/PAT00001/ST01/SE01/IM0001.dcm`` …
    pixels : int
        Rows and Columns of the grid images.
    large : int
        How many single-frame `large_pixels`² 16-bit CT instances to write to ``out/large/``.
    large_pixels : int
        Rows and Columns of the large images.
    bad : bool
        Also write the broken files of ``out/bad/``.
    tricky : bool
        Also write the edge cases of ``out/tricky/``.
    seed : int
        Everything (UIDs, names, dates, pixels) derives from it.

    Returns
    -------
    Corpus
        Every file written, with what it should be.

    Raises
    ------
    FileExistsError
        If `out` exists and is not an empty folder.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    files: list[SampleFile] = []
    for patient in range(1, patients + 1):
        files += _write_patient(out / f"PAT{patient:05d}", patient, studies_per_patient,
                                series_per_study, instances_per_series, pixels, seed)
    if large:
        files += _write_series(
            out / "large", large, (seed, "large"), patient_id="LARGE", patient_name="LARGE^IMAGES",
            study_uid=_uid(seed, "large", "study"), series_uid=_uid(seed, "large", "series"),
            study_description="LARGE IMAGES", series_description=f"CT {large_pixels}x{large_pixels}",
            rows=large_pixels, columns=large_pixels)
    if bad:
        files += _write_bad(out / "bad", seed)
    if tricky:
        files += _write_tricky(out / "tricky", seed)
    return Corpus(out, tuple(files))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m dicomfs.samples --help``); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dicomfs.samples", description="Write a deterministic corpus of synthetic DICOM files.")
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder, empty or absent")
    for name, default, meaning in (
        ("patients", 2, "patients in the grid"),
        ("studies-per-patient", 2, "studies per grid patient"),
        ("series-per-study", 2, "series per grid study"),
        ("instances-per-series", 3, "instances per grid series"),
        ("pixels", 64, "rows and columns of the grid images"),
        ("large", 0, "large CT images under OUT/large/"),
        ("large-pixels", 512, "rows and columns of the large images"),
        ("seed", 0, "everything derives from it"),
    ):
        parser.add_argument(f"--{name}", type=int, default=default, metavar="N",
                            help=f"{meaning} (default {default})")
    parser.add_argument("--bad", action="store_true", help="add broken files under OUT/bad/")
    parser.add_argument("--tricky", action="store_true", help="add edge cases under OUT/tricky/")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        corpus = write_corpus(
            args.out, patients=args.patients, studies_per_patient=args.studies_per_patient,
            series_per_study=args.series_per_study, instances_per_series=args.instances_per_series,
            pixels=args.pixels, large=args.large, large_pixels=args.large_pixels, bad=args.bad,
            tricky=args.tricky, seed=args.seed)
    except FileExistsError as exc:
        parser.error(str(exc))
    megabytes = sum(f.size for f in corpus.files) / 1e6
    print(f"{corpus.root}: {len(corpus.files)} files ({len(corpus.valid_files)} valid, "
          f"{len(corpus.invalid_files)} invalid), {corpus.patients} patients, {corpus.studies} studies, "
          f"{corpus.series} series, {corpus.instances} instances, {megabytes:.1f} MB "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


# --- building datasets ---------------------------------------------------------------------------


def _sop_class(modality: str, frames: int) -> UID:
    if frames > 1 and modality == "US":
        return UltrasoundMultiFrameImageStorage
    if frames > 1 and modality != "SR":
        return MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    return _SOP_CLASSES[modality]


def _add_image(ds: Dataset, modality: str, rows: int, columns: int, frames: int, seed: int) -> None:
    """Add the image pixel module: 8-bit RGB for US, else 12 bits stored in 16."""
    rgb = modality == "US"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8 if rgb else 16
    ds.BitsStored = 8 if rgb else 12
    ds.HighBit = 7 if rgb else 11
    ds.PixelRepresentation = 0
    if modality in ("CT", "PT"):
        ds.RescaleIntercept = -1024 if modality == "CT" else 0
        ds.RescaleSlope = 1
    ds.add_new(0x7FE00010, "OB" if rgb else "OW", _pixels(rows, columns, frames, rgb, seed))


def _add_text_report(ds: Dataset) -> None:
    """Add a one-paragraph Basic Text SR document (no pixel data)."""
    title = Dataset()
    title.CodeValue = "11528-7"
    title.CodingSchemeDesignator = "LN"
    title.CodeMeaning = "Radiology Report"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = [Dataset()]
    finding.ConceptNameCodeSequence[0].CodeValue = "121071"
    finding.ConceptNameCodeSequence[0].CodingSchemeDesignator = "DCM"
    finding.ConceptNameCodeSequence[0].CodeMeaning = "Finding"
    finding.TextValue = "No abnormality detected."
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ""
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [title]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentSequence = [finding]


@lru_cache(maxsize=8)
def _phantom(rows: int, columns: int) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """A disc of soft tissue in air, so compression ratios look like real images, not noise."""
    y, x = np.ogrid[:rows, :columns]
    inside = (y - rows / 2) ** 2 + (x - columns / 2) ** 2 <= (0.4 * min(rows, columns)) ** 2
    return np.where(inside, 1024, 0).astype(np.uint16)


def _pixels(rows: int, columns: int, frames: int, rgb: bool, seed: int) -> bytes:
    """Phantom plus seeded noise, as the bytes of native (little-endian) pixel data."""
    rng = np.random.default_rng(seed)
    image = _phantom(rows, columns) + rng.integers(0, 64, (frames, rows, columns), dtype=np.uint16)
    if rgb:
        gray = (image >> 4).astype(np.uint8)
        return np.stack([gray, gray // 2, 255 - gray], axis=-1).tobytes()
    return image.astype("<u2").tobytes()


def _uuid(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, "/".join(map(str, parts)))


def _uid(*parts: object) -> str:
    return f"2.25.{_uuid(*parts).int}"


# --- encoding and writing ------------------------------------------------------------------------


def _encode(ds: FileDataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> int:
    with open(path, "wb") as f:
        return f.write(data)


def _sample(path: Path, size: int, ds: Dataset, reason: str = "") -> SampleFile:
    return SampleFile(path, True, reason, str(ds.PatientID), str(ds.StudyInstanceUID),
                      str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), size)


def _write_series(folder: Path, count: int, key: tuple[object, ...], **args: Any) -> list[SampleFile]:
    """Write ``IM0001.dcm`` … of one series; `args` are make_instance's series-level arguments.

    File N is byte-identical to ``make_instance(sop_uid=_uid(*key, N), instance_number=N,
    seed=_uuid(*key, N, "pixels").int, **args)`` written by :func:`write_instance`.
    """
    folder.mkdir(parents=True)
    template = make_instance(sop_uid=_uid(*key, 1), seed=0, **args)
    encoder = SeriesEncoder(template)
    shape = (template.Rows, template.Columns, int(template.get("NumberOfFrames", 1)),
             template.SamplesPerPixel == 3)
    written: list[SampleFile] = []
    for number in range(1, count + 1):
        sop_uid = _uid(*key, number)
        path = folder / f"IM{number:04d}.dcm"
        data = encoder.encode(sop_uid, number, _pixels(*shape, _uuid(*key, number, "pixels").int))
        written.append(SampleFile(path, True, "", args["patient_id"], args["study_uid"],
                                  args["series_uid"], sop_uid, _write(path, data)))
    return written


def _write_patient(folder: Path, patient: int, studies: int, series: int, instances: int,
                   pixels: int, seed: int) -> list[SampleFile]:
    rng = random.Random(f"{seed}/patient/{patient}")
    person = {
        "patient_id": folder.name,
        "patient_name": f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}",
        "PatientBirthDate": f"{rng.randint(1930, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        "PatientSex": rng.choice("FM"),
    }
    written: list[SampleFile] = []
    for study in range(1, studies + 1):
        body_part = rng.choice(_BODY_PARTS)
        visit = {
            "study_uid": _uid(seed, patient, study),
            "study_date": f"{rng.randint(2015, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "StudyTime": f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}00",
            "study_description": f"{body_part} {rng.choice(('ROUTINE', 'FOLLOW-UP', 'TRAUMA'))}",
            "AccessionNumber": f"A{seed}{patient:05d}{study:02d}",
            "StudyID": str(study),
        }
        for number in range(1, series + 1):
            modality = _GRID_MODALITIES[(patient + study + number) % len(_GRID_MODALITIES)]
            key = (seed, patient, study, number)
            written += _write_series(
                folder / f"ST{study:02d}" / f"SE{number:02d}", instances, key, **person, **visit,
                series_uid=_uid(*key), modality=modality, series_number=number,
                series_description=f"{modality} {body_part} {number}", rows=pixels, columns=pixels)
    return written


def _write_bad(folder: Path, seed: int) -> list[SampleFile]:
    """Write the broken files; each is cut from or modelled on a valid instance."""
    folder.mkdir()
    ids: dict[str, Any] = {"patient_id": "BAD", "study_uid": _uid(seed, "bad", "study"),
           "series_uid": _uid(seed, "bad", "series")}
    whole = make_instance(patient_name="TRUNCATED^HEADER^CASE", sop_uid=_uid(seed, "bad", 1),
                          seed=seed, **ids)
    data = _encode(whole)
    name = data.index(b"\x10\x00\x10\x00PN")  # PatientName, explicit VR: tag, VR, 2-byte length
    (name_length,) = struct.unpack_from("<H", data, name + 6)
    pixel_length = len(whole.PixelData)
    no_sop = make_instance(patient_name="NO^SOP^INSTANCE^UID", sop_uid=_uid(seed, "bad", 2),
                           seed=seed, SOPInstanceUID=None, **ids)
    cases = [
        ("notes.txt", "plain text, not DICOM", b"Scanned on the old PACS; see ticket 1234.\n"),
        ("empty.dcm", "empty file (0 bytes)", b""),
        ("garbage-after-preamble.dcm", "preamble and DICM followed by random bytes, no file meta",
         PREAMBLE + b"DICM" + random.Random(f"{seed}/garbage").randbytes(1024)),
        ("truncated-header.dcm", "cut inside PatientName (0010,0010), after SOPInstanceUID",
         data[:name + 8 + name_length // 2]),
        ("truncated-pixel-data.dcm",
         f"complete header, PixelData cut to {pixel_length // 2} of {pixel_length} bytes",
         data[:len(data) - pixel_length // 2]),
        ("no-sop-instance-uid.dcm", "no SOPInstanceUID (0008,0018) in the dataset", _encode(no_sop)),
    ]
    written = []
    for file_name, reason, content in cases:
        path = folder / file_name
        written.append(SampleFile(path, False, reason, "", "", "", "", _write(path, content)))
    return written


def _write_tricky(folder: Path, seed: int) -> list[SampleFile]:
    """Write one valid file per edge case, each its own patient except the duplicate pair."""
    folder.mkdir()
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("utf8-name", "UTF-8 PatientName (ISO_IR 192)",
         {"patient_name": "Müller^Jürgen", "study_description": "Schädel nativ",
          "SpecificCharacterSet": "ISO_IR 192"}),
        ("greek-name", "Greek PatientName (ISO_IR 126)",
         {"patient_name": "Παπαδόπουλος^Γιώργος", "SpecificCharacterSet": "ISO_IR 126"}),
        ("unsafe-description", "StudyDescription with / : * ? \" < > |, SeriesDescription '..'",
         {"study_description": _UNSAFE_DESCRIPTION, "series_description": ".."}),
        ("empty-values", "PatientName, StudyDate and descriptions present but empty",
         {"patient_name": "", "study_date": "", "study_description": ""}),
        ("missing-values", "no PatientName, StudyDate, StudyDescription or SeriesDescription",
         {"PatientName": None, "StudyDate": None, "StudyDescription": None, "SeriesDescription": None}),
        ("no-instance-number", "no InstanceNumber", {"instance_number": None}),
        ("implicit-vr", "Implicit VR Little Endian", {"transfer_syntax": ImplicitVRLittleEndian}),
        ("deflated", "Deflated Explicit VR Little Endian",
         {"transfer_syntax": DeflatedExplicitVRLittleEndian}),
        ("rle-lossless", "RLE Lossless (encapsulated pixel data)", {"transfer_syntax": RLELossless}),
        ("multiframe", "5-frame RGB ultrasound", {"modality": "US", "frames": 5}),
        ("sr-document", "Basic Text SR, no pixel data", {"modality": "SR"}),
    ]
    written = []
    for case, reason, args in cases:
        ids = _tricky_ids(seed, case)
        args = {"patient_name": f"TRICKY^{case.upper()}", "study_description": case, **args}
        ds = make_instance(seed=seed, **ids, **args)
        path = folder / f"{case}.dcm"
        written.append(_sample(path, write_instance(path, ds), ds, reason))
    ids = _tricky_ids(seed, "duplicate")
    for name, pixel_seed, reason in (("duplicate.dcm", seed, "original of a duplicated SOPInstanceUID"),
                                     ("duplicate-other-bytes.dcm", seed + 1,
                                      "duplicate SOPInstanceUID with other bytes")):
        ds = make_instance(patient_name="TRICKY^DUPLICATE", study_description="duplicate",
                           seed=pixel_seed, **ids)
        path = folder / name
        written.append(_sample(path, write_instance(path, ds), ds, reason))
    return written


def _tricky_ids(seed: int, case: str) -> dict[str, Any]:
    return {"patient_id": f"TRICKY-{case.upper()}", "study_uid": _uid(seed, "tricky", case, "study"),
            "series_uid": _uid(seed, "tricky", case, "series"), "sop_uid": _uid(seed, "tricky", case, 1)}


if __name__ == "__main__":
    sys.exit(main())
