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

Before any pixel is decoded, the declared size is checked against a pixel budget
(`max_megapixels`, default `DEFAULT_MAX_MEGAPIXELS`): width x height x samples (x frames for
DICOM) from the PNG/JPEG header (pillow's `Image.open` without `load`) or the DICOM Rows,
Columns, SamplesPerPixel and NumberOfFrames, so a 2 KB file that declares 13000 x 13000 pixels
is refused with a few MB of memory instead of taking gigabytes. DICOM rescale and window values
must be finite (a width of 0 or below falls back to min-max with a warning, as DICOM forbids it
but consoles write it), and every result is checked to be finite.

Every failure to read an image raises `ImageError`, whose one-line message names the file
and says what is wrong; a refusal by policy (the pixel budget here, modality / body part /
study checks in `emrrg.runtime.gate`) raises its subclass `RefusedInputError`. Pillow and
pydicom are imported inside functions; torch never is.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence, TypeVar, Union

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_SIZE = 224  # MambaXray-VL: 14 x 14 patches of 16 x 16
# Pixel budget, in millions of samples (width x height x samples per pixel x frames), checked from the
# header before decoding. A large digital chest radiograph is 3000 x 3000 = 9 M samples (4300 x 4300 detectors
# exist: 18.5 M); 64 M leaves room for those and keeps a decode (a few bytes per sample in float32 copies)
# well under 1 GB.
DEFAULT_MAX_MEGAPIXELS = 64.0
# Largest |value| a rescale (slope x stored value + intercept) may produce. Real modality outputs (CT HU,
# CR/DX exposure values, PET SUV) stay below 1e7; float32 overflows at 3.4e38, and differences of two values
# must stay finite too, so anything beyond 1e30 is a corrupt header, not an image.
MAX_MODALITY_VALUE = 1e30

ImageSource = Union[str, os.PathLike, bytes, bytearray, "ImageBytes", np.ndarray]
T = TypeVar("T")

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


class RefusedInputError(ImageError):
    """A readable input that the runtime refuses by policy (too large, not a chest radiograph, a study
    that mixes patients...); the message says what to change or which option accepts it."""


def _fail(source: object, reason: str) -> ImageError:
    return ImageError(f"{source}: {reason}")


def check_max_megapixels(max_megapixels: float) -> float:
    """The budget as a float > 0 (math.inf: no budget); ValueError otherwise."""
    try:
        value = float(max_megapixels)
    except (TypeError, ValueError):
        raise ValueError(f"max_megapixels must be a number > 0, got {max_megapixels!r}") from None
    if not value > 0:  # also refuses NaN
        raise ValueError(f"max_megapixels must be > 0, got {max_megapixels!r}")
    return value


def check_pixel_budget(source: object, width: int, height: int, samples: int = 1, frames: int = 1,
                       max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> None:
    """Refuse (RefusedInputError naming the declared size) an image whose header declares more than
    `max_megapixels` million samples. Call it before decoding: it only needs the header's numbers."""
    limit = check_max_megapixels(max_megapixels)
    total = int(width) * int(height) * max(1, int(samples)) * max(1, int(frames))
    if total <= limit * 1e6:
        return
    size = f"{width} x {height} pixels"
    size += f" x {samples} samples" if samples > 1 else ""
    size += f" x {frames} frames" if frames > 1 else ""
    raise RefusedInputError(f"{source}: declared image size {size} = {total / 1e6:.1f} megapixels exceeds the limit "
                            f"of {limit:g} megapixels; refused before decoding (raise it with --max-megapixels / "
                            "max_megapixels if the image is real)")


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip().splitlines()[0].split(" - ")[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- loading

class ImageBytes:
    """An image file held in memory (an upload): its bytes, and the name that messages call it ("view 1").
    Read like a file everywhere a path is (load_image, gate.read_view), without writing it to disk."""

    suffix = ""   # no file name: the bytes decide what it is

    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<bytes>"):
        self.data, self.name = data, name

    def __str__(self) -> str:
        return self.name

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


def as_source(image: str | os.PathLike[str] | bytes | bytearray | memoryview | ImageBytes) -> Path | ImageBytes:
    """A path as a Path, bytes as ImageBytes (named "<bytes>"), ImageBytes as they are."""
    if isinstance(image, ImageBytes):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ImageBytes(image)
    return Path(image)


def load_image(path: str | os.PathLike[str] | bytes | bytearray | ImageBytes,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Decode a PNG, JPEG or DICOM file (a path, or its bytes) to a (H, W) float32 gray image in [0, 1],
    bone bright. Messages name the path, or the ImageBytes' name ("<bytes>" for plain bytes).

    An image whose header declares more than `max_megapixels` million samples is refused before decoding."""
    check_max_megapixels(max_megapixels)
    path = as_source(path)
    gray = route_file(path, lambda force: _load_dicom(path, force, max_megapixels),
                      lambda head: _load_pillow(path, head, max_megapixels))
    _check_finite(path, gray)
    return gray


def route_file(path: Path | ImageBytes, on_dicom: Callable[[bool], T], on_pillow: Callable[[bytes], T]) -> T:
    """Decide what a file is and hand it on: `on_dicom(force)` for DICOM (the 'DICM' marker or a .dcm name;
    force=True without the marker), else `on_pillow(head)`, which raises _Unidentified (from `open_pillow`) for
    bytes pillow does not know, and then a data set without the 128-byte preamble (it starts with group 0x0002
    or 0x0008) is DICOM too. ImageError for a missing, empty or unrecognised file."""
    head = _read_head(path)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return on_dicom(head[128:132] != b"DICM")
    try:
        return on_pillow(head)
    except _Unidentified:  # not PNG/JPEG magic and pillow does not know it either
        if sniff(head) != "dicom":   # a data set without the preamble still is
            raise _fail(path, f"not a PNG, JPEG or DICOM image ({describe_unknown(head)})") from None
    return on_dicom(True)


def _check_finite(source: object, x: np.ndarray) -> None:
    """min / max propagate NaN and show inf, without a full-size boolean temporary."""
    if x.size and not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
        raise _fail(source, "the image decodes to NaN or infinite values (inconsistent header values); "
                            "re-export it from the console")


def _read_head(path: Path | ImageBytes) -> bytes:
    try:
        with _open_bounded(path) as f:
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


def sniff(data: bytes | bytearray) -> str | None:
    """'dicom', 'png', 'jpeg' by the leading bytes (DICOM with or without the 128-byte preamble), or None.
    The one magic-byte sniffer of uploads (emrrg-serve) and SR sources (emrrg.runtime.sr)."""
    head = bytes(data[:132])
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00"):
        return "dicom"
    return None


def describe_unknown(data: bytes | bytearray) -> str:
    """What a file that is no image looks like, for error messages: 'a text file' or 'unrecognised binary data'."""
    head = bytes(data[:512])
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "a text file" if b"\x00" not in head else "unrecognised binary data"


class _Unidentified(Exception):
    """Pillow does not recognise the file; the caller decides what else it might be."""


def pillow_format(head: bytes) -> str:
    """'PNG', 'JPEG' by the magic bytes, else 'image' (whatever else pillow may open)."""
    return "PNG" if head.startswith(_PNG_MAGIC) else "JPEG" if head.startswith(_JPEG_MAGIC) else "image"


@contextmanager
def open_pillow(path: Path, head: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """Pillow's `Image.open` (header only, no pixels decoded) with the pixel budget checked on its size and
    bands, and pillow's errors turned into ImageError. Raises _Unidentified when pillow does not know the
    bytes and they carry no PNG/JPEG magic (the caller may try DICOM). The file is read through
    _BoundedReader, so a chunk length of 4 GB in a small PNG allocates nothing."""
    fmt = pillow_format(head)
    with _open_bounded(path) as fp, _pillow_open(path, fp, fmt, head) as im:
        width, height = im.size
        check_pixel_budget(path, width, height, len(im.getbands()), 1, max_megapixels)
        yield im


def _pillow_open(path: Path, fp, fmt: str, head: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        if fmt == "image":
            raise _Unidentified from None
        size = _png_size(head) if fmt == "PNG" else None
        if size is not None and 0 in size:
            raise _fail(path, f"zero-size PNG ({size[0]} x {size[1]} pixels)") from None
        raise _fail(path, f"corrupt {fmt} file (pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:  # pillow's own limit, above ours unless max_megapixels is raised
        raise RefusedInputError(f"{path}: declared image size exceeds pillow's decompression-bomb limit "
                                f"({_short(e)}); refused before decoding") from None
    except Exception as e:  # pillow raises OSError, SyntaxError, ValueError, struct.error ...
        raise _fail(path, f"corrupt or truncated {fmt} file ({_short(e)})") from None


def _load_pillow(path: Path, head: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    from PIL import ImageOps

    with open_pillow(path, head, max_megapixels) as im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            gray = _pil_to_gray(im)
        except Exception as e:  # pillow raises OSError, SyntaxError, ValueError, struct.error ...
            raise _fail(path, f"corrupt or truncated {pillow_format(head)} file ({_short(e)})") from None
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

class _BoundedReader(io.BufferedReader):
    """A file whose read(n) never asks for more than the bytes left: a corrupt element length of 4 GB must not
    make the reader allocate a 4 GB buffer for a 2 kB file (CPython allocates n bytes before reading)."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 0:
            n = min(n, max(0, self._size - self.tell()))
        return super().read(n)


def _open_bounded(path: Path | ImageBytes):
    """A binary file object of a path (a _BoundedReader) or of bytes in memory (BytesIO never reads past its end)."""
    return path.open() if isinstance(path, ImageBytes) else _BoundedReader(path)


def read_dicom(path: Path, force: bool, stop_before_pixels: bool = False):
    """pydicom's data set of a file, with pydicom's errors (and a forced read of non-DICOM bytes) as ImageError."""
    import pydicom

    try:
        with _open_bounded(path) as fp:
            ds = pydicom.dcmread(fp, force=force, stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise _fail(path, f"corrupt or truncated DICOM header ({_short(e)})") from None
    if force and not any(k in ds for k in ("SOPClassUID", "Rows", "PixelData")):
        raise _fail(path, "not a DICOM file (no 'DICM' marker and no image elements)")
    return ds


def dicom_dims(source: object, ds) -> tuple[int, int, int, int]:
    """(columns, rows, samples per pixel, frames) from the header; ImageError for values that are not counts."""
    dims = []
    for key, default in (("Columns", 0), ("Rows", 0), ("SamplesPerPixel", 1), ("NumberOfFrames", 1)):
        try:
            value = ds.get(key)
            value = default if value is None or value == "" else int(value)
        except Exception:
            raise _fail(source, f"invalid DICOM {key} {_shown(ds, key)}") from None
        if value < 0:
            raise _fail(source, f"invalid DICOM {key} {value}")
        dims.append(value)
    return dims[0], dims[1], max(1, dims[2]), max(1, dims[3])


def check_dicom_header(source: object, ds, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> None:
    """The checks that need only the header (read with or without pixels): size within the pixel budget, and
    finite, usable rescale and window values. Raises ImageError / RefusedInputError."""
    cols, rows, samples, frames = dicom_dims(source, ds)
    if "Rows" in ds or "Columns" in ds:
        check_pixel_budget(source, cols, rows, samples, frames, max_megapixels)
    _check_dicom_values(source, ds)


def _shown(ds, key: str) -> str:
    """A header value for an error message: short, one line."""
    try:
        text = repr(ds[key].value) if key in ds else "(absent)"
    except Exception:
        text = "(unreadable)"
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers(source: object, ds, key: str) -> list[float]:
    """Every value of a DS / IS element as float (VM may be > 1); ImageError when one is not a number."""
    value = ds.get(key)
    if value is None or value == "":
        return []
    values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    try:
        return [float(v) for v in values if v is not None and v != ""]
    except (TypeError, ValueError, OverflowError):
        raise _fail(source, f"DICOM {key} {_shown(ds, key)} is not a number; re-export the image") from None


def _check_dicom_values(source: object, ds) -> None:
    """Rescale slope / intercept and window center / width must be finite; the slope non-zero and the rescaled
    range inside MAX_MODALITY_VALUE. A window width <= 0 is left to the min-max fallback (see _dicom_mono)."""
    for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        bad = [v for v in _numbers(source, ds, key) if not math.isfinite(v)]
        if bad:
            raise _fail(source, f"DICOM {key} {_shown(ds, key)} is not a finite number; the image cannot be "
                                "scaled; re-export it from the console")
    if ds.get("ModalityLUTSequence") or "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return  # pydicom rescales only with both present; a Modality LUT wins over them
    slope, intercept = (_numbers(source, ds, k)[:1] or [v] for k, v in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)))
    slope, intercept = slope[0], intercept[0]
    if slope == 0:
        raise _fail(source, "DICOM RescaleSlope is 0: every pixel would have the same value; re-export the image")
    try:
        bits = min(64, max(1, int(ds.get("BitsStored") or 16)))
        signed = int(ds.get("PixelRepresentation") or 0) == 1
    except Exception:
        return  # a malformed BitsStored / PixelRepresentation fails the decode with its own message
    lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    top = max(abs(slope * lo + intercept), abs(slope * hi + intercept))
    if not top <= MAX_MODALITY_VALUE:
        raise _fail(source, f"DICOM RescaleSlope {slope:g} / RescaleIntercept {intercept:g} map {bits}-bit pixels to "
                            f"values up to {top:.3g} (limit {MAX_MODALITY_VALUE:g}); re-export the image")


def _load_dicom(path: Path, force: bool, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    ds = read_dicom(path, force)
    try:
        return _decode_dicom(path, ds, max_megapixels)
    except ImageError:
        raise
    except Exception as e:  # a malformed element surfacing anywhere in pydicom
        raise _fail(path, f"unreadable DICOM ({_short(e)})") from None


def no_pixels_error(source: object, ds) -> ImageError:
    """The error for a data set without pixel data (or, read with stop_before_pixels, without an image header)."""
    meta = getattr(ds, "file_meta", None) or {}
    sop = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_name = getattr(sop, "name", str(sop or ""))
    # pydicom reads a file cut short without raising (it only warns), leaving the data set
    # empty or without pixel data: an image SOP class or image header without pixels is a cut file.
    if len(ds) == 0 or "Rows" in ds or "Image" in sop_name:
        return _fail(source, f"truncated DICOM file: it ends before the pixel data ({sop_name or 'no SOP class'})")
    what = f"SOP class {sop_name!r}" if sop else "no SOP class"
    what += f", modality {ds.Modality}" if ds.get("Modality") else ""
    return _fail(source, f"DICOM has no pixel data ({what}); not an image (e.g. a structured report)")


def _decode_dicom(path: Path, ds, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise no_pixels_error(path, ds)
    cols, rows, samples, frames = dicom_dims(path, ds)
    if rows * cols == 0:
        raise _fail(path, f"zero-size DICOM image ({cols} x {rows} pixels)")
    check_dicom_header(path, ds, max_megapixels)

    _ensure_transfer_syntax(ds)
    _check_decoder(path, ds)
    _check_compressed_size(path, ds, (cols, rows, samples, frames), max_megapixels)
    try:
        arr = pixel_array(ds, index=0)  # first frame only; YBR is converted to RGB
    except Exception as e:
        raise _fail(path, decode_failure(ds, e)) from None

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


_RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_RLE_MAX_RATIO = 64      # an RLE replicate run is 2 bytes for at most 128 output bytes
_CODESTREAM_PEEK = 1 << 16  # the first fragment's header (SOF / SIZ) sits within its first bytes


def _check_compressed_size(path: Path, ds, dims: tuple[int, int, int, int], max_megapixels: float) -> None:
    """Refuse, before decoding, compressed pixel data whose size contradicts the header: RLE data too short to
    hold the declared pixels, or a JPEG / JPEG-LS / JPEG 2000 codestream that declares a larger image than
    Rows x Columns (its decoder allocates what the codestream says)."""
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_compressed or "PixelData" not in ds:
        return
    cols, rows, samples, frames = dims
    data = ds.PixelData
    if uid == _RLE_LOSSLESS:
        bits = int(ds.get("BitsAllocated") or 8)
        declared = cols * rows * samples * frames * max(1, bits // 8)
        if declared > _RLE_MAX_RATIO * len(data):
            raise _fail(path, f"RLE pixel data of {len(data)} bytes cannot hold the declared {cols} x {rows} x "
                              f"{samples * frames} image ({declared} bytes, at most {_RLE_MAX_RATIO}x); the header is wrong")
        return
    found = _codestream_size(bytes(data[:_CODESTREAM_PEEK]))
    if found is not None:
        width, height, comps = found
        check_pixel_budget(f"{path} (codestream)", width, height, comps, 1, max_megapixels)
        if width > cols or height > rows:
            raise _fail(path, f"the compressed codestream declares {width} x {height} pixels, the DICOM header "
                              f"{cols} x {rows}; the file is inconsistent")


def _codestream_size(buf: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the first JPEG / JPEG-LS SOF or JPEG 2000 SIZ marker in `buf`."""
    i = buf.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ
    if i >= 0 and len(buf) >= i + 42:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", buf[i + 8: i + 24])
        return max(0, xsiz - xo), max(0, ysiz - yo), struct.unpack(">H", buf[i + 40: i + 42])[0]
    i = buf.find(b"\xff\xd8\xff")  # JPEG family: walk the marker segments to the frame header
    if i < 0:
        return None
    i += 2
    while i + 4 <= len(buf) and buf[i] == 0xFF:
        marker, length = buf[i + 1], struct.unpack(">H", buf[i + 2: i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if i + 10 > len(buf):
                return None
            height, width = struct.unpack(">HH", buf[i + 5: i + 9])
            return width, height, buf[i + 9]
        if marker == 0xDA or length < 2:  # start of scan before a frame header, or a broken length
            return None
        i += 2 + length
    return None


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


# pydicom's decoder plugins -> what to pip install for each (pylibjpeg's depends on the syntax: _DECODER_PACKAGES)
_PLUGIN_PACKAGES = {"gdcm": "python-gdcm", "pyjpegls": "pyjpegls", "pillow": "pillow"}
_REASON_CHARS = 200  # one plugin's reason; pylibjpeg's run to ~150 characters


def decode_failure(ds, exc: BaseException) -> str:
    """Why the pixel data did not decode, on one line: each installed plugin's own reason (pydicom puts them on
    the lines after "Unable to decode as exceptions were raised by all available plugins:") and the plugins that
    are not installed. "Corrupt" only where it is known: uncompressed data shorter than the header declares; a
    compressed stream that no installed decoder reads may just need another decoder (e.g. 12-bit JPEG Extended)."""
    text = str(exc)
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_compressed:
        if any(k in text.lower() for k in ("length of the pixel data", "number of bytes of pixel data")):
            return f"corrupt or truncated DICOM pixel data ({_short(exc)})"
        return f"cannot read the DICOM pixel data ({_short(exc)})"
    reasons = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    reasons = [r if len(r) <= _REASON_CHARS else r[:_REASON_CHARS - 3] + "..." for r in reasons] or [_short(exc)]
    bits = ds.get("BitsStored")
    what = f"{uid.name} ({uid}{f', {bits}-bit' if bits else ''})"
    msg = f"no installed decoder could decode the {what} pixel data: " + "; ".join(reasons)
    missing = _missing_plugins(uid)
    return msg + (f"; not installed, and may decode it: {', '.join(missing)}" if missing else
                  "; no other pydicom decoder plugin is known for it")


def _missing_plugins(uid) -> list[str]:
    """pydicom's decoder plugins for `uid` that are not installed, each with its pip install command."""
    from pydicom.pixels import get_decoder

    try:
        names = [m.split(" - ")[0].strip() for m in get_decoder(uid).missing_dependencies]
    except (NotImplementedError, ValueError):
        return []
    syntax = next((p for prefix, p in _DECODER_PACKAGES.items() if uid.startswith(prefix)), None)
    out = []
    for name in names:
        package = syntax if name == "pylibjpeg" else _PLUGIN_PACKAGES.get(name)
        out.append(f"{name} (pip install {package})" if package else name)
    return out


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
    elif not (math.isfinite(voi[1]) and math.isfinite(voi[2])):
        raise _fail(path, f"the VOI LUT / window maps onto a non-finite range [{voi[1]}, {voi[2]}]; re-export the image")
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

def _array_to_gray(arr: np.ndarray, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Validate an in-memory image: (H, W) or (H, W, 3); uint8, uint16, bool or float in [0, 1]."""
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise _fail(_ARRAY_NAME, f"expected a 2-D (H, W) gray or (H, W, 3) RGB array, got shape {arr.shape}")
    if arr.size == 0:
        raise _fail(_ARRAY_NAME, f"zero-size image (shape {arr.shape})")
    check_pixel_budget(_ARRAY_NAME, arr.shape[1], arr.shape[0], arr.shape[2] if arr.ndim == 3 else 1, 1, max_megapixels)
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


def preprocess(image_or_path: ImageSource, size: int = DEFAULT_SIZE,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """A file path or an image array -> the encoder input, (3, size, size) float32, every value finite.

    Arrays: (H, W) gray or (H, W, 3) RGB, as uint8, uint16, or float in [0, 1] (as from `load_image`).
    Files and arrays larger than `max_megapixels` million samples are refused (RefusedInputError).
    """
    from PIL import Image

    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if isinstance(image_or_path, np.ndarray):
        source, gray = _ARRAY_NAME, _array_to_gray(image_or_path, max_megapixels)
    else:
        source, gray = image_or_path, load_image(image_or_path, max_megapixels)
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # mode 'F'
    del gray
    small = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)  # (S, S)
    x = np.broadcast_to(small, (3, size, size))  # (3, S, S)
    x = (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    if not np.isfinite(x).all():  # the last guard: a non-finite encoder input must never pass
        raise _fail(source, "preprocessing produced NaN or infinite values; the image cannot be used")
    return x


def preprocess_study(paths: Sequence[ImageSource], size: int = DEFAULT_SIZE,
                     max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Several views of one study -> (V, 3, size, size) float32, in the order given."""
    if len(paths) == 0:
        raise ValueError("preprocess_study needs at least one image")
    return np.stack([preprocess(p, size, max_megapixels) for p in paths])  # (V, 3, S, S)


__all__ = [
    "DEFAULT_MAX_MEGAPIXELS", "DEFAULT_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_MODALITY_VALUE", "ImageBytes",
    "ImageError", "ImageSource", "RefusedInputError", "check_dicom_header", "check_pixel_budget", "load_image", "preprocess",
    "preprocess_study",
]
