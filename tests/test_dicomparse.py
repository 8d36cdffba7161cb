"""The header walker: identifiers decoded, broken files rejected with a reason a person reads."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from dicomfs.errors import MissingIdentifierError, NotDicomError, TruncatedError
from dicomfs.samples import Corpus, make_instance
from dicomfs.store.dicomparse import parse_header


def _encode(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _instance(**extra: object) -> pydicom.Dataset:
    values: dict[str, object] = dict(patient_id="P1", patient_name="DOE^JANE", study_uid="1.2.3",
                                     series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    return make_instance(**{**values, **extra})  # type: ignore[arg-type]


def test_dicomparse_reads_the_indexed_tags() -> None:
    data = _encode(_instance(study_description="CT HEAD", modality="CT", instance_number=7, AccessionNumber="A1"))
    header = parse_header(data)
    assert header.text("PatientID") == "P1"
    assert header.text("PatientName") == "DOE^JANE"
    assert header.text("StudyDescription") == "CT HEAD"
    assert header.text("AccessionNumber") == "A1"
    assert header.number("InstanceNumber") == 7
    assert header.transfer_syntax == ExplicitVRLittleEndian
    assert header.has_pixel_data


def test_dicomparse_header_length_is_the_pixel_data_offset() -> None:
    data = _encode(_instance())
    buffer = io.BytesIO(data)
    pydicom.dcmread(buffer, stop_before_pixels=True)
    assert parse_header(data).header_length == buffer.tell()


@pytest.mark.parametrize("charset, name", [("ISO_IR 192", "Müller^Jürgen"), ("ISO_IR 126", "Παπαδόπουλος^Γιώργος")])
def test_dicomparse_decodes_names_in_their_character_set(charset: str, name: str) -> None:
    data = _encode(_instance(SpecificCharacterSet=charset, patient_name=name))
    assert parse_header(data).text("PatientName") == name


def test_dicomparse_decodes_iso_2022_japanese_names() -> None:
    path = get_charset_files("chrH31.dcm")[0]
    expected = str(pydicom.dcmread(path).PatientName)
    assert parse_header(Path(path).read_bytes(), require_identifiers=False).text("PatientName") == expected


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 10, "no 'DICM' marker"),
    (bytes(128) + b"DICM" + bytes(range(256)) * 4, "no file meta information"),
])
def test_dicomparse_rejects_what_is_not_dicom(data: bytes, reason: str) -> None:
    with pytest.raises(NotDicomError, match=reason):
        parse_header(data)


def test_dicomparse_rejects_a_file_cut_in_the_header() -> None:
    data = _encode(_instance())
    header = parse_header(data)
    with pytest.raises(TruncatedError, match="truncated"):
        parse_header(data[: header.header_length - 5])


def test_dicomparse_rejects_short_pixel_data() -> None:
    data = _encode(_instance())
    with pytest.raises(TruncatedError, match="pixel data holds"):
        parse_header(data[:-100])


def test_dicomparse_rejects_a_file_without_sop_instance_uid() -> None:
    dataset = _instance()
    del dataset.SOPInstanceUID
    with pytest.raises(MissingIdentifierError, match="no SOPInstanceUID"):
        parse_header(_encode(dataset))


def test_dicomparse_every_sample_file_gets_the_verdict_its_reason_says(small_corpus: Corpus) -> None:
    for sample in small_corpus.files:
        data = sample.path.read_bytes()
        if sample.valid:
            header = parse_header(data)
            assert header.text("SOPInstanceUID") == sample.sop_uid, sample.path
            assert header.text("StudyInstanceUID") == sample.study_uid, sample.path
        else:
            with pytest.raises((NotDicomError, TruncatedError, MissingIdentifierError)):
                parse_header(data)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # SC_rgb_jpeg.dcm's known mislabel
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "image_dfl.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "SC_rgb_jpeg.dcm"])
def test_dicomparse_agrees_with_pydicom_on_its_test_files(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    header = parse_header(Path(path).read_bytes())
    assert header.text("SOPInstanceUID") == dataset.SOPInstanceUID
    assert header.text("SeriesInstanceUID") == dataset.SeriesInstanceUID
    assert header.text("PatientID") == str(dataset.get("PatientID", ""))
