"""A DICOM whose pixel data does not decode: the message gives each decoder plugin's own reason and the plugins
that are not installed, and says "corrupt" only where that is known (uncompressed data shorter than declared).

Real files (pydicom's own 12-bit JPEG Extended test films), real pydicom plugins; "pylibjpeg is not installed"
is a child interpreter whose import system refuses it (tests/import_blocker.py)."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from emrrg.assets import chest_dicom
from emrrg.runtime.preprocess import ImageError, load_image
from tests.import_blocker import run_blocked

PILLOW_12_BIT = "Pillow does not support 'JPEG Extended' for samples with 12-bit precision"


def test_every_plugin_says_why_and_the_missing_one_is_named():
    """JPEG-lossy.dcm: 12-bit JPEG Extended that neither pylibjpeg nor pillow decodes (GDCM does)."""
    with pytest.raises(ImageError) as e:
        load_image(get_testdata_file("JPEG-lossy.dcm"))
    msg = str(e.value)
    assert "\n" not in msg and "corrupt" not in msg, msg
    assert "JPEG Extended" in msg and "12-bit" in msg and "1.2.840.10008.1.2.4.51" in msg
    assert "pylibjpeg: libjpeg error" in msg and f"pillow: {PILLOW_12_BIT}" in msg
    assert "gdcm (pip install python-gdcm)" in msg


def test_without_pylibjpeg_the_message_names_it(tiny_bundle):
    """JPGExtended.dcm decodes with pylibjpeg-libjpeg; on an install without it emrrg-run says so in one line."""
    path = get_testdata_file("JPGExtended.dcm")
    assert load_image(path).shape == (1024, 256)          # decodable where pylibjpeg is installed
    r = run_blocked("pylibjpeg,libjpeg,openjpeg", "emrrg.runtime.cli:run_main", str(tiny_bundle), path,
                    "--allow-modality", "NM", "--max-new-tokens", "2")   # a nuclear-medicine film: let it through
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]          # after the gate's warning on BodyPartExamined WHOLE BODY
    assert line.startswith("emrrg-run: error: ") and "corrupt" not in line, line
    assert f"pillow: {PILLOW_12_BIT}" in line
    assert "pylibjpeg (pip install pylibjpeg pylibjpeg-libjpeg)" in line


def test_short_uncompressed_pixel_data_is_called_truncated(tmp_path):
    ds = pydicom.dcmread(chest_dicom())
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "half.dcm")
    with pytest.raises(ImageError, match=r"corrupt or truncated DICOM pixel data \(ValueError: .*less than expected"):
        load_image(tmp_path / "half.dcm")
