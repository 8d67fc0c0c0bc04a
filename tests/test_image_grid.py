"""jaxsd.image_grid: the labelled picture grids the tutorials show."""
import numpy as np
import pytest

import jaxsd


def tiles(n, size=8):
    return [np.full((size, size, 3), 20 * (i + 1), np.uint8) for i in range(n)]


def test_pictures_land_in_row_major_order_scaled():
    grid = np.asarray(jaxsd.image_grid(tiles(5), columns=3, scale=2))
    gap, w = 2, 16
    assert grid.shape == (gap + 2 * (w + gap), gap + 3 * (w + gap), 3)
    for k in range(5):
        r, c = divmod(k, 3)
        y, x = gap + r * (w + gap), gap + c * (w + gap)
        assert (grid[y:y + w, x:x + w] == 20 * (k + 1)).all(), k
    assert (grid[gap + w + gap:, gap + 2 * (w + gap):] == 255).all(), "the sixth cell stays empty"


def test_labels_get_a_strip_and_stay_inside_their_column():
    plain = jaxsd.image_grid(tiles(2, 32))
    labelled = np.asarray(jaxsd.image_grid(tiles(2, 32), labels=["a", "a much longer label than fits"],
                                           title="title"))
    assert labelled.shape[0] > np.asarray(plain).shape[0]
    strip = labelled[16 + 2:16 + 2 + 14]          # under the title, above the pictures
    assert (strip[:, 2 + 32 + 2 + 32:] == 255).all(), "a long label is cut, not drawn past its picture"
    assert (strip[:, 2 + 32 + 2:] < 255).any(), "the second label is drawn"


def test_floats_and_batches_are_accepted():
    batch = np.stack([np.zeros((4, 4, 3)), np.ones((4, 4, 3))]).astype(np.float32)
    grid = np.asarray(jaxsd.image_grid(batch))
    assert grid[2, 2].tolist() == [0, 0, 0] and grid[2, 8].tolist() == [255, 255, 255]


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=[]), "images: the list is empty"),
    (dict(images=tiles(1) + [np.zeros((4, 4, 3), np.uint8)]), "one size"),
    (dict(images=tiles(2), labels=["one"]), "labels: 1 labels for 2 pictures"),
    (dict(images=tiles(2), scale=0), "scale=0"),
    (dict(images=tiles(2), columns=1.5), "columns=1.5"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxsd.image_grid(**kwargs)
