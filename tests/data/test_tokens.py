"""Tokenisation: placement, EOS edges, round trip, and the crop that decodes any prediction."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from etrm.data.tokens import EOS, IGNORE_LABEL, PAD, VOCAB_SIZE, decode_grid, encode_grid, labels_from_tokens


@st.composite
def grid_and_canvas(draw):
    canvas = draw(st.integers(1, 12))
    h, w = draw(st.integers(1, canvas)), draw(st.integers(1, canvas))
    grid = draw(arrays(np.uint8, (h, w), elements=st.integers(0, 9)))
    return grid, canvas


def upstream_crop(tokens: np.ndarray, canvas: int) -> np.ndarray:
    """A loop transcription of upstream ``_crop``: shrink the width row by row, keep the largest area."""
    field = tokens.reshape(canvas, canvas).astype(np.int64)
    best_area, best = 0, (0, 0)
    num_c = canvas
    for num_r in range(1, canvas + 1):
        for c in range(1, num_c + 1):
            x = field[num_r - 1, c - 1]
            if x < 2 or x > 11:
                num_c = c - 1
                break
        if num_r * num_c > best_area:
            best_area, best = num_r * num_c, (num_r, num_c)
    return (field[:best[0], :best[1]] - 2).astype(np.uint8)


@settings(deadline=None, max_examples=300)
@given(grid_and_canvas())
def test_round_trip_every_size(case):
    grid, canvas = case
    tokens = encode_grid(grid, canvas)
    assert tokens.shape == (canvas * canvas,) and tokens.dtype == np.uint8
    back = decode_grid(tokens, canvas)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, grid)


@settings(deadline=None, max_examples=200)
@given(grid_and_canvas())
def test_layout_colours_eos_and_pad(case):
    grid, canvas = case
    h, w = grid.shape
    field = encode_grid(grid, canvas).reshape(canvas, canvas)
    np.testing.assert_array_equal(field[:h, :w], grid.astype(np.int64) + 2)
    expected = np.full((canvas, canvas), PAD)
    expected[:h, :w] = grid + 2
    if h < canvas:
        expected[h, :w] = EOS
    if w < canvas:
        expected[:h, w] = EOS
    if h < canvas and w < canvas:
        expected[h, w] = EOS
    np.testing.assert_array_equal(field, expected)


def test_eos_placement_explicit():
    grid = np.array([[0, 1, 2], [3, 4, 5]])
    field = encode_grid(grid, 5).reshape(5, 5)
    expected = np.array([
        [2, 3, 4, 1, 0],
        [5, 6, 7, 1, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(field, expected)


def test_full_canvas_dimension_gets_no_eos():
    full = encode_grid(np.full((4, 4), 9), 4)
    assert not np.any(full == EOS) and not np.any(full == PAD)
    tall = encode_grid(np.zeros((4, 2), dtype=np.uint8), 4).reshape(4, 4)
    np.testing.assert_array_equal(tall[:, 2], [EOS] * 4)  # the column right of the grid, no row below it
    assert not np.any(tall[:, 3] != PAD)


@pytest.mark.parametrize("shape", [(9, 3), (3, 9), (9, 9)])
def test_too_large_grid_raises(shape):
    with pytest.raises(ValueError, match="does not fit the 8x8 canvas"):
        encode_grid(np.zeros(shape, dtype=np.uint8), 8)


def test_bad_colours_and_shapes_raise():
    with pytest.raises(ValueError, match="colours"):
        encode_grid(np.array([[10]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        encode_grid(np.zeros(4), 4)
    with pytest.raises(ValueError, match="expected 16 tokens"):
        decode_grid(np.zeros(15), 4)


@settings(deadline=None, max_examples=300)
@given(st.integers(1, 8).flatmap(
    lambda c: st.tuples(st.just(c), arrays(np.int64, (c * c,), elements=st.integers(-3, 14)))))
def test_decode_garbage_matches_upstream_crop(case):
    canvas, tokens = case
    out = decode_grid(tokens, canvas)
    assert out.ndim == 2 and out.dtype == np.uint8
    assert out.shape[0] <= canvas and out.shape[1] <= canvas
    assert out.size == 0 or out.max() <= 9
    np.testing.assert_array_equal(out, upstream_crop(tokens, canvas))


def test_decode_blank_is_empty():
    assert decode_grid(np.zeros(16, dtype=np.uint8), 4).shape == (0, 0)
    assert decode_grid(np.ones(16, dtype=np.uint8), 4).shape == (0, 0)


def test_labels_ignore_pad_keep_eos():
    tokens = encode_grid(np.array([[0, 9]]), 3)
    labels = labels_from_tokens(tokens)
    assert labels.dtype == np.int16
    np.testing.assert_array_equal(labels, np.where(tokens == PAD, IGNORE_LABEL, tokens.astype(np.int64)))
    assert np.count_nonzero(labels == EOS) == 4 and np.count_nonzero(labels == IGNORE_LABEL) == 3
    assert VOCAB_SIZE == 12
