"""Image files for the input-gate tests, the loader fuzz test and benchmarks/fuzz_loader.py.

- `write_dicom` / `dicom_bytes`: a small DICOM from an array plus any elements.
- Bombs: tiny files whose header declares a huge image (`jpeg_bomb`, `png_bomb`, `rle_dicom_bomb`).
- Seeds: small real files (a synthetic CR DICOM, an RLE one, a 64 x 64 crop of the real RG1_UNCR film with
  its header, a PNG, a 16-bit PNG, a JPEG), all built here, deterministic, a few kB each.
- `fuzz_case(seed, index)`: one mutated input, a pure function of (seed, index): byte-level mutations
  (bit flips, interesting integers, deletions, duplications, truncation) and structure-aware ones (a DICOM
  element set to a hostile value: WindowWidth 1e400, RescaleSlope nan, Rows 65535...; a PNG IHDR or JPEG SOF
  field changed with a valid CRC).
- `run_case(path)`: the loader through the gate, as the runtime runs it; returns "accepted" or raises.
"""
from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np

FUZZ_SIZE = 32  # encoder input size for fuzz runs: the resize is not what is fuzzed, small is fast
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
CROP = 64       # side of the RG1 crop seed


# --------------------------------------------------------------------------- DICOM

def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **elements: object):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(pixels.astype(np.uint16), photometric, bits)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                **elements: object) -> Path:
    """A minimal DX file: (H, W) or (frames, H, W) uint16 pixels plus any extra elements."""
    _dataset(pixels, photometric, bits, **elements).save_as(path, enforce_file_format=True)
    return path


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, compress: str | None = None,
                **elements: object) -> bytes:
    ds = _dataset(pixels, photometric, bits, **elements)
    if compress is not None:
        ds.compress(compress)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_raw_ds(data: bytes, **raw: str) -> bytes:
    """The DICOM with DS elements written as raw strings, such as 'inf' or '1e400' (pydicom refuses to set them)."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(io.BytesIO(data))
    for key, text in raw.items():
        tag = Tag(key)
        ds[tag] = RawDataElement(tag, "DS", len(text), text.encode(), 0, False, True)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def chest_elements(patient: str = "FUZZ-1", study: str = STUDY_UID, **over: object) -> dict:
    """Header elements of a one-view chest CR study."""
    el = dict(Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA", PatientID=patient, StudyInstanceUID=study,
              SeriesInstanceUID=study + ".1", SOPInstanceUID=study + ".1.1", WindowCenter=2048, WindowWidth=4000,
              RescaleSlope=1, RescaleIntercept=0)
    el.update(over)
    return {k: v for k, v in el.items() if v is not None}


# --------------------------------------------------------------------------- bombs

def _gray_jpeg(side: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.indices((side, side)).sum(0) * 8 % 256).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its (first) SOF frame header declaring width x height."""
    i = _sof_offset(data)
    return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]


def _sof_offset(data: bytes) -> int:
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        if data[i + 1] in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise ValueError("no SOF marker")


def jpeg_bomb(width: int = 13000, height: int = 13000) -> bytes:
    """A ~0.5 kB baseline JPEG whose frame header declares width x height."""
    return set_jpeg_size(_gray_jpeg(), width, height)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def set_png_ihdr(data: bytes, **fields: int) -> bytes:
    """The PNG with IHDR fields (width, height, depth, color, compression, filter, interlace) replaced, CRC fixed."""
    names = ("width", "height", "depth", "color", "compression", "filter", "interlace")
    values = dict(zip(names, struct.unpack(">IIBBBBB", data[16:29])))
    values.update(fields)
    ihdr = struct.pack(">IIBBBBB", *(values[n] for n in names))
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]


def png_bomb(width: int = 13000, height: int = 13000, full_data: bool = False) -> bytes:
    """A gray 8-bit PNG whose IHDR declares width x height (valid CRCs, so pillow opens it): 70 bytes with
    one tiny IDAT, or with full_data the whole black image deflated (~1000:1; 13000 x 13000 is ~165 kB), which
    a decoder without a pixel budget decodes in full."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if full_data:
        z, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []   # filter byte 0 + a black row
        parts += [z.compress(row) for _ in range(height)]
        idat = b"".join(parts) + z.flush()
    else:
        idat = zlib.compress(b"\0" * 17 * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rle_dicom_bomb(rows: int = 30000, columns: int = 65535) -> bytes:
    """A few-kB RLE Lossless DICOM of a 64 x 64 image whose header then declares rows x columns."""
    import pydicom
    from pydicom.uid import RLELossless

    data = dicom_bytes(np.random.default_rng(0).integers(0, 4096, (64, 64)), compress=RLELossless,
                       **chest_elements())
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.Columns = rows, columns
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- seeds

@functools.lru_cache(maxsize=1)
def seeds() -> dict[str, bytes]:
    """name -> bytes of each small seed file (deterministic)."""
    from PIL import Image
    import pydicom
    from pydicom.uid import RLELossless

    from emrrg.assets import chest_dicom

    rng = np.random.default_rng(0)
    out = {"cr.dcm": dicom_bytes(rng.integers(0, 4096, (24, 32)), **chest_elements())}
    out["cr_rle.dcm"] = dicom_bytes(rng.integers(0, 4096, (24, 24)), compress=RLELossless, **chest_elements())
    rg1 = pydicom.dcmread(chest_dicom("RG1_UNCR.dcm"))
    h, w = rg1.Rows // 2, rg1.Columns // 2
    crop = rg1.pixel_array[h - CROP // 2: h + CROP // 2, w - CROP // 2: w + CROP // 2]
    keep = {k: rg1.get(k) for k in ("Modality", "BodyPartExamined", "ViewPosition", "PatientID", "StudyInstanceUID",
                                    "SOPInstanceUID", "WindowCenter", "WindowWidth", "RescaleSlope",
                                    "RescaleIntercept") if rg1.get(k) is not None}
    out["rg1_crop.dcm"] = dicom_bytes(crop, "MONOCHROME1", int(rg1.BitsStored), **keep)
    for name, arr, fmt in (("gray.png", rng.integers(0, 256, (24, 32), dtype=np.uint8), "PNG"),
                           ("gray16.png", rng.integers(0, 65536, (16, 16), dtype=np.uint16), "PNG"),
                           ("gray.jpg", rng.integers(0, 256, (24, 32), dtype=np.uint8), "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        out[name] = buf.getvalue()
    return out


# --------------------------------------------------------------------------- mutations

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
# (group, element, VR) -> hostile values, as raw value bytes before padding
DICOM_VALUES = {
    (0x0028, 0x1050, "DS"): [b"1e400", b"-1e400", b"inf", b"nan", b"0", b"1e308", b"abc", b"", b"1\\2", b"-1e308"],  # WindowCenter
    (0x0028, 0x1051, "DS"): [b"1e400", b"inf", b"nan", b"0", b"-5", b"1e-300", b"1e308", b"abc", b"0.5", b"1\\inf"],  # WindowWidth
    (0x0028, 0x1053, "DS"): [b"1e308", b"inf", b"nan", b"0", b"-1", b"1e-320", b"1e30", b"abc", b"-inf"],  # RescaleSlope
    (0x0028, 0x1052, "DS"): [b"1e308", b"-1e400", b"nan", b"-1024", b"1e38", b"abc"],  # RescaleIntercept
    (0x0028, 0x0010, "US"): [0, 1, 2, 255, 30000, 65535],   # Rows
    (0x0028, 0x0011, "US"): [0, 1, 3, 4096, 65535],          # Columns
    (0x0028, 0x0100, "US"): [0, 1, 7, 8, 12, 16, 32, 64],    # BitsAllocated
    (0x0028, 0x0101, "US"): [0, 1, 8, 15, 16, 17, 64],       # BitsStored
    (0x0028, 0x0102, "US"): [0, 7, 15, 31, 200],             # HighBit
    (0x0028, 0x0103, "US"): [0, 1, 2, 65535],                # PixelRepresentation
    (0x0028, 0x0002, "US"): [0, 1, 2, 3, 4],                 # SamplesPerPixel
    (0x0028, 0x0008, "IS"): [b"0", b"2", b"-1", b"100000", b"abc", b"1e3"],   # NumberOfFrames
    (0x0028, 0x0004, "CS"): [b"MONOCHROME1", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"XYZ", b""],  # Photometric
    (0x0028, 0x1056, "CS"): [b"SIGMOID", b"LINEAR_EXACT", b"FOO"],  # VOILUTFunction
    (0x0008, 0x0060, "CS"): [b"CT", b"US", b"", b"DX", b"CR\\CT"],  # Modality
    (0x0018, 0x0015, "CS"): [b"HEAD", b"", b"CHEST PA"],             # BodyPartExamined
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


def _elements(data: bytes) -> list[tuple[int, int, int]] | None:
    """(tag, start, end) of each explicit-VR little-endian element after the preamble, up to pixel data or an
    undefined length; None when the bytes do not parse that way."""
    if data[128:132] != b"DICM":
        return None
    out, i = [], 132
    while i + 8 <= len(data):
        group, elem = struct.unpack("<HH", data[i:i + 4])
        vr = data[i + 4:i + 6]
        if vr in _LONG_VRS:
            if i + 12 > len(data):
                return out
            length, head = struct.unpack("<I", data[i + 8:i + 12])[0], 12
        else:
            length, head = struct.unpack("<H", data[i + 6:i + 8])[0], 8
        if length == 0xFFFFFFFF or (group, elem) == (0x7FE0, 0x0010):
            out.append(((group << 16) | elem, i, len(data)))
            return out
        out.append(((group << 16) | elem, i, i + head + length))
        i += head + length
    return out


def set_dicom_value(data: bytes, group: int, elem: int, vr: str, value) -> bytes | None:
    """The file with one top-level element set (replaced, or inserted in tag order); None if unparseable."""
    els = _elements(data)
    if not els:
        return None
    if isinstance(value, int):
        raw = struct.pack("<H", value)
    else:
        raw = value + (b" " if len(value) % 2 else b"")
    new = struct.pack("<HH", group, elem) + vr.encode() + struct.pack("<H", len(raw)) + raw
    tag = (group << 16) | elem
    for t, start, end in els:
        if t == tag:
            return data[:start] + new + data[end:]
        if t > tag and t >> 16 != 0x0002:
            return data[:start] + new + data[start:]
    return None


BYTE_OPS = ("flip", "byte", "int", "delete", "duplicate", "truncate", "random")


def apply_edit(data: bytearray, op: str, where: float, value: int) -> None:
    """One byte-level edit in place: `where` in [0, 1] picks the position, `value` the bits / integer / length."""
    n = len(data)
    if n == 0:
        return
    pos = min(n - 1, int(where * n))
    run = 1 + value % 64
    if op == "flip":                                # flip one bit
        data[pos] ^= 1 << (value % 8)
    elif op == "byte":                              # one byte
        data[pos] = value % 256
    elif op == "int":                               # an interesting integer, 1 / 2 / 4 bytes, either endianness
        width = (1, 2, 4)[value % 3]
        v = INTERESTING[(value >> 2) % len(INTERESTING)] & ((1 << 8 * width) - 1)
        data[pos:pos + width] = v.to_bytes(width, "little" if value & 0x100 else "big")
    elif op == "delete":                            # delete a run
        del data[pos:pos + run]
    elif op == "duplicate":                         # duplicate a run
        data[pos:pos] = bytes(data[pos:pos + run])
    elif op == "truncate":                          # cut the file
        del data[max(1, pos):]
    elif op == "random":                            # a random run
        data[pos:pos + run % 16 + 1] = random.Random(value).randbytes(run % 16 + 1)
    else:
        raise ValueError(op)


def _mutate_bytes(data: bytearray, rng: random.Random) -> None:
    apply_edit(data, rng.choice(BYTE_OPS), rng.random(), rng.getrandbits(32))


def mutate_structure(name: str, data: bytes, rng: random.Random) -> bytes | None:
    if name.endswith(".dcm"):
        (group, elem, vr), values = rng.choice(list(DICOM_VALUES.items()))
        return set_dicom_value(data, group, elem, vr, rng.choice(values))
    if name.endswith(".png"):
        field, values = rng.choice([("width", (0, 1, 30000, 65535, 2**31 - 1)), ("height", (0, 1, 30000, 2**31 - 1)),
                                    ("depth", (0, 1, 2, 4, 8, 16, 32)), ("color", (0, 2, 3, 4, 6, 7)),
                                    ("interlace", (0, 1, 2))])
        return set_png_ihdr(data, **{field: rng.choice(values)})
    try:
        return set_jpeg_size(data, rng.choice((0, 1, 13000, 65535)), rng.choice((0, 1, 13000, 65535)))
    except ValueError:
        return None


def fuzz_case(seed: int, index: int) -> tuple[str, bytes]:
    """(seed file name, mutated bytes): 1-4 mutations, half of the cases starting with a structure-aware one."""
    rng = random.Random(f"{seed}:{index}")
    name = rng.choice(sorted(seeds()))
    data = seeds()[name]
    if rng.random() < 0.5:
        data = mutate_structure(name, data, rng) or data
    buf = bytearray(data)
    for _ in range(rng.randint(0 if data is not seeds()[name] else 1, 3)):
        _mutate_bytes(buf, rng)
    return name, bytes(buf)


# --------------------------------------------------------------------------- the loader under test

def run_case(path: Path, size: int = FUZZ_SIZE) -> str:
    """The runtime's loader on one file (gate, then pixels). 'accepted' after checking the output; raises
    ImageError for a refusal and anything else for a crash."""
    from emrrg.runtime.gate import load_study

    px, views = load_study([path], size)
    if px.shape != (1, 3, size, size) or px.dtype != np.float32:
        raise AssertionError(f"accepted with shape {px.shape} {px.dtype}")
    if not np.isfinite(px).all():
        raise AssertionError("accepted with non-finite values")
    if len(views) != 1:
        raise AssertionError(f"{len(views)} views for one file")
    return "accepted"


# --------------------------------------------------------------------------- peak memory of one load

_RSS_SCRIPT = r"""
import json, resource, sys, tempfile, warnings
sys.path.insert(0, sys.argv[4])
from pathlib import Path
import numpy as np
from PIL import Image
from emrrg.runtime.gate import InputPolicy, load_study
from emrrg.runtime.preprocess import ImageError, preprocess

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

warnings.simplefilter("ignore")
path, max_mp, cap_mb = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
from tests.runtime.image_inputs import seeds
with tempfile.TemporaryDirectory() as td:   # warm up: imports, pillow plugins, pydicom handlers
    for name in ("gray.png", "gray.jpg", "cr.dcm", "cr_rle.dcm"):
        (Path(td) / name).write_bytes(seeds()[name])
        load_study([Path(td) / name], 32)
base = hwm()
if cap_mb > 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(cap_mb * 2**20),) * 2)
try:
    load_study([path], 224, InputPolicy(max_megapixels=max_mp))
    outcome = "accepted"
except MemoryError:
    outcome = "MemoryError"
except ImageError as e:
    outcome = ("MemoryError: " if "MemoryError" in str(e) else type(e).__name__ + ": ") + str(e).replace(path, "<file>")
print(json.dumps({"baseline_mb": base, "peak_mb": hwm(), "outcome": outcome}))
"""


def measure_load_rss(path: Path, max_megapixels: float = 64.0, address_cap_mb: float = 0.0,
                     timeout: float = 300.0) -> dict:
    """Peak RSS (VmHWM) of loading one file through the gate, in a fresh interpreter: baseline after imports
    and a warm-up load, peak after the load, and the outcome. address_cap_mb > 0 caps the address space
    (RLIMIT_AS) so that an unbounded load fails with MemoryError instead of taking the machine's memory."""
    import json
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), repr(float(max_megapixels)),
                           repr(float(address_cap_mb)), root], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"the measuring process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["delta_mb"] = out["peak_mb"] - out["baseline_mb"]
    return out
