"""Image preprocessing shared by training and inference: X-ray file in, normalized tensor out.

One function, `preprocess`, turns a PNG, JPEG or DICOM chest X-ray (or an array already in
memory) into the (3, size, size) float32 input of the MambaXray-VL encoder. The PyTorch
training code and the torch-free runtime both call it, so both see identical pixels.

The steps, in order:

1. `load_image` decodes the file to a 2-D (H, W) float32 gray image in [0, 1], bright = dense
   (bone bright, lungs dark, as on a light box):
   - DICOM: first frame only; Modality LUT (rescale slope/intercept), then the VOI LUT
     Sequence or Window Center/Width when present (its output range maps to [0, 1]), else
     min-max over the pixel data; MONOCHROME1 is inverted; RGB / YBR / PALETTE COLOR -> luma.
   - PNG / JPEG (and anything else pillow opens): stored values are display values; 8-bit
     divided by 255, 16-bit by 65535; RGB(A) -> luma (ITU-R 601), alpha dropped; the EXIF
     orientation is applied.
2. Resize to size x size with pillow's BILINEAR filter on a float32 'F' image. The aspect
   ratio is not kept (a stretch, as `torchvision.transforms.Resize((224, 224))`), and the
   filter widens when it shrinks, so a 2000-pixel radiograph is area-averaged, not aliased.
3. Replicate to 3 channels and normalize with the ImageNet mean and std.

Every failure to read an image raises `ImageError`, whose one-line message names the file
and says what is wrong. Pillow and pydicom are imported inside functions; torch never is.
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_SIZE = 224  # MambaXray-VL: 14 x 14 patches of 16 x 16

ImageSource = Union[str, os.PathLike, np.ndarray]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights of pillow's convert("L")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_ARRAY_NAME = "<ndarray>"

# pip packages that bring pydicom a decoder, by transfer syntax UID prefix (see pydicom's
# "pixel data handlers" table). JPEG 2000 and HTJ2K come from openjpeg, the JPEG family from libjpeg.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg",   # .50 .51 .57 JPEG baseline, extended, lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg",   # .80 .81 JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg pylibjpeg-openjpeg",  # .90 .91 JPEG 2000
    "1.2.840.10008.1.2.4.20": "pylibjpeg pylibjpeg-openjpeg",  # .201 .202 .203 HTJ2K
}


class ImageError(ValueError):
    """An input that cannot be turned into an image; the message names the file and the problem."""


def _fail(source: object, reason: str) -> ImageError:
    return ImageError(f"{source}: {reason}")


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip().splitlines()[0].split(" - ")[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- loading

def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a PNG, JPEG or DICOM file to a (H, W) float32 gray image in [0, 1], bone bright."""
    path = Path(path)
    head = _read_head(path)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return _load_dicom(path, force=head[128:132] != b"DICM")
    try:
        return _load_pillow(path, head)
    except _Unidentified:  # not PNG/JPEG magic and pillow does not know it either
        pass
    # A DICOM data set without the 128-byte preamble starts with group 0x0002 or 0x0008.
    if head[:2] in (b"\x02\x00", b"\x08\x00"):
        return _load_dicom(path, force=True)
    kind = "a text file" if _is_text(head) else "unrecognised binary data"
    raise _fail(path, f"not a PNG, JPEG or DICOM image ({kind})")


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not an image file") from None
    except OSError as e:
        raise _fail(path, f"cannot read the file ({_short(e)})") from None
    if not head:
        raise _fail(path, "empty file (0 bytes)")
    return head


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


class _Unidentified(Exception):
    """Pillow does not recognise the file; the caller decides what else it might be."""


def _load_pillow(path: Path, head: bytes) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    fmt = "PNG" if head.startswith(_PNG_MAGIC) else "JPEG" if head.startswith(_JPEG_MAGIC) else "image"
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            gray = _pil_to_gray(im)
    except UnidentifiedImageError:
        if fmt == "image":
            raise _Unidentified from None
        size = _png_size(head) if fmt == "PNG" else None
        if size is not None and 0 in size:
            raise _fail(path, f"zero-size PNG ({size[0]} x {size[1]} pixels)") from None
        raise _fail(path, f"corrupt {fmt} file (pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise _fail(path, f"image too large to decode safely ({_short(e)})") from None
    except Exception as e:  # pillow raises OSError, SyntaxError, ValueError, struct.error ...
        raise _fail(path, f"corrupt or truncated {fmt} file ({_short(e)})") from None
    if gray.size == 0:
        raise _fail(path, f"zero-size image ({gray.shape[1]} x {gray.shape[0]} pixels)")
    return gray


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when the header is unreadable."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _pil_to_gray(im) -> np.ndarray:
    """A loaded pillow image as (H, W) float32 in [0, 1]."""
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit gray (pillow reads 16-bit PNG as I;16)
        return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if im.mode == "F":
        return _minmax(np.asarray(im, dtype=np.float32))
    if im.mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return _luma(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float -> (H, W) float32; element-wise (no BLAS), so bit-identical everywhere."""
    rgb = rgb.astype(np.float32, copy=False)
    r, g, b = (np.float32(w) for w in _LUMA)
    return np.clip(rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b, 0.0, 1.0)  # sum may round above 1


def _minmax(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if not np.isfinite([lo, hi]).all():
        raise ValueError("pixel values are not finite")
    if hi <= lo:  # a blank image: no contrast to stretch
        return np.zeros(x.shape, dtype=np.float32)
    return _scale_unit(x, lo, hi, in_place=in_place and x.dtype == np.float32)


# --------------------------------------------------------------------------- DICOM

def _load_dicom(path: Path, force: bool) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as e:
        raise _fail(path, f"corrupt or truncated DICOM header ({_short(e)})") from None
    if force and not any(k in ds for k in ("SOPClassUID", "Rows", "PixelData")):
        raise _fail(path, "not a DICOM file (no 'DICM' marker and no image elements)")
    try:
        return _decode_dicom(path, ds)
    except ImageError:
        raise
    except Exception as e:  # a malformed element surfacing anywhere in pydicom
        raise _fail(path, f"unreadable DICOM ({_short(e)})") from None


def _decode_dicom(path: Path, ds) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        meta = getattr(ds, "file_meta", None) or {}
        sop = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
        sop_name = getattr(sop, "name", str(sop or ""))
        # pydicom reads a file cut short without raising (it only warns), leaving the data set
        # empty or without pixel data: an image SOP class or image header without pixels is a cut file.
        if len(ds) == 0 or "Rows" in ds or "Image" in sop_name:
            raise _fail(path, f"truncated DICOM file: it ends before the pixel data ({sop_name or 'no SOP class'})")
        what = f"SOP class {sop_name!r}" if sop else "no SOP class"
        what += f", modality {ds.Modality}" if ds.get("Modality") else ""
        raise _fail(path, f"DICOM has no pixel data ({what}); not an image (e.g. a structured report)")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols == 0:
        raise _fail(path, f"zero-size DICOM image ({cols} x {rows} pixels)")

    _ensure_transfer_syntax(ds)
    _check_decoder(path, ds)
    try:
        arr = pixel_array(ds, index=0)  # first frame only; YBR is converted to RGB
    except Exception as e:
        raise _fail(path, f"corrupt or truncated DICOM pixel data ({_short(e)})") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_mono(ds, arr, path)
        return np.subtract(1.0, gray, out=gray) if photometric == "MONOCHROME1" else gray  # MONOCHROME1: 0 is white
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb.astype(np.float32) / np.float32(np.iinfo(rgb.dtype).max))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, or YBR already converted by pixel_array
        bits = int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)
        return np.clip(_luma(arr.astype(np.float32) / np.float32(2**bits - 1)), 0.0, 1.0)
    raise _fail(path, f"unsupported DICOM photometric interpretation {photometric!r} (shape {arr.shape})")


def _ensure_transfer_syntax(ds) -> None:
    """A data set read without file meta (no preamble) still needs a Transfer Syntax UID to decode."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _check_decoder(path: Path, ds) -> None:
    """Fail early, naming the pip package, when no installed plugin decodes the transfer syntax."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise _fail(path, f"unsupported DICOM transfer syntax {uid.name!r} ({uid})") from None
    if decoder.is_available:
        return
    package = next((p for prefix, p in _DECODER_PACKAGES.items() if uid.startswith(prefix)), None)
    fix = f"run: pip install {package}" if package else "install one of: " + "; ".join(decoder.missing_dependencies)
    raise _fail(path, f"no decoder installed for DICOM transfer syntax {uid.name!r} ({uid}); {fix}")


_STRIP_ROWS = 256  # pydicom's LUT / windowing work in float64: run them on strips, not on the whole film


def _dicom_mono(ds, arr: np.ndarray, path: Path) -> np.ndarray:
    """Modality LUT, then VOI LUT / window (or min-max), to [0, 1] in the stored polarity.

    All of it is pointwise, so it runs on strips of rows into one float32 output: the float64
    temporaries of pydicom's transforms stay a few MB instead of ~100 MB for a 2k x 2k radiograph."""
    from pydicom.pixels import apply_modality_lut

    if arr.ndim != 2:
        raise _fail(path, f"expected one gray frame, decoded shape {arr.shape}")
    out = np.empty(arr.shape, np.float32)
    strips = [slice(i, i + _STRIP_ROWS) for i in range(0, arr.shape[0], _STRIP_ROWS)]
    use_voi = True
    try:
        voi = _apply_voi(ds, apply_modality_lut(arr[strips[0]], ds))
    except Exception as e:  # an invalid window (e.g. width 0) should not block a report
        warnings.warn(f"{path}: ignoring invalid VOI LUT / window ({_short(e)}); using min-max", stacklevel=3)
        use_voi = False
        voi = None
    if voi is None:
        use_voi = False
    elif voi[2] <= voi[1]:
        return np.zeros(arr.shape, dtype=np.float32)
    for sl in strips:
        x = apply_modality_lut(arr[sl], ds)
        if use_voi:
            y, lo, hi = _apply_voi(ds, x)
            out[sl] = _scale_unit(y, lo, hi)
        else:
            out[sl] = x
    return out if use_voi else _minmax(out, in_place=True)


def _scale_unit(y: np.ndarray, lo: float, hi: float, in_place: bool = False) -> np.ndarray:
    """(y - lo) / (hi - lo) clipped to [0, 1], as float32, without float64 temporaries (one float32 copy
    of y, or none with in_place on a float32 array the caller no longer needs)."""
    out = y if in_place else y.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _apply_voi(ds, x: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """The VOI-transformed pixels and the transform's output range, or None when there is no VOI.

    As pydicom's `apply_voi_lut`, the VOI LUT Sequence wins over Window Center/Width.
    """
    from pydicom.pixels import apply_voi, apply_windowing

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        entries, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + entries), ds)  # every output the LUT can give
        y = apply_voi(np.rint(x).astype(np.int64), ds)
        return y, float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        y = apply_windowing(x, ds)
        # The window maps onto [y_min, y_max], which depends on BitsStored and rescale: probe it.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return y, float(lo), float(hi)
    return None


# --------------------------------------------------------------------------- preprocessing

def _array_to_gray(arr: np.ndarray) -> np.ndarray:
    """Validate an in-memory image: (H, W) or (H, W, 3); uint8, uint16, bool or float in [0, 1]."""
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise _fail(_ARRAY_NAME, f"expected a 2-D (H, W) gray or (H, W, 3) RGB array, got shape {arr.shape}")
    if arr.size == 0:
        raise _fail(_ARRAY_NAME, f"zero-size image (shape {arr.shape})")
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        x = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    elif arr.dtype == np.bool_:
        x = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise _fail(_ARRAY_NAME, "array holds NaN or inf")
        if lo < 0.0 or hi > 1.0:
            raise _fail(_ARRAY_NAME, f"float pixels must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    else:
        raise _fail(_ARRAY_NAME, f"unsupported dtype {arr.dtype}; pass uint8, uint16 or float in [0, 1]")
    return _luma(x) if x.ndim == 3 else x


def preprocess(image_or_path: ImageSource, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A file path or an image array -> the encoder input, (3, size, size) float32.

    Arrays: (H, W) gray or (H, W, 3) RGB, as uint8, uint16, or float in [0, 1] (as from `load_image`).
    """
    from PIL import Image

    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if isinstance(image_or_path, np.ndarray):
        gray = _array_to_gray(image_or_path)
    else:
        gray = load_image(image_or_path)
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # mode 'F'
    small = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)  # (S, S)
    x = np.broadcast_to(small, (3, size, size))  # (3, S, S)
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def preprocess_study(paths: Sequence[ImageSource], size: int = DEFAULT_SIZE) -> np.ndarray:
    """Several views of one study -> (V, 3, size, size) float32, in the order given."""
    if len(paths) == 0:
        raise ValueError("preprocess_study needs at least one image")
    return np.stack([preprocess(p, size) for p in paths])  # (V, 3, S, S)


__all__ = [
    "DEFAULT_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "ImageSource",
    "load_image", "preprocess", "preprocess_study",
]
