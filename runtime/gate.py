"""The input gate: which images the runtime agrees to read, decided from their headers before any pixel is decoded.

The model was trained on chest radiographs; asked about a CT slice, an ultrasound cine or two patients
averaged into one study, it still writes a fluent chest X-ray report. The gate refuses those inputs:

    views = [read_view(p) for p in paths]          # header only (pydicom stop_before_pixels / pillow open)
    check_study(views, InputPolicy())              # RefusedInputError, or the views with their checks filled
    px, views = load_study(paths, size=224)        # both, then the pixel decode (what Runtime.generate calls)

Per view (DICOM):
- Modality must be a projection radiograph: CR, DX, RG (film digitizers) or DR (not a DICOM defined term,
  but consoles write it). Anything else (CT, MR, US, NM, MG, XA, RF, OT, SR, ...) is refused unless
  `allow_modality` names it; a missing Modality is named NONE.
- Multi-frame objects (NumberOfFrames > 1) and ultrasound / multi-frame / video SOP classes are refused
  whatever `allow_modality` says: the encoder reads one still projection per view.
- BodyPartExamined, when present, must name the chest: CHEST (the DICOM term), THORAX, TORAX, LUNG or LUNGS as
  its first word (so "CHEST PA" passes, "CHESTABDOMEN" does not). Otherwise a warning, or a refusal with
  `strict_inputs`. An absent BodyPartExamined passes (it is optional in DICOM).
- The declared size must fit the pixel budget, and rescale / window values must be finite (preprocess.py).
- ViewPosition (PA, AP, LL, LATERAL, ...) is read and reported, not checked.
Per study: every view that has a PatientID / StudyInstanceUID must share it; a second copy of the same image
(same SOPInstanceUID) is a warning (refused with `strict_inputs`).

PNG / JPEG carry no such header: they are accepted with `header_checked: False` (only the pixel budget applies).
`ViewInfo.to_json()` is what `emrrg-run --json` and the service report per view; it leaves out patient and
study identifiers.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from emrrg.runtime.preprocess import (
    DEFAULT_MAX_MEGAPIXELS, ImageBytes, ImageError, ImageSource, RefusedInputError, as_source, check_dicom_header,
    check_max_megapixels,
    check_pixel_budget, dicom_dims, no_pixels_error, open_pillow, pillow_format, preprocess_study, read_dicom, route_file,
    _short,
)

PROJECTION_MODALITIES = ("CR", "DX", "DR", "RG")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "TORAX", "LUNG", "LUNGS")
NO_MODALITY = "NONE"  # how --allow-modality names a DICOM file without a Modality element
_REFUSED_SOP_WORDS = ("Ultrasound", "Multi-frame", "Video")  # in pydicom's SOP class names
_NOT_CHECKED = ("no DICOM header: modality, body part, view position, patient and study could not be checked")


class InputWarning(UserWarning):
    """An input the gate accepts but a person should look at (e.g. BodyPartExamined is not the chest)."""


@dataclass(frozen=True)
class InputPolicy:
    """What the gate accepts. `allow_modality`: extra Modality values to accept (NONE: a file without one);
    `strict_inputs`: refuse what would otherwise be a warning; `max_megapixels`: the pixel budget."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    allow_modality: tuple[str, ...] = ()
    strict_inputs: bool = False

    def __post_init__(self):
        check_max_megapixels(self.max_megapixels)
        if isinstance(self.allow_modality, str):
            raise ValueError("allow_modality must be a list of Modality values, e.g. ['CT'], not a string")
        allowed = tuple(sorted({str(m).strip().upper() for m in self.allow_modality if str(m).strip()}))
        object.__setattr__(self, "allow_modality", allowed)


@dataclass
class ViewInfo:
    """One view of a study as the gate saw it. Identifiers (patient_id, study_uid, sop_instance_uid) are kept
    for the study checks and for callers that group files; `to_json` leaves them out."""

    label: str                           # the path, or the service's "view N": what messages call it
    kind: str                            # "dicom", "png", "jpeg", "image" (another pillow format), "array"
    header_checked: bool                 # True when a DICOM header was read and checked
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    photometric: str | None = None
    columns: int | None = None
    rows: int | None = None
    samples: int = 1
    frames: int = 1
    checks: dict[str, str] = field(default_factory=dict)   # check name -> pass / allowed / absent / warn
    warnings: list[str] = field(default_factory=list)

    @property
    def sop_class(self) -> str | None:
        """The SOP class by name (the UID when pydicom does not know it)."""
        if not self.sop_class_uid:
            return None
        from pydicom.uid import UID

        name = UID(self.sop_class_uid).name
        return name or self.sop_class_uid

    def to_json(self) -> dict:
        out = {"label": self.label, "kind": self.kind, "header_checked": self.header_checked,
               "modality": self.modality, "body_part": self.body_part, "view_position": self.view_position,
               "sop_class": self.sop_class, "photometric": self.photometric,
               "size": [self.columns, self.rows] if self.columns is not None else None, "frames": self.frames,
               "header_checks": dict(self.checks), "warnings": list(self.warnings)}
        if not self.header_checked:
            out["note"] = _NOT_CHECKED
        return out


# --------------------------------------------------------------------------- reading headers

def read_view(path: str | os.PathLike[str] | bytes | ImageBytes, label: str | None = None,
              max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> ViewInfo:
    """The header of one image file as a ViewInfo, without decoding pixels (DICOM: pydicom with
    stop_before_pixels; PNG / JPEG: pillow's open). Raises ImageError for unreadable files and
    RefusedInputError for a declared size above the pixel budget or non-finite rescale / window values.
    `path` may be the file's bytes (ImageBytes): nothing is written to disk."""
    path = as_source(path)
    label = str(path) if label is None else label

    def on_pillow(head: bytes) -> ViewInfo:
        with open_pillow(path, head, max_megapixels) as im:
            (width, height), bands = im.size, len(im.getbands())
        kind = pillow_format(head).lower()
        return ViewInfo(label, kind, False, columns=width, rows=height, samples=bands)

    try:
        return route_file(path, lambda force: _dicom_view(path, label, force, max_megapixels), on_pillow)
    except ImageError as e:
        raise type(e)(str(e).replace(str(path), label, 1)) from None


def _dicom_view(path: Path, label: str, force: bool, max_megapixels: float) -> ViewInfo:
    ds = read_dicom(path, force, stop_before_pixels=True)
    try:
        return _header_view(ds, label, max_megapixels)
    except ImageError:
        raise
    except Exception as e:  # pydicom converts elements when they are read: a malformed one surfaces here
        raise ImageError(f"{label}: unreadable DICOM header ({_short(e)})") from None


def _header_view(ds, label: str, max_megapixels: float) -> ViewInfo:
    if "Rows" not in ds:  # cut short before the image header, or not an image (e.g. a structured report)
        raise no_pixels_error(label, ds)
    check_dicom_header(label, ds, max_megapixels)
    cols, rows, samples, frames = dicom_dims(label, ds)
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    return ViewInfo(label, "dicom", True, modality=_text(ds, "Modality"), body_part=_text(ds, "BodyPartExamined"),
                    view_position=_text(ds, "ViewPosition"), patient_id=_text(ds, "PatientID"),
                    study_uid=_text(ds, "StudyInstanceUID"), sop_instance_uid=_text(ds, "SOPInstanceUID"),
                    sop_class_uid=sop_class, photometric=_text(ds, "PhotometricInterpretation"),
                    columns=cols, rows=rows, samples=samples, frames=frames)


def _text(ds, key: str) -> str | None:
    """An element's value as one stripped line (values of VM > 1 joined by a backslash), None when absent/empty."""
    try:
        value = ds.get(key)
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        text = " ".join(str(value).split())
    except Exception:
        return None
    return text[:64] or None


def view_of_array(arr: np.ndarray, label: str = "<ndarray>",
                  max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> ViewInfo:
    """An image already in memory: no header; its shape is checked against the pixel budget."""
    if isinstance(arr, np.ndarray) and arr.ndim in (2, 3) and arr.size:
        samples = arr.shape[2] if arr.ndim == 3 else 1
        check_pixel_budget(label, arr.shape[1], arr.shape[0], samples, 1, max_megapixels)
        return ViewInfo(label, "array", False, columns=arr.shape[1], rows=arr.shape[0], samples=samples)
    return ViewInfo(label, "array", False)  # preprocess explains what is wrong with it


# --------------------------------------------------------------------------- checking a study

def check_study(views: Sequence[ViewInfo], policy: InputPolicy | None = None, reveal_ids: bool = True) -> list[ViewInfo]:
    """Check every view and the study as a whole; fill each view's `checks` and `warnings` and return the views.

    Raises RefusedInputError (one line, naming the view and what to do) at the first refusal. With
    reveal_ids=False a PatientID mismatch does not quote the two IDs (for messages that may reach a log).
    """
    policy = policy or InputPolicy()
    views = list(views)
    for v in views:
        if v.header_checked:
            _check_view(v, policy)
        else:
            v.checks = {}
    _check_same(views, "patient_id", "PatientID", "same_patient", "different patients", reveal_ids)
    _check_same(views, "study_uid", "StudyInstanceUID", "same_study", "different studies", True)
    seen: dict[str, ViewInfo] = {}
    for v in views:
        if v.sop_instance_uid and v.sop_instance_uid in seen:
            _warn(v, policy, f"{v.label} is the same image as {seen[v.sop_instance_uid].label} (same SOPInstanceUID); "
                             "it counts twice in the study average")
        elif v.sop_instance_uid:
            seen[v.sop_instance_uid] = v
    return views


def _check_view(v: ViewInfo, policy: InputPolicy) -> None:
    checks = v.checks = {}
    sop = f" ({v.sop_class})" if v.sop_class else ""
    modality = (v.modality or NO_MODALITY).upper()
    if modality in PROJECTION_MODALITIES:
        checks["modality"] = "pass"
    elif modality in policy.allow_modality:
        checks["modality"] = "allowed"
    else:
        what = f"modality {modality}" if v.modality else "no Modality element (0008,0060)"
        raise RefusedInputError(
            f"{v.label}: {what}{sop} is not a projection radiograph (accepted: {', '.join(PROJECTION_MODALITIES)}); "
            f"this model reads chest X-rays only. To run it anyway pass --allow-modality {modality} "
            f"(allow_modality=['{modality}'])")
    if v.sop_class and any(w.lower() in v.sop_class.lower() for w in _REFUSED_SOP_WORDS):
        raise RefusedInputError(f"{v.label}: SOP class {v.sop_class} is an ultrasound, multi-frame or video object; "
                                "send one still radiograph per view (not allowed by --allow-modality)")
    if v.frames > 1:
        raise RefusedInputError(f"{v.label}: multi-frame object ({v.frames} frames{', color' if v.samples > 1 else ''}); "
                                "send one still radiograph per view (not allowed by --allow-modality)")
    checks["single_frame"] = "pass"
    if v.body_part is None:
        checks["body_part"] = "absent"
    elif re.split(r"[^A-Z]+", v.body_part.upper().strip() + " ")[0] in CHEST_BODY_PARTS:
        checks["body_part"] = "pass"
    else:
        checks["body_part"] = "warn"
        _warn(v, policy, f"{v.label}: BodyPartExamined is {v.body_part!r}, not the chest; the report describes a "
                         "chest X-ray (pass --strict-inputs to refuse such views)")


def _check_same(views: list[ViewInfo], attr: str, tag: str, check: str, what: str, reveal: bool) -> None:
    first: ViewInfo | None = None
    for v in views:
        value = getattr(v, attr)
        if not v.header_checked:
            continue
        if value is None:
            v.checks[check] = "absent"
            continue
        if first is not None and value != getattr(first, attr):
            shown = f"{tag} {getattr(first, attr)!r} vs {value!r}" if reveal else f"their {tag} values differ"
            raise RefusedInputError(f"{first.label} and {v.label} belong to {what} ({shown}); send the views of one "
                                    "study of one patient")
        first = first or v
        v.checks[check] = "pass"


def _warn(v: ViewInfo, policy: InputPolicy, message: str) -> None:
    if policy.strict_inputs:
        raise RefusedInputError(message.split(" (pass --strict-inputs")[0] + " (refused by --strict-inputs)")
    v.warnings.append(message)
    warnings.warn(message, InputWarning, stacklevel=4)


# --------------------------------------------------------------------------- the whole path

def read_views(images: Sequence[ImageSource], policy: InputPolicy | None = None,
               labels: Sequence[str] | None = None) -> list[ViewInfo]:
    """read_view / view_of_array for each image, in order."""
    policy = policy or InputPolicy()
    out = []
    for i, img in enumerate(images):
        label = labels[i] if labels is not None else None
        if isinstance(img, np.ndarray):
            out.append(view_of_array(img, label or "<ndarray>", policy.max_megapixels))
        else:
            out.append(read_view(img, label, policy.max_megapixels))
    return out


def load_study(images: Sequence[ImageSource], size: int, policy: InputPolicy | None = None,
               reveal_ids: bool = True) -> tuple[np.ndarray, list[ViewInfo]]:
    """Headers of every view, the study check, then the pixels: (V, 3, size, size) float32 and the views.
    A refused study decodes no pixel."""
    policy = policy or InputPolicy()
    if len(images) == 0:
        raise ValueError("a study needs at least one image")
    views = check_study(read_views(images, policy), policy, reveal_ids)
    return preprocess_study(list(images), size, policy.max_megapixels), views




# --------------------------------------------------------------------------- command-line options

def add_input_arguments(parser) -> None:
    """--max-megapixels, --allow-modality, --strict-inputs: the same options for emrrg-run and emrrg-serve."""
    def megapixels(text: str) -> float:
        try:
            return check_max_megapixels(text)
        except ValueError as e:
            import argparse
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument("--max-megapixels", type=megapixels, default=DEFAULT_MAX_MEGAPIXELS, metavar="N",
                        help="refuse images whose header declares more than N million samples (width x height x "
                             "samples x frames), before decoding")
    parser.add_argument("--allow-modality", action="append", default=[], metavar="MOD",
                        help="also accept DICOM Modality MOD (repeatable; NONE = no Modality element); without it "
                             f"only {', '.join(PROJECTION_MODALITIES)} are read")
    parser.add_argument("--strict-inputs", action="store_true",
                        help="refuse views that only warn otherwise (BodyPartExamined not the chest, a duplicate image)")


def policy_from_args(args) -> InputPolicy:
    return InputPolicy(args.max_megapixels, tuple(args.allow_modality), args.strict_inputs)


__all__ = ["CHEST_BODY_PARTS", "NO_MODALITY", "PROJECTION_MODALITIES", "InputPolicy", "InputWarning", "ViewInfo",
           "add_input_arguments", "check_study", "load_study", "policy_from_args", "read_view", "read_views",
           "view_of_array"]
