"""Names built from hostile DICOM values (issue #22): no bidi or invisible format character, no
leading dot, never ``.`` or ``..``, never past 255 bytes; ordinary names exactly as before."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from dicomfs.views.names import MAX_NAME_BYTES, disambiguate, fit_name, join_fields, safe_text

BIDI = [*"\u202a\u202b\u202c\u202d\u202e", *"\u2066\u2067\u2068\u2069", "\u200e", "\u200f", "\u061c"]
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\U000e0001"]
FORMAT = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
"""Every format character this Python knows: bidi controls, zero-width ones, tags, soft hyphen."""

ORDINARY = [
    ("Müller^Jürgen", "Müller^Jürgen"),
    ("Παπαδόπουλος^Γιώργος", "Παπαδόπουλος^Γιώργος"),
    ("山田^太郎", "山田^太郎"),
    ("ヤマダ^タロウ=山田^太郎", "ヤマダ^タロウ=山田^太郎"),
    ("כהן^דוד", "כהן^דוד"),  # right-to-left letters are not controls: they stay
    ("عبد الله^محمد", "عبد الله^محمد"),
    ("O'Brien-Smith^Mary Ann", "O'Brien-Smith^Mary Ann"),
    ("Ñandú", "Ñandú"),
    ("emoji 🙂 face", "emoji 🙂 face"),
    ("x.y.z", "x.y.z"),
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2"),
    ("a/b", "a_b"),
    ("trailing...", "trailing"),
    ("  spaced  out  ", "spaced out"),
]
"""Names as dicomfs showed them before this change (a shown name must never change)."""


def _patient_folder(patient_id: str, patient_name: str) -> str:
    """The by-patients name, as the tree makes it."""
    return disambiguate([(join_fields([(patient_id, "(no id)"), (patient_name, "(no name)")]), "")], [0])[0]


def _assert_safe(name: str) -> None:
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name), ascii(name)
    assert not name.startswith("."), name
    assert name not in (".", "..")
    assert 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES


@pytest.mark.parametrize(("value", "expected"), ORDINARY)
def test_names_ordinary_values_keep_their_names(value: str, expected: str) -> None:
    assert _patient_folder("P1", value) == f"P1 - {expected}"


@pytest.mark.parametrize("control", BIDI + INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_names_bidi_and_invisible_characters_become_underscores(control: str) -> None:
    assert safe_text(f"a{control}b") == "a_b"
    assert _patient_folder("ID", f"NAME{control}") == "ID - NAME_"


def test_names_no_format_character_survives() -> None:
    """All of them at once, and each inside a long name that must be cut."""
    assert set(safe_text("".join(FORMAT))) == {"_"}
    for control in FORMAT:
        _assert_safe(_patient_folder(control * 200, "é" * 200 + control))


def test_names_a_disguised_exe_is_shown_as_what_it_is() -> None:
    name = _patient_folder("RTL2", "\u202eFDP - MÜLLER\u202egpj.exe")
    assert name == "RTL2 - _FDP - MÜLLER_gpj.exe"
    _assert_safe(name)


@pytest.mark.parametrize(("patient_id", "expected"), [
    ("..", "(no id) - NAME"),
    (".", "(no id) - NAME"),
    (".hidden", "_hidden - NAME"),
    ("..x", "_.x - NAME"),
    (" .x", "_x - NAME"),
    ("\u200b.x", "_.x - NAME"),
])
def test_names_never_start_with_a_dot(patient_id: str, expected: str) -> None:
    assert _patient_folder(patient_id, "NAME") == expected


@pytest.mark.parametrize("stem", [".", "..", "...", ". .", ".\u202e.", "\u2066..\u2069"])
def test_names_are_never_dot_or_dot_dot(stem: str) -> None:
    for name in (fit_name(safe_text(stem)), disambiguate([(safe_text(stem), ""), (safe_text(stem), "")], [0, 1])[1],
                 fit_name(safe_text(stem), extension=".dcm")):
        _assert_safe(name)


@pytest.mark.parametrize("unit", ["a", "é", "山", "🙂", "e\u0301", "\u202e", ".", " "])
def test_names_never_pass_255_bytes(unit: str) -> None:
    for length in (254, 255, 256, 1000):
        stem = safe_text(unit * length)
        for name in (fit_name(stem), fit_name(stem, suffix=" (12)", extension=".dcm"), _patient_folder(stem, stem)):
            _assert_safe(name)


def test_names_lone_surrogates_cannot_reach_a_name() -> None:
    """A string with a lone surrogate cannot be encoded as a file name (readdir would fail on it)."""
    assert safe_text("a\udcffb\ud800") == "a_b_"
