"""Derived DICOM views for the SR and SCP tests: RG1_UNCR.dcm (a real adult PA chest film) re-issued as other
instances of the same or another study, written with pydicom."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom

from emrrg.assets import chest_dicom


def derive_view(out: Path, new_study: bool = False, **changes) -> Path:
    """RG1 as a new instance (new SOPInstanceUID; with `new_study` also a new study and series), with `changes`
    (DICOM keywords) applied, written to `out` in the DICOM file format."""
    ds = pydicom.dcmread(chest_dicom("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = hd.UID()
    if new_study:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = hd.UID(), hd.UID()
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(out, enforce_file_format=True)
    return out


def lateral_view(out: Path) -> Path:
    """RG1 as the same study's lateral view: ViewPosition LL, instance 2."""
    return derive_view(out, ViewPosition="LL", InstanceNumber=2)
