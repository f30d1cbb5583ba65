"""Image grids: the layout (torchvision's make_grid: `pad` white pixels around every cell) and the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mnist_ldm.io import plots


def test_grid_places_each_image_in_its_cell_with_white_padding():
    images = np.stack([np.full((28, 28), 10 * i, dtype=np.uint8) for i in range(7)])  # image i is all 10*i
    g = plots.grid_array(images, nrow=3)
    assert g.shape == (3 * 30 + 2, 3 * 30 + 2) and g.dtype == np.uint8
    for i in range(7):
        r, c = divmod(i, 3)
        cell = g[2 + 30 * r: 2 + 30 * r + 28, 2 + 30 * c: 2 + 30 * c + 28]
        assert (cell == 10 * i).all(), i
    mask = np.ones_like(g, dtype=bool)
    for i in range(7):
        r, c = divmod(i, 3)
        mask[2 + 30 * r: 30 + 30 * r, 2 + 30 * c: 30 + 30 * c] = False
    assert (g[mask] == 255).all()  # padding and the two empty cells of the last row


def test_float_images_are_clamped_and_rounded():
    x = np.array([-0.5, 0.2, 0.5, 1.7], dtype=np.float32).repeat(196).reshape(1, 1, 28, 28)
    g = plots.grid_array(x, nrow=8)
    assert g.shape == (32, 32)
    assert sorted(set(g[2:30, 2:30].ravel().tolist())) == [0, 51, 128, 255]


def test_save_grid_writes_the_grid_as_a_grayscale_png(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    plots.save_grid(images, tmp_path / "g.png", nrow=4)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.format == "PNG"
        assert np.array_equal(np.asarray(im), plots.grid_array(images, 4))


@pytest.mark.parametrize("min_side, k", [(0, 1), (122, 1), (123, 2), (256, 3)])
def test_save_grid_scales_up_by_whole_pixels_to_min_side(tmp_path, min_side, k):
    images = np.random.default_rng(1).integers(0, 256, (16, 28, 28), dtype=np.uint8)  # 4 x 4: 122 px
    plots.save_grid(images, tmp_path / "g.png", nrow=4, min_side=min_side)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (122 * k, 122 * k)
        np.testing.assert_array_equal(np.asarray(im), plots.grid_array(images, 4).repeat(k, 0).repeat(k, 1))


def test_no_images_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        plots.save_grid(np.zeros((0, 28, 28), np.uint8), tmp_path / "g.png", nrow=4)
    assert not (tmp_path / "g.png").exists()
