"""DICOM and ordinary images load to sane RGB pictures; broken files fail naming the file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from medvlm.imaging import ImageLoadError, ImageTooLarge, load_image, pad_to_square
from medvlm.sample_images import sample_path


def _sane(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and array.ndim == 3 and array.shape[2] == 3
    assert array.std() > 10, "a real medical image has contrast"
    return array


def test_ct_is_rescaled_and_windowed():
    image = load_image(sample_path("CT_small.dcm", "pydicom"))
    assert image.size == (128, 128)
    _sane(image)


def test_ct_with_window_tags_uses_the_window():
    array = _sane(load_image(sample_path("693_UNCI.dcm", "pydicom-data")))
    # a 40/100 soft-tissue window saturates bone and air: both ends of the range are used
    assert (array == 0).mean() > 0.05 and (array == 255).mean() > 0.01


def test_mr_loads():
    assert load_image(sample_path("MR_small.dcm", "pydicom")).size == (64, 64)


def test_monochrome1_is_inverted_so_air_is_dark():
    import pydicom

    path = sample_path("RG1_UNCI.dcm", "pydicom-data")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    array = _sane(load_image(path)).astype(float)
    # On a correctly displayed chest film the aerated lungs are darker than the mediastinum.
    h, w = array.shape[:2]
    lungs = array[int(h * 0.3):int(h * 0.5), int(w * 0.25):int(w * 0.35)].mean()
    mediastinum = array[int(h * 0.3):int(h * 0.5), int(w * 0.47):int(w * 0.53)].mean()
    assert lungs < mediastinum


def test_multi_frame_takes_the_first_frame():
    import pydicom

    path = sample_path("emri_small.dcm", "pydicom-data")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 10
    image = load_image(path)
    assert image.size == (64, 64)
    first = ds.pixel_array[0].astype(float)
    grey = np.asarray(image)[..., 0].astype(float)
    assert np.corrcoef(first.ravel(), grey.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name, package", [("MR_small_RLE.dcm", "pydicom"), ("693_J2KR.dcm", "pydicom-data"),
                                           ("JPGLosslessP14SV1_1s_1f_8b.dcm", "pydicom-data")])
def test_compressed_dicom_decodes_with_pylibjpeg(name, package):
    _sane(load_image(sample_path(name, package)))


def test_compressed_matches_uncompressed():
    lossless = np.asarray(load_image(sample_path("693_J2KR.dcm", "pydicom-data")))
    raw = np.asarray(load_image(sample_path("693_UNCR.dcm", "pydicom-data")))
    assert np.array_equal(lossless, raw)


def test_palette_colour_ultrasound_loads_in_colour():
    array = _sane(load_image(sample_path("OBXXXX1A.dcm", "pydicom-data")))
    assert array.shape == (600, 800, 3)


def test_truncated_dicom_fails_naming_the_file(tmp_path):
    source = sample_path("CT_small.dcm", "pydicom")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(source.read_bytes()[:20_000])
    with pytest.raises(ImageLoadError, match="broken.dcm"):
        load_image(broken)


def test_pydicom_truncated_test_file_fails_clearly():
    with pytest.raises(ImageLoadError, match="MR_truncated.dcm"):
        load_image(sample_path("MR_truncated.dcm", "pydicom"))


def test_dicom_without_pixel_data_is_refused(tmp_path):
    shutil.copy(sample_path("test-SR.dcm", "pydicom"), tmp_path / "report.dcm")
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_image(tmp_path / "report.dcm")


def test_non_image_file_fails_naming_it(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(ImageLoadError, match="scan.png"):
        load_image(bad)


def test_sixteen_bit_png_is_scaled_to_eight_bit(tmp_path):
    array = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "x.png")
    out = np.asarray(load_image(tmp_path / "x.png"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_pad_to_square_centres_with_the_fill_colour():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    square = pad_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 255, 255)


def test_truncated_jpeg_fails_naming_the_file(tmp_path):
    full = tmp_path / "full.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(cut)


def _no_decoding(monkeypatch):
    """Any pixel decode fails the test: the cap must act on the header alone."""
    import pydicom
    from PIL import ImageFile

    def refuse(*_args, **_kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(refuse))


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (400, 300)).save(path)
    _no_decoding(monkeypatch)
    with pytest.raises(ImageTooLarge, match=r"huge.png: image_too_large: 400x300 is over 100,000 pixels"):
        load_image(path, max_pixels=100_000)


def test_a_dicom_over_the_pixel_cap_is_refused_before_decoding(monkeypatch):
    path = sample_path("CT_small.dcm", "pydicom")
    _no_decoding(monkeypatch)
    with pytest.raises(ImageTooLarge, match=r"CT_small.dcm: image_too_large: 128x128"):
        load_image(path, max_pixels=128 * 128 - 1)


def test_images_within_the_cap_load():
    assert load_image(sample_path("CT_small.dcm", "pydicom"), max_pixels=128 * 128).size == (128, 128)
