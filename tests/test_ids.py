from pathlib import Path

import pytest

from radflow import ids


def test_pseudonym_is_stable_keyed_and_prefixed():
    a = ids.pseudonym("subject", "MRN0001", "salt-a-12345")
    assert a == ids.pseudonym("subject", "MRN0001", "salt-a-12345")
    assert a != ids.pseudonym("subject", "MRN0001", "salt-b-12345")
    assert a != ids.pseudonym("subject", "MRN0002", "salt-a-12345")
    assert a.startswith("sub-") and len(a) == 4 + 12
    assert "MRN0001" not in a


def test_kinds_do_not_collide():
    assert (
        ids.pseudonym("subject", "x", "salt-123456")[4:]
        != ids.pseudonym("study", "x", "salt-123456")[4:]
    )


@pytest.mark.parametrize("hostile", ["../../etc", "/etc/passwd", "..", "a/../../b", "x\x00y", ""])
def test_hostile_identifiers_never_escape(tmp_path, hostile):
    root = tmp_path / "results"
    for name in (ids.pseudonym("subject", hostile, "salt-123456"), ids.sanitize(hostile)):
        target = (root / name).resolve()
        assert target.parent == root.resolve()
        assert name not in ("", ".", "..")
        assert "/" not in name and "\\" not in name


def test_unknown_kind_and_empty_salt_are_errors():
    with pytest.raises(ValueError, match="unknown id kind"):
        ids.pseudonym("patient", "x", "salt-123456")
    with pytest.raises(ValueError, match="salt"):
        ids.pseudonym("subject", "x", "")


def test_sanitize_keeps_safe_text():
    assert ids.sanitize("case-0a1b") == "case-0a1b"
    assert Path(ids.sanitize("../../etc")).name == "etc"


def test_fill_template_refuses_blank_and_unknown_placeholders():
    from radflow.ids import fill_template

    keys = {"case_id": "case-0123456789ab", "StudyInstanceUID": "", "SeriesInstanceUID": "1.2"}
    assert fill_template("m/{case_id}.nii.gz", keys) == "m/case-0123456789ab.nii.gz"
    assert fill_template("m/{SeriesInstanceUID}.nii.gz", keys) == "m/1.2.nii.gz"
    with pytest.raises(ValueError, match="StudyInstanceUID.*does not have"):
        fill_template("m/{StudyInstanceUID}/organs.nii.gz", keys)
    with pytest.raises(ValueError, match="unknown placeholder {PatientName}"):
        fill_template("m/{PatientName}.nii.gz", keys)
