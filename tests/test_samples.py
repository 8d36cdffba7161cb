"""Tests of the synthetic corpus builder, dicomfs.samples."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from dicomfs.sample_encoder import SeriesEncoder
from dicomfs.samples import (
    Corpus,
    SampleFile,
    _encode,
    _pixels,
    main,
    make_instance,
    write_corpus,
    write_instance,
)

GRID = {"patients": 3, "studies_per_patient": 2, "series_per_study": 2, "instances_per_series": 4}
TRICKY_CASES = 12  # eleven single-file cases and one duplicated instance (two files)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "out", **GRID, large=2, large_pixels=96,
                        bad=True, tricky=True, seed=7)


@pytest.fixture
def lenient_reading() -> Iterator[None]:
    """Read tricky values without pydicom's validation warnings."""
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    yield
    config.settings.reading_validation_mode = previous


def by_name(corpus: Corpus, relative: str) -> SampleFile:
    (found,) = [f for f in corpus.files if f.path == corpus.root / relative]
    return found


def last_element(data: bytes) -> tuple[int, int]:
    """Walk an explicit VR little endian file without sequences; return the last tag and its end."""
    long_vrs = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"}
    position, tag, end = 132, 0, 132
    while position < len(data):
        group, element = struct.unpack_from("<HH", data, position)
        vr = data[position + 4:position + 6]
        if vr in long_vrs:
            (length,) = struct.unpack_from("<I", data, position + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            header = 8
        tag, end = group << 16 | element, position + header + length
        position = end
    return tag, end


def test_samples_corpus_is_deterministic(tmp_path: Path) -> None:
    runs = [write_corpus(tmp_path / name, patients=2, large=1, large_pixels=32, bad=True, tricky=True,
                         seed=3) for name in ("a", "b")]
    paths = [[f.path.relative_to(run.root) for f in run.files] for run in runs]
    assert paths[0] == paths[1]
    for first, second in zip(runs[0].files, runs[1].files, strict=True):
        assert first.path.read_bytes() == second.path.read_bytes()
        assert (first.valid, first.reason, first.sop_uid, first.size) == \
            (second.valid, second.reason, second.sop_uid, second.size)


def test_samples_seed_changes_uids_and_pixels(tmp_path: Path) -> None:
    one = write_corpus(tmp_path / "one", patients=1, studies_per_patient=1, series_per_study=1, seed=1)
    two = write_corpus(tmp_path / "two", patients=1, studies_per_patient=1, series_per_study=1, seed=2)
    assert {f.sop_uid for f in one.files}.isdisjoint(f.sop_uid for f in two.files)
    assert one.files[0].path.read_bytes() != two.files[0].path.read_bytes()


def test_samples_counts(corpus: Corpus) -> None:
    grid_instances = 3 * 2 * 2 * 4
    assert corpus.patients == 3 + 1 + TRICKY_CASES
    assert corpus.studies == 3 * 2 + 1 + TRICKY_CASES
    assert corpus.series == 3 * 2 * 2 + 1 + TRICKY_CASES
    assert corpus.instances == grid_instances + 2 + TRICKY_CASES
    assert len(corpus.valid_files) == grid_instances + 2 + TRICKY_CASES + 1
    assert len(corpus.invalid_files) == 6
    on_disk = sorted(p for p in corpus.root.rglob("*") if p.is_file())
    assert on_disk == sorted(f.path for f in corpus.files)
    assert all(f.size == f.path.stat().st_size for f in corpus.files)


def test_samples_layout(corpus: Corpus) -> None:
    assert (corpus.root / "PAT00003" / "ST02" / "SE02" / "IM0004.dcm").is_file()
    assert sorted(p.name for p in (corpus.root / "large").iterdir()) == ["IM0001.dcm", "IM0002.dcm"]
    assert by_name(corpus, "large/IM0002.dcm").size > 96 * 96 * 2


def test_samples_valid_files_read_back(corpus: Corpus, lenient_reading: None) -> None:
    for sample in corpus.valid_files:
        ds = pydicom.dcmread(sample.path)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == \
            (sample.patient_id, sample.study_uid, sample.series_uid, sample.sop_uid)
        assert ds.file_meta.MediaStorageSOPInstanceUID == sample.sop_uid
        if "PixelData" in ds:
            frames = int(ds.get("NumberOfFrames", 1))
            shape = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
            assert ds.pixel_array.shape[:len(shape)] == shape


def test_samples_grid_files_read_without_warnings(corpus: Corpus) -> None:
    for sample in corpus.valid_files[:24]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.dcmread(sample.path)
            assert [str(ds[keyword].value) for keyword in ("PatientName", "StudyDate", "Modality")]
            assert ds.pixel_array.size


@pytest.mark.parametrize("options", [
    {"modality": "CT"},
    {"modality": "MR", "transfer_syntax": ImplicitVRLittleEndian, "rows": 17, "columns": 9},
    {"modality": "US", "frames": 3, "patient_name": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 192"},
    {"modality": "PT", "study_description": "odd", "AccessionNumber": "A1"},
    {"modality": "US", "rows": 3, "columns": 3, "transfer_syntax": ImplicitVRLittleEndian},  # odd length
])
def test_samples_series_encoder_matches_dcmwrite(options: dict[str, Any]) -> None:
    ids = {"patient_id": "P1", "patient_name": "DOE^JANE", "study_uid": "1.2.3", "series_uid": "1.2.3.4"}
    encoder = SeriesEncoder(make_instance(**{**ids, **options}, sop_uid="1.2.3.4.1"))
    for sop_uid, number in (("1.2.3.4.1", 1), ("1.2.3.4.10", 10), ("1.2.3.4.100", 100)):
        ds = make_instance(**{**ids, **options}, sop_uid=sop_uid, instance_number=number, seed=number)
        assert encoder.encode(sop_uid, number, bytes(ds.PixelData)) == _encode(ds)


def test_samples_series_encoder_refuses_other_syntaxes() -> None:
    ds = make_instance(patient_id="P", patient_name="", study_uid="1.2", series_uid="1.3", sop_uid="1.4",
                       transfer_syntax=DeflatedExplicitVRLittleEndian)
    with pytest.raises(ValueError):
        SeriesEncoder(ds)


def test_samples_bad_files_are_broken_as_described(corpus: Corpus) -> None:
    bad = {f.path.name: f for f in corpus.invalid_files}
    assert all(f.reason and not (f.patient_id or f.sop_uid) for f in bad.values())
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(bad["notes.txt"].path)
    assert bad["empty.dcm"].size == 0

    garbage = bad["garbage-after-preamble.dcm"].path.read_bytes()
    assert garbage[128:132] == b"DICM" and garbage[132:134] != b"\x02\x00"

    header = bad["truncated-header.dcm"].path.read_bytes()
    tag, end = last_element(header)
    assert tag == 0x00100010 and end > len(header)  # cut inside PatientName
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pydicom.dcmread(bad["truncated-header.dcm"].path).SOPInstanceUID  # pydicom accepts it

    pixels = bad["truncated-pixel-data.dcm"].path.read_bytes()
    tag, end = last_element(pixels)
    assert tag == 0x7FE00010 and end - len(pixels) == 64 * 64  # half of 64*64*2 bytes is missing
    assert len(pixels) < len(header) + 64 * 64 * 2
    with pytest.raises(ValueError, match="less than expected"):
        _ = pydicom.dcmread(bad["truncated-pixel-data.dcm"].path).pixel_array

    no_sop = pydicom.dcmread(bad["no-sop-instance-uid.dcm"].path)
    assert "SOPInstanceUID" not in no_sop and no_sop.StudyInstanceUID and no_sop.pixel_array.size


def test_samples_duplicate_shares_sop_uid_with_other_bytes(corpus: Corpus) -> None:
    (duplicate,) = [f for f in corpus.files if f.reason == "duplicate SOPInstanceUID with other bytes"]
    (original,) = [f for f in corpus.valid_files if f.sop_uid == duplicate.sop_uid and f != duplicate]
    assert (original.patient_id, original.study_uid, original.series_uid) == \
        (duplicate.patient_id, duplicate.study_uid, duplicate.series_uid)
    assert original.path.read_bytes() != duplicate.path.read_bytes()
    assert (pydicom.dcmread(original.path).PixelData != pydicom.dcmread(duplicate.path).PixelData)


def test_samples_tricky_values_read_back(corpus: Corpus, lenient_reading: None) -> None:
    def read(case: str) -> pydicom.Dataset:
        return pydicom.dcmread(by_name(corpus, f"tricky/{case}.dcm").path)

    assert str(read("utf8-name").PatientName) == "Müller^Jürgen"
    assert str(read("greek-name").PatientName) == "Παπαδόπουλος^Γιώργος"
    assert read("greek-name").SpecificCharacterSet == "ISO_IR 126"
    unsafe = read("unsafe-description")
    assert unsafe.StudyDescription == 'CT: Head/Neck w/o *contrast?* "quoted" <a> | b'
    assert unsafe.SeriesDescription == ".."
    empty = read("empty-values")
    assert all(empty[k].value in ("", None) for k in
               ("PatientName", "StudyDate", "StudyDescription", "SeriesDescription"))
    missing = read("missing-values")
    assert not {"PatientName", "StudyDate", "StudyDescription", "SeriesDescription"} & set(missing.dir())
    assert "InstanceNumber" not in read("no-instance-number")
    syntaxes = {case: read(case).file_meta.TransferSyntaxUID
                for case in ("implicit-vr", "deflated", "rle-lossless", "utf8-name")}
    assert syntaxes == {"implicit-vr": ImplicitVRLittleEndian, "deflated": DeflatedExplicitVRLittleEndian,
                        "rle-lossless": RLELossless, "utf8-name": ExplicitVRLittleEndian}
    assert read("rle-lossless").pixel_array.shape == (64, 64)
    assert read("multiframe").pixel_array.shape == (5, 64, 64, 3)
    report = read("sr-document")
    assert report.SOPClassUID == BasicTextSRStorage and "PixelData" not in report


def test_samples_make_instance_extra_sets_and_removes(tmp_path: Path) -> None:
    ds = make_instance(patient_id="P", patient_name="A^B", study_uid="1.2", series_uid="1.3", sop_uid="1.4",
                       AccessionNumber="ACC1", StudyTime="101500", PatientSex=None)
    size = write_instance(tmp_path / "x.dcm", ds)
    read = pydicom.dcmread(tmp_path / "x.dcm")
    assert size == (tmp_path / "x.dcm").stat().st_size
    assert (read.AccessionNumber, read.StudyTime) == ("ACC1", "101500")
    assert "PatientSex" not in read


@pytest.mark.parametrize("bad_option", [{"modality": "XX"}, {"transfer_syntax": "1.2.840.10008.1.2.4.50"},
                                        {"NotAKeyword": 1}])
def test_samples_make_instance_rejects_unknown_values(bad_option: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_instance(patient_id="P", patient_name="", study_uid="1.2", series_uid="1.3", sop_uid="1.4",
                      **bad_option)


def test_samples_pixels_depend_on_seed_only() -> None:
    assert _pixels(8, 8, 1, False, 5) == _pixels(8, 8, 1, False, 5) != _pixels(8, 8, 1, False, 6)
    assert len(_pixels(8, 4, 2, True, 0)) == 8 * 4 * 2 * 3


def test_samples_corpus_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_corpus(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_samples_cli_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--patients", "1", "--instances-per-series", "2", "--bad"]) == 0
    line = capsys.readouterr().out
    assert "14 files (8 valid, 6 invalid), 1 patients, 2 studies, 4 series, 8 instances" in line
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "out")])
    assert exited.value.code == 2
