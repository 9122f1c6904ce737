"""Images for the model: PNG/JPEG/GIF/TIFF through Pillow, DICOM through pydicom.

DICOM to an 8-bit RGB picture follows what a radiologist's viewer shows:
1. the first frame of a multi-frame object;
2. Modality LUT (``RescaleSlope``/``RescaleIntercept``, e.g. CT to Hounsfield units);
3. the VOI window from the file (``WindowCenter``/``WindowWidth``, first value when several) or, when
   the file has none, min-max over the frame;
4. ``MONOCHROME1`` inverted so that high values are dark as intended;
5. scaled to 0..255 and replicated to three channels. Colour (RGB/YBR) DICOMs are converted to RGB,
   and PALETTE COLOR ones (ultrasound) through their colour lookup table.

``pad_to_square`` is LLaVA's ``image_aspect_ratio: pad``: expand to a square filled with the image
processor's mean colour (truncated to integers as LLaVA does), so no anatomy is cropped away by the centre
crop. Other images are converted to RGB as LLaVA does (``convert('RGB')``: alpha dropped, palette
expanded), except 16-bit/float greyscale, which is min-max scaled rather than clipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# Checked from the header before any pixel is decoded: a 12000x12000 scan would take ~0.5 GB as RGB
# (more while decoding). 64M pixels is far above any real figure or radiograph (PMC's and DICOM's run to
# a few thousand pixels a side); the stage setting ``max_image_pixels`` changes it.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """An image file that cannot be turned into a picture; the message names the file and the fix."""


class ImageTooLarge(ImageLoadError):
    """An image over the pixel cap, refused before its pixels are decoded."""


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an RGB PIL image; DICOM is recognised by suffix or by its ``DICM`` preamble.
    An image with more than ``max_pixels`` pixels (None: no cap) raises ``ImageTooLarge`` undecoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        return dicom_to_image(path, max_pixels)
    try:
        with Image.open(path) as img:
            check_pixels(path, img.size, max_pixels)
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:   # Pillow's own cap, for a caller that passed max_pixels=None
        raise ImageTooLarge(f"{path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageLoadError):
            raise
        raise ImageLoadError(f"{path}: not a readable image ({exc}); re-download or remove the file") from exc


def check_pixels(path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{path}: image_too_large: {width}x{height} is over {max_pixels:,} pixels "
                            "(max_image_pixels); downscale it or raise the cap")


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(_scale_to_uint8(arr, arr.min(), arr.max())).convert("RGB")
    # LLaVA's Image.open(...).convert('RGB'): transparency is dropped, not composited. 16-bit and float
    # greyscale are min-max scaled instead (convert('RGB') would clip them to white).
    return img.convert("RGB")


def dicom_to_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Render a DICOM file's first frame as an 8-bit RGB image (see module docstring for the steps)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageLoadError(f"{path}: not a readable DICOM file ({exc}); the file may be truncated") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM has no pixel data (e.g. a structured report); it cannot be used as an image")
    check_pixels(path, (int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0)), max_pixels)
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageLoadError(
            f"{path}: cannot decode pixel data with transfer syntax {name}; install a decoder: "
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
        ) from exc
    except (ValueError, EOFError, OSError) as exc:
        raise ImageLoadError(f"{path}: DICOM pixel data is damaged ({exc}); the file may be truncated") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return _colour_dicom(ds, apply_color_lut(pixels, ds))
    if samples == 3:
        return _colour_dicom(ds, pixels)
    return Image.fromarray(_grey_to_uint8(ds, pixels)).convert("RGB")


def _colour_dicom(ds, pixels: np.ndarray) -> Image.Image:
    # pydicom 3 already converts YBR photometric interpretations to RGB in ``pixel_array``.
    if pixels.dtype != np.uint8:
        pixels = _scale_to_uint8(pixels.astype(np.float64), float(pixels.min()), float(pixels.max()))
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def _grey_to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    window = _voi_window(ds)
    if window is not None:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = float(values.min()), float(values.max())
    out = _scale_to_uint8(values, low, high)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _voi_window(ds) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center, width = _first_value(center), _first_value(width)
    if width <= 1:
        return None
    return center, width


def _first_value(value) -> float:
    """Window tags may hold several values (alternative windows); the first is the default view."""
    if isinstance(value, (str, bytes, int, float)):
        return float(value)
    return float(value[0])


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.clip(values, low, high) - low) / (high - low) * 255.0
    return np.round(scaled).astype(np.uint8)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of colour ``fill``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """LLaVA's pad colour ``tuple(int(x * 255) for x in image_mean)``: truncated, (122, 116, 104) for CLIP."""
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return tuple(int(m * 255) for m in mean)
