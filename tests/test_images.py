import numpy as np
import pytest
from PIL import Image

from cxr.data.images import ImageDecodeError, decode_xray, encode_png, resize_square


def test_real_images_decode_to_8bit_gray(nih_root):
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))
    assert len(paths) == 120
    rgba = 0
    for path in paths:
        pil = Image.open(path)
        pixels = decode_xray(path.read_bytes())
        assert pixels.dtype == np.uint8 and pixels.shape == (1024, 1024)
        if pil.mode == "RGBA":
            rgba += 1
            red, green, blue, _ = (np.asarray(c) for c in pil.split())
            luma = np.rint(0.299 * red + 0.587 * green + 0.114 * blue)  # ITU-R 601 luma, computed here
            assert np.abs(pixels.astype(int) - luma).max() <= 1
        else:
            assert np.array_equal(pixels, np.asarray(pil.convert("L")))
    assert rgba == 3


def test_16bit_png_is_scaled_from_the_full_range_when_its_values_need_it(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # PIL writes a 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    assert decode_xray(path.read_bytes()).tolist() == [[0, 1, 128, 255]]


def test_12_bit_data_in_a_16_bit_png_keep_their_brightness(nih_root, tmp_path):
    original = decode_xray((nih_root / "images_001" / "images" / "00000442_000.png").read_bytes())
    twelve_bit = np.round(original.astype(np.float64) * 4095 / 255).astype(np.uint16)
    path = tmp_path / "twelve.png"
    Image.fromarray(twelve_bit).save(path)
    assert np.abs(decode_xray(path.read_bytes()).astype(int) - original).max() <= 1


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_bytes_raise_a_clear_error(data):
    with pytest.raises(ImageDecodeError):
        decode_xray(data)


def test_resize_matches_box_average(nih_root):
    path = next((nih_root / "images_001" / "images").glob("*.png"))
    ours = resize_square(decode_xray(path.read_bytes()), 64)
    reference = np.asarray(Image.open(path).convert("L").resize((64, 64), Image.Resampling.BOX))
    assert ours.shape == (64, 64) and np.abs(ours.astype(int) - reference).max() <= 1
    assert np.array_equal(decode_xray(encode_png(ours)), ours)
