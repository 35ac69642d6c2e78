"""Tests for emrrg.runtime.preprocess: real radiographs, DICOM semantics built in tmp_path, bad inputs.

Real images come from the offline asset packages (see emrrg/assets.py); every synthetic DICOM,
PNG and broken file is written into tmp_path by the test that needs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

from emrrg.assets import chest_dicom, pneumonia_images, pydicom_data_dir, real_xrays  # noqa: E402
from emrrg.runtime.preprocess import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, ImageError, load_image, preprocess, preprocess_study,
)
from tests.runtime.image_inputs import write_dicom  # noqa: E402

SEED = 0
# Golden figures of preprocess(RG1_UNCR.dcm). Training and inference must see the same pixels, so a
# pillow / pydicom upgrade that changes the resize or the DICOM pipeline has to fail loudly here.
GOLDEN_RG1 = {"mean": 1.348753809928894, "std": 0.6874390840530396, (0, 112, 112): 1.7579671, (0, 200, 180): 1.6671727}
GOLDEN_ATOL = 1e-5  # float32 arithmetic; a changed filter or window moves these by 1e-3 or more


def _gray(x: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalization: (3, S, S) -> (3, S, S) gray in [0, 1]."""
    return x * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


@pytest.fixture(scope="module")
def rg1_uncr() -> np.ndarray:
    return preprocess(chest_dicom("RG1_UNCR.dcm"))


# --------------------------------------------------------------------------- real radiographs

@pytest.mark.parametrize("path", real_xrays(), ids=lambda p: p.name)
def test_real_xray_shape_dtype_finite(path: Path) -> None:
    x = preprocess(path)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.isfinite(x).all()
    g = _gray(x)
    np.testing.assert_allclose(g[1], g[0], atol=1e-6)  # one gray image, replicated
    np.testing.assert_allclose(g[2], g[0], atol=1e-6)
    assert g.min() >= -1e-6 and g.max() <= 1 + 1e-6
    print(f"{path.name}: gray mean {g[0].mean():.3f}, normalized mean {x.mean():.3f}")
    assert 0.15 < g[0].mean() < 0.9, "a chest X-ray is neither black nor white on average"
    assert -1.5 < x.mean() < 2.0


def test_golden_rg1(rg1_uncr: np.ndarray) -> None:
    got = {"mean": float(rg1_uncr.mean()), "std": float(rg1_uncr.std())}
    got.update({k: float(rg1_uncr[k]) for k in GOLDEN_RG1 if isinstance(k, tuple)})
    for key, want in GOLDEN_RG1.items():
        print(f"{key}: got {got[key]!r}, golden {want!r}, |d| {abs(got[key] - want):.2e}")
        assert abs(got[key] - want) <= GOLDEN_ATOL, f"preprocess(RG1_UNCR) changed at {key}"


def test_monochrome1_lungs_dark_mediastinum_bright() -> None:
    g = load_image(chest_dicom("RG1_UNCR.dcm"))  # stored as MONOCHROME1
    assert g.dtype == np.float32 and g.shape == (1955, 1841)
    h, w = g.shape
    band = g[h // 3: 2 * h // 3]  # mid-height, through both lungs and the heart/spine
    center = band[:, int(0.45 * w): int(0.55 * w)].mean()
    left, right = band[:, int(0.2 * w): int(0.3 * w)].mean(), band[:, int(0.7 * w): int(0.8 * w)].mean()
    print(f"center {center:.3f}, lungs {left:.3f} / {right:.3f}")
    assert center > max(left, right) + 0.1


def test_j2k_lossless_equals_uncompressed(rg1_uncr: np.ndarray) -> None:
    np.testing.assert_array_equal(preprocess(chest_dicom("RG1_J2KR.dcm")), rg1_uncr)


def test_j2k_lossy_close_to_its_decoded_twin() -> None:
    # RG1_UNCI holds the pixels of the lossy RG1_J2KI after decoding.
    a, b = load_image(chest_dicom("RG1_J2KI.dcm")), load_image(chest_dicom("RG1_UNCI.dcm"))
    print(f"max |d| {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_deterministic() -> None:
    for path in (chest_dicom("RG1_J2KR.dcm"), pneumonia_images()[0]):
        np.testing.assert_array_equal(preprocess(path), preprocess(path))


def test_study_stacks_views_in_order() -> None:
    paths = pneumonia_images()[:2]
    x = preprocess_study(paths, size=64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(x[i], preprocess(p, size=64))
    with pytest.raises(ValueError):
        preprocess_study([])


def test_study_error_names_the_bad_view(tmp_path: Path) -> None:
    bad = tmp_path / "lateral.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="lateral.png"):
        preprocess_study([pneumonia_images()[0], bad])


def test_every_pydicom_sample_loads_or_raises_image_error() -> None:
    # Odd real files (RGB, YBR, palette, big endian, RLE, multi-frame, VOI/modality LUTs, truncated):
    # each gives a gray image in [0, 1] or an ImageError, never a pydicom traceback.
    loaded, refused = 0, []
    for path in sorted(pydicom_data_dir().glob("*.dcm")):
        if path.stat().st_size > 4_000_000:  # the RG1 radiographs are covered above
            continue
        try:
            g = load_image(path)
        except ImageError as e:
            refused.append(str(e))
            continue
        assert g.ndim == 2 and g.dtype == np.float32, path.name
        assert np.isfinite(g).all() and g.min() >= 0.0 and g.max() <= 1.0, path.name
        loaded += 1
    print(f"loaded {loaded}, refused {len(refused)}:", *refused, sep="\n  ")
    assert loaded >= 50


def test_rgb_and_ybr_dicom_agree() -> None:
    rgb, ybr = load_image(pydicom_data_dir() / "SC_rgb.dcm"), load_image(pydicom_data_dir() / "SC_ybr_full_uncompressed.dcm")
    assert rgb.shape == (100, 100)
    np.testing.assert_allclose(ybr, rgb, atol=0.02)  # YBR_FULL round trip costs about 1 of 255


# --------------------------------------------------------------------------- DICOM semantics

@pytest.mark.parametrize("window", [{}, {"WindowCenter": 2048, "WindowWidth": 1500}], ids=["minmax", "window"])
def test_monochrome1_is_inverse_of_monochrome2(tmp_path: Path, window: dict) -> None:
    pixels = np.random.default_rng(SEED).integers(100, 4000, size=(32, 48))
    m2 = load_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", **window))
    m1 = load_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", **window))
    np.testing.assert_array_equal(m1, 1.0 - m2)
    assert m2[pixels.argmax() // 48, pixels.argmax() % 48] == m2.max()  # MONOCHROME2: high value = bright


def test_full_range_minmax_without_window(tmp_path: Path) -> None:
    pixels = np.random.default_rng(SEED).integers(100, 3001, size=(20, 30))
    pixels.flat[[0, 1]] = 100, 3000
    g = load_image(write_dicom(tmp_path / "raw.dcm", pixels))
    np.testing.assert_allclose(g, (pixels - 100) / 2900, atol=1e-6)


def test_window_center_width_clips(tmp_path: Path) -> None:
    ramp = np.arange(4096).reshape(64, 64)  # every 12-bit value once
    g = load_image(write_dicom(tmp_path / "win.dcm", ramp, WindowCenter=2048, WindowWidth=1024)).ravel()
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): <= c - 0.5 - (w-1)/2 -> black, > c - 0.5 + (w-1)/2 -> white
    want = np.clip((np.arange(4096) - 2047.5) / 1023 + 0.5, 0.0, 1.0)
    print(f"max |d| {np.abs(g - want).max():.2e}")
    np.testing.assert_allclose(g, want, atol=1e-6)
    assert (g[:1537] == 0).all() and (g[2560:] == 1).all()
    assert np.all(np.diff(g[1537:2560]) > 0)


def test_rescale_applied_before_window(tmp_path: Path) -> None:
    stored = np.arange(0, 2048, 2).reshape(32, 32)
    g = load_image(write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                               WindowCenter=0, WindowWidth=400)).ravel()
    hu = stored.ravel() - 1024.0
    np.testing.assert_allclose(g, np.clip((hu + 0.5) / 399 + 0.5, 0.0, 1.0), atol=1e-6)


def test_voi_lut_sequence_wins_over_window(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    lut = np.round(np.linspace(0, 4095, 1024) ** 2 / 4095).astype(np.uint16)  # a curved LUT, 12-bit out
    item = Dataset()
    item.LUTDescriptor = [1024, 1000, 16]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ramp = np.arange(900, 2124).reshape(34, 36)
    g = load_image(write_dicom(tmp_path / "voi.dcm", ramp, VOILUTSequence=[item],
                               WindowCenter=3000, WindowWidth=10)).ravel()
    want = lut[np.clip(ramp.ravel() - 1000, 0, 1023)] / 4095.0
    np.testing.assert_allclose(g, want, atol=1e-6)


def test_invalid_window_falls_back_to_minmax(tmp_path: Path) -> None:
    pixels = np.random.default_rng(SEED).integers(0, 4096, size=(16, 16))
    with pytest.warns(UserWarning, match="invalid VOI"):
        g = load_image(write_dicom(tmp_path / "w0.dcm", pixels, WindowCenter=100, WindowWidth=0))
    np.testing.assert_allclose(g, (pixels - pixels.min()) / (pixels.max() - pixels.min()), atol=1e-6)


def test_multiframe_takes_first_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    frames = rng.integers(0, 4096, size=(3, 16, 24))
    g = load_image(write_dicom(tmp_path / "mf.dcm", frames))
    f0 = frames[0]
    np.testing.assert_allclose(g, (f0 - f0.min()) / (f0.max() - f0.min()), atol=1e-6)


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    pixels = np.random.default_rng(SEED).integers(0, 4096, size=(16, 16))
    full = write_dicom(tmp_path / "full.dcm", pixels)
    raw = tmp_path / "raw_dataset"  # no extension, no 128-byte preamble, no file meta
    ds = pydicom.dcmread(full)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(raw), load_image(full))


# --------------------------------------------------------------------------- PNG / JPEG / arrays

def test_png_16bit_gray(tmp_path: Path) -> None:
    arr = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    g = load_image(tmp_path / "g16.png")
    np.testing.assert_allclose(g, arr / 65535.0, atol=1e-7)


def test_png_8bit_gray_matches_array_input(tmp_path: Path) -> None:
    arr = np.random.default_rng(SEED).integers(0, 256, size=(50, 70), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g8.png"), arr / 255.0, atol=1e-7)
    np.testing.assert_array_equal(preprocess(tmp_path / "g8.png"), preprocess(arr))
    np.testing.assert_array_equal(preprocess(load_image(tmp_path / "g8.png")), preprocess(arr))


def test_png_rgb_and_rgba_to_luma(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[1, 0], rgb[1, 1] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    alpha = np.random.default_rng(SEED).integers(0, 256, size=(2, 2, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1)).save(tmp_path / "rgba.png")
    want = np.array([[0.299, 0.587], [0.114, 1.0]], dtype=np.float32)  # BT.601 luma; alpha ignored
    for name in ("rgb.png", "rgba.png"):
        np.testing.assert_allclose(load_image(tmp_path / name), want, atol=1e-6)
    np.testing.assert_array_equal(preprocess(rgb, size=8), preprocess(tmp_path / "rgb.png", size=8))


def test_resize_averages_instead_of_aliasing() -> None:
    # A 1-pixel checkerboard shrunk 4x: a filter that widens with the scale gives flat gray,
    # point sampling (nearest or plain bilinear) would give black and white.
    board = (np.indices((896, 896)).sum(axis=0) % 2).astype(np.float32)
    g = _gray(preprocess(board))[0]
    print(f"checkerboard -> [{g.min():.4f}, {g.max():.4f}]")
    assert np.abs(g - 0.5).max() < 0.01


def test_constant_image_and_size() -> None:
    x = preprocess(np.full((300, 200), 0.25, dtype=np.float32), size=32)
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(x, np.broadcast_to(((0.25 - IMAGENET_MEAN) / IMAGENET_STD)[:, None, None], x.shape),
                               atol=1e-6)
    for size in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            preprocess(np.zeros((8, 8), np.float32), size=size)


# --------------------------------------------------------------------------- bad inputs

def _bad_file(kind: str, tmp_path: Path) -> Path:
    rng = np.random.default_rng(SEED)
    uncr = chest_dicom("RG1_UNCR.dcm").read_bytes()
    if kind == "truncated_dicom_header":
        (p := tmp_path / "cut2000.dcm").write_bytes(uncr[:2000])
    elif kind == "truncated_dicom_pixels":
        (p := tmp_path / "cut_half.dcm").write_bytes(uncr[: len(uncr) // 2])
    elif kind == "truncated_dicom_preamble":
        (p := tmp_path / "cut200.dcm").write_bytes(uncr[:200])
    elif kind == "truncated_jpeg":
        jpeg = pneumonia_images()[0].read_bytes()
        (p := tmp_path / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 3])
    elif kind == "corrupt_png":
        (p := tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(500))
    elif kind == "random_bytes":
        (p := tmp_path / "noise.bin").write_bytes(b"\xee" + rng.bytes(4095))
    elif kind == "random_bytes_dcm":
        (p := tmp_path / "noise.dcm").write_bytes(rng.bytes(4096))
    elif kind == "text":
        (p := tmp_path / "notes.png").write_text("Findings: no acute cardiopulmonary process.\n" * 20)
    elif kind == "dicom_no_pixels":
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import BasicTextSRStorage, generate_uid
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality = "SR"
        ds.save_as(p := tmp_path / "report.dcm", enforce_file_format=True)
    elif kind == "zero_size_png":  # pillow refuses to write one; build the chunks by hand
        import struct
        import zlib

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        ihdr = struct.pack(">IIBBBBB", 0, 64, 8, 0, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
        (p := tmp_path / "zero.png").write_bytes(png)
    elif kind == "empty_file":
        (p := tmp_path / "empty.png").write_bytes(b"")
    elif kind == "missing":
        p = tmp_path / "missing.dcm"
    elif kind == "directory":
        (p := tmp_path / "study_dir").mkdir()
    else:
        raise AssertionError(kind)
    return p


BAD_FILES = {  # kind -> words the message must hold
    "truncated_dicom_header": "truncated",
    "truncated_dicom_pixels": "truncated",
    "truncated_dicom_preamble": "truncated",
    "truncated_jpeg": "truncated",
    "corrupt_png": "corrupt PNG",
    "random_bytes": "not a PNG, JPEG or DICOM",
    "random_bytes_dcm": "not a DICOM file",
    "text": "text file",
    "dicom_no_pixels": "no pixel data",
    "zero_size_png": "zero-size",
    "empty_file": "empty file",
    "missing": "no such file",
    "directory": "directory",
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_raises_one_line_image_error(kind: str, tmp_path: Path) -> None:
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ImageError) as info:
        preprocess(path)
    msg = str(info.value)
    print(msg)
    assert str(path) in msg and BAD_FILES[kind] in msg
    assert "\n" not in msg
    err = info.value
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None), "no chained traceback"
    assert isinstance(info.value, ValueError)


BAD_ARRAYS = {
    "1d": (np.zeros(10, np.float32), "got shape (10,)"),
    "4d": (np.zeros((1, 3, 8, 8), np.float32), "got shape (1, 3, 8, 8)"),
    "rgba": (np.zeros((8, 8, 4), np.uint8), "got shape (8, 8, 4)"),
    "zero_size": (np.zeros((0, 16), np.uint8), "zero-size"),
    "float_0_255": (np.full((8, 8), 200.0, np.float32), "[0, 1]"),
    "nan": (np.full((8, 8), np.nan, np.float32), "NaN"),
    "int32": (np.zeros((8, 8), np.int32), "unsupported dtype"),
}


@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_bad_array_raises_image_error(kind: str) -> None:
    arr, words = BAD_ARRAYS[kind]
    with pytest.raises(ImageError) as info:
        preprocess(arr)
    print(info.value)
    assert "<ndarray>" in str(info.value) and words in str(info.value)


class _NoDecoder:
    is_available = False
    missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]


def test_missing_decoder_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _NoDecoder())
    path = chest_dicom("RG1_J2KR.dcm")
    with pytest.raises(ImageError) as info:
        preprocess(path)
    print(info.value)
    assert str(path) in str(info.value) and "JPEG 2000" in str(info.value)
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in str(info.value)


def test_unsupported_transfer_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    def no_plugin(uid: str) -> None:
        raise NotImplementedError(f"No pixel data decoders have been implemented for '{uid}'")
    monkeypatch.setattr(pydicom.pixels, "get_decoder", no_plugin)
    with pytest.raises(ImageError, match="unsupported DICOM transfer syntax"):
        load_image(chest_dicom("RG1_UNCR.dcm"))


def test_jpeg_ls_decodes_or_names_libjpeg() -> None:
    # JPEG-LS needs pylibjpeg-libjpeg, which the runtime extra does not install: whichever holds here,
    # the outcome must be a gray image or the pip command, nothing in between.
    from pydicom.pixels import get_decoder

    path = pydicom_data_dir() / "emri_small_jpeg_ls_lossless.dcm"
    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        np.testing.assert_array_equal(load_image(path), load_image(pydicom_data_dir() / "emri_small.dcm"))
    else:
        with pytest.raises(ImageError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
            load_image(path)


# RG1_UNCR.dcm is 1841 x 1955, 16-bit: the decoded frame is 7 MB and one float32 copy 14 MB. Strip-wise
# LUT / windowing into one float32 output measures a 43 MB traced peak; whole-image float64 windowing measured
# 111 MB. 64 MB leaves room for pydicom / Pillow versions and fails the float64 path.
PREPROCESS_PEAK_MB = 64


def test_preprocessing_a_large_radiograph_stays_lean():
    import tracemalloc

    path = str(chest_dicom("RG1_UNCR.dcm"))
    preprocess(path, 224)                      # imports and pydicom's handler set-up, outside the measurement
    tracemalloc.start()
    try:
        x = preprocess(path, 224)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    print(f"traced peak {peak:.1f} MB")
    assert x.shape == (3, 224, 224) and peak < PREPROCESS_PEAK_MB


# --------------------------------------------------------------------------- bytes in memory (uploads)

def test_bytes_decode_like_the_file(tmp_path: Path) -> None:
    from emrrg.runtime.gate import read_view
    from emrrg.runtime.preprocess import ImageBytes

    pixels = np.random.default_rng(SEED).integers(0, 4096, size=(16, 16))
    raw = tmp_path / "raw_dataset"   # a DICOM data set without the preamble: found by the bytes, not a name
    ds = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", pixels))
    del ds.file_meta
    ds.preamble = None
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    png = tmp_path / "gray16.png"
    Image.fromarray((pixels * 16).astype(np.uint16)).save(png)
    for path in (chest_dicom(), chest_dicom("RG1_J2KR.dcm"), pneumonia_images()[0], raw, png):
        want = load_image(path)
        for data in (path.read_bytes(), bytearray(path.read_bytes()), ImageBytes(path.read_bytes(), "view 1")):
            np.testing.assert_array_equal(load_image(data), want)
        assert read_view(ImageBytes(path.read_bytes(), "view 2")).to_json() == \
            {**read_view(path, "view 2").to_json()}, path.name
    np.testing.assert_array_equal(preprocess(chest_dicom().read_bytes()), preprocess(chest_dicom()))


@pytest.mark.parametrize("data, want", [
    (b"", "empty file"), (b"just some text", "not a PNG, JPEG or DICOM image (a text file)"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "PNG"),
], ids=["empty", "text", "truncated-png"])
def test_bad_bytes_name_the_view(data: bytes, want: str) -> None:
    from emrrg.runtime.preprocess import ImageBytes

    with pytest.raises(ImageError) as e:
        load_image(ImageBytes(data, "view 3"))
    assert str(e.value).startswith("view 3: ") and want in str(e.value), str(e.value)
    with pytest.raises(ImageError, match=r"^<bytes>: "):
        load_image(data)
