"""Upstream ARC tokenisation: a grid of colours 0-9 as a flat canvas of tokens.

PAD=0 fills the canvas, EOS=1 marks the grid's bottom and right edges, colour c becomes token c+2 (vocab 12).
Label positions that hold PAD are ignored by the loss (-100); EOS is supervised, so the model predicts the shape.
"""

from __future__ import annotations

import numpy as np

PAD = 0
EOS = 1
COLOUR_OFFSET = 2
NUM_COLOURS = 10
VOCAB_SIZE = COLOUR_OFFSET + NUM_COLOURS
IGNORE_LABEL = -100


def encode_grid(grid: np.ndarray, canvas: int) -> np.ndarray:
    """Place ``grid`` top-left in a ``canvas`` x ``canvas`` field of PAD with its EOS edges; flat uint8 [canvas**2].

    The EOS row lies directly under the grid and the EOS column directly right of it, each spanning the grid's extent,
    plus the corner cell (h, w); a side where the grid fills the canvas gets no EOS.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise ValueError(f"grid must be 2-D, got shape {grid.shape}")
    h, w = grid.shape
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1, got {h}x{w}")
    if h > canvas or w > canvas:
        raise ValueError(f"grid of {h}x{w} does not fit the {canvas}x{canvas} canvas")
    if grid.size and (grid.min() < 0 or grid.max() >= NUM_COLOURS):
        raise ValueError(f"grid colours must lie in 0..{NUM_COLOURS - 1}, got {grid.min()}..{grid.max()}")
    out = np.full((canvas, canvas), PAD, dtype=np.uint8)
    out[:h, :w] = grid.astype(np.uint8) + COLOUR_OFFSET
    if h < canvas:
        out[h, :w] = EOS
    if w < canvas:
        out[:h, w] = EOS
    if h < canvas and w < canvas:
        out[h, w] = EOS
    return out.reshape(-1)


def decode_grid(tokens: np.ndarray, canvas: int) -> np.ndarray:
    """Inverse of ``encode_grid``: the largest top-left rectangle of colour tokens, minus the offset (uint8 [h, w]).

    Works on any prediction, garbage included (as upstream's ``_crop``): the result may be empty (0x0).
    """
    tokens = np.asarray(tokens)
    if tokens.size != canvas * canvas:
        raise ValueError(f"expected {canvas * canvas} tokens for a {canvas}x{canvas} canvas, got {tokens.size}")
    field = tokens.reshape(canvas, canvas).astype(np.int64)
    is_colour = (field >= COLOUR_OFFSET) & (field < VOCAB_SIZE)
    # Length of the run of colour tokens at the start of each row, then the width usable by the top r+1 rows.
    run = np.cumprod(is_colour, axis=1).sum(axis=1)
    width = np.minimum.accumulate(run)
    area = (np.arange(1, canvas + 1)) * width
    best = int(np.argmax(area))
    if area[best] == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    h, w = best + 1, int(width[best])
    return (field[:h, :w] - COLOUR_OFFSET).astype(np.uint8)


def labels_from_tokens(tokens: np.ndarray) -> np.ndarray:
    """Loss labels for a token array: PAD positions become IGNORE_LABEL (-100), the rest (EOS included) kept; int16."""
    tokens = np.asarray(tokens)
    labels = tokens.astype(np.int16)
    labels[tokens == PAD] = IGNORE_LABEL
    return labels
