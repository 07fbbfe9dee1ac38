"""The demo: a synthetic CT cohort written as real DICOM, and the phantom segmentation model.

``radflow demo-data`` writes the cohort (``cohort``); ``radflow train-phantom-model`` retrains
the tiny nnU-Net model shipped in ``resources/totalseg_phantom`` (``phantom_model``).
"""

from radflow.demo.cohort import (
    HU,
    ORGAN_LABELS,
    VENDORS,
    DemoSettings,
    Phantom,
    SeriesSpec,
    StudySpec,
    SubjectSpec,
    make_cohort,
    plan_cohort,
    write_series,
)

__all__ = [
    "HU",
    "ORGAN_LABELS",
    "VENDORS",
    "DemoSettings",
    "Phantom",
    "SeriesSpec",
    "StudySpec",
    "SubjectSpec",
    "make_cohort",
    "plan_cohort",
    "write_series",
]
