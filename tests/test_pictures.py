"""Pictures that read: grids with class names and a title, small images enlarged, pictures side by side."""
from __future__ import annotations

import numpy as np
import torch

from dmd2.io.pictures import class_rows, labelled_grid, side_by_side, zoom


def test_small_images_are_enlarged_by_a_whole_factor_with_nearest_neighbour():
    assert (zoom(8), zoom(16), zoom(17), zoom(32)) == (4, 2, 1, 1)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 0, 0] = 255  # one white pixel in a corner: a 4x4 white square once enlarged
    grid = np.asarray(labelled_grid([[image]]))
    assert grid.shape == (2 + 32 + 2, 2 + 32 + 2, 3)
    assert (grid[2:6, 2:6] == 255).all() and (grid[6:34, 6:34] == 0).all()


def test_rows_are_named_after_their_class_and_the_title_sits_above():
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    rows, names = class_rows(images, [0, 0, 2, 2, 1, 1], ["cat", "dog", "frog"], per_row=2)
    assert [len(r) for r in rows] == [2, 2, 2] and names == ["cat", "frog", "dog"]
    assert class_rows(images, [0] * 6, None, 3)[1] == ["", ""]  # unconditional: no names
    plain, named = labelled_grid(rows), labelled_grid(rows, names, title="generator, 1 NFE, step 400")
    assert named.width > plain.width and named.height > plain.height  # a margin for the names, a line for the title
    assert side_by_side([plain, named]).size == (plain.width + 8 + named.width, named.height)
