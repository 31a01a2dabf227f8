"""Images as the model sees them: our own pixel limit, transparency over white in every mode that has it, and
tiles cut from the right place.

Run: pytest tests/test_images.py
"""

import numpy as np
import pytest
from PIL import Image

from vlm.data.bad_samples import BadSample
from vlm.data.images import load_image, split_image


def test_the_projects_own_pixel_limit_refuses_an_image_pil_would_open(tmp_path):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")  # 4,096 pixels: far below PIL's bomb limit
    with pytest.raises(BadSample, match=r"64x64 pixels, over data.max_image_pixels=1000.*\[image_too_large\]"):
        load_image(tmp_path / "a.png", "7", max_pixels=1000)
    assert np.asarray(load_image(tmp_path / "a.png", "7", max_pixels=4096))[0, 0].tolist() == [10, 20, 30]


def pixels(image: Image.Image, tmp_path) -> np.ndarray:
    image.save(tmp_path / "image.png")
    return np.asarray(load_image(tmp_path / "image.png", "0"))


def test_grey_with_alpha_lies_over_white(tmp_path):
    la = Image.fromarray(
        np.array([[[0, 0], [0, 255], [0, 128], [200, 255]]], np.uint8), "LA"
    )  # black: clear ... opaque
    assert pixels(la, tmp_path)[0].tolist() == [[255] * 3, [0] * 3, [127] * 3, [200] * 3]
    assert pixels(Image.fromarray(np.array([[90, 200]], np.uint8), "L"), tmp_path)[0].tolist() == [[90] * 3, [200] * 3]


def test_a_palette_image_with_a_transparent_index_lies_over_white(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.info["transparency"] = 1  # green is the transparent colour
    assert pixels(image, tmp_path)[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]


def test_tiles_are_cut_in_row_major_order_from_their_own_place():
    """A 2x3 grid of distinct colours: each tile is its own cell's colour, row by row, then the global view."""
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    cells = np.array(colours, np.uint8).repeat(32, axis=0).repeat(32, axis=1)  # 64 x 96 pixels
    tiles, grid = split_image(Image.fromarray(cells), tile=32, max_tiles=6)
    assert grid == (2, 3) and len(tiles) == 7
    for number, tile in enumerate(tiles[:6]):
        middle = np.asarray(tile)[12:20, 12:20].reshape(-1, 3)
        assert (middle == colours[number // 3][number % 3]).all(), number
    assert np.array_equal(np.asarray(tiles[6]), cells)  # the whole image last
