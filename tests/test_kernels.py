"""kernels: each vendor's ConvolutionKernel names mapped to soft/standard/sharp/bone/lung."""

from __future__ import annotations

import pytest

from radflow import kernels

TABLE = [
    # (manufacturer, kernel, vendor, class)
    ("SIEMENS", "B30f", "Siemens", "soft"),
    ("SIEMENS", "Br38f\\3", "Siemens", "soft"),  # a multi-valued kernel: ADMIRE strength
    ("SIEMENS", "Bf37", "Siemens", "soft"),
    ("SIEMENS", "Qr40d", "Siemens", "standard"),
    ("SIEMENS", "I44f", "Siemens", "standard"),
    ("SIEMENS", "Hr60", "Siemens", "sharp"),
    ("SIEMENS", "B70f", "Siemens", "bone"),
    ("SIEMENS", "Bl57d", "Siemens", "lung"),
    ("GE MEDICAL SYSTEMS", "STANDARD", "GE", "standard"),
    ("GE MEDICAL SYSTEMS", "SOFT", "GE", "soft"),
    ("GE MEDICAL SYSTEMS", "HD STANDARD", "GE", "standard"),
    ("GE MEDICAL SYSTEMS", "BONE", "GE", "bone"),
    ("GE MEDICAL SYSTEMS", "BONEPLUS", "GE", "bone"),
    ("GE MEDICAL SYSTEMS", "LUNG", "GE", "lung"),
    ("GE MEDICAL SYSTEMS", "DETAIL", "GE", "sharp"),
    ("GE MEDICAL SYSTEMS", "CHST", "GE", "sharp"),
    ("Philips", "A", "Philips", "soft"),
    ("Philips", "B", "Philips", "soft"),
    ("Philips", "UB", "Philips", "soft"),
    ("Philips", "C", "Philips", "standard"),
    ("Philips", "D", "Philips", "sharp"),
    ("Philips", "YA", "Philips", "lung"),
    ("Philips", "YB", "Philips", "lung"),
    ("Philips", "L", "Philips", "lung"),
    ("Philips", "E", "Philips", "bone"),
    ("TOSHIBA", "FC08", "Canon", "soft"),
    ("TOSHIBA", "FC18", "Canon", "standard"),
    ("CANON_MEC", "FC30", "Canon", "bone"),
    ("CANON_MEC", "FC52", "Canon", "lung"),
    ("UIH", "B_SOFT_B", "United Imaging", "soft"),
    ("United Imaging Healthcare", "B_SHARP_C", "United Imaging", "sharp"),
    ("United Imaging Healthcare", "L_SHARP_A", "United Imaging", "lung"),
    ("United Imaging Healthcare", "B_BONE_A", "United Imaging", "bone"),
    # manufacturer blanked by an anonymiser: the name's form still tells the vendor
    ("", "B30f", "Siemens", "soft"),
    ("", "FC18", "Canon", "standard"),
    ("", "D", "Philips", "sharp"),
    ("", "LUNG", "GE", "lung"),
    # unknown names stay unknown, never guessed soft
    ("SIEMENS", "XYZ", "Siemens", "unknown"),
    ("", "", "", "unknown"),
    ("ACME", "Q", "", "unknown"),
    ("ACME", "Body Soft", "", "soft"),  # the last resort: a word in the name
]


@pytest.mark.parametrize(("manufacturer", "kernel", "vendor", "cls"), TABLE)
def test_kernel_table(manufacturer, kernel, vendor, cls):
    k = kernels.classify(kernel, manufacturer)
    assert (k.vendor, k.kernel_class) == (vendor, cls)


def test_label_names_vendor_and_kernel():
    assert kernels.classify("B", "Philips Medical Systems").label == "Philips B"
    assert kernels.classify("Br38f\\3", "SIEMENS").label == "Siemens Br38f"


def test_rank_prefers_listed_then_unknown_then_others():
    pref = ("soft", "standard")
    classes = ["bone", "unknown", "standard", "lung", "soft"]
    order = sorted(classes, key=lambda c: kernels.rank(c, pref))
    assert order[:3] == ["soft", "standard", "unknown"]
    assert kernels.rank("sharp", ("sharp",)) < kernels.rank("soft", ("sharp",))
