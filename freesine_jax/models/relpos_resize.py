"""Resizing Swin relative-position bias tables to another window, as the Swin authors do.

A ((2w-1)^2, heads) table holds one bias per (dy, dx) offset and head. A model whose window
differs from the checkpoint's (window 12 from window-7 weights, or a stage whose window shrinks to
its token grid) views each head's table as a (2w-1) x (2w-1) image and resamples it with
PyTorch's bicubic interpolation, implemented exactly here in numpy (docs/pretrained.md).
"""
from __future__ import annotations

import math

import numpy as np


def is_table(path: str) -> bool:
  """Whether a weight path names a relative-position bias table."""
  return path.endswith("relative_position_bias_table")


def resizable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
  """Whether a table of shape `src` can be resized to `dst`: (2w-1)^2 rows, same heads."""
  if len(src) != 2 or len(dst) != 2 or src[1] != dst[1]:
    return False
  return all(int(round(math.sqrt(n))) ** 2 == n and int(round(math.sqrt(n))) % 2 == 1
             for n in (src[0], dst[0]))


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.75 (PyTorch's bicubic)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D bicubic resampling as torch.nn.functional.interpolate does it.

  align_corners=False: output pixel i samples source coordinate (i + 0.5) * n_in / n_out - 0.5;
  4 taps at floor(src) - 1 .. floor(src) + 2 with the a = -0.75 cubic kernel; taps outside the
  source are clamped to the border pixel. No antialiasing when shrinking.
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    base = math.floor(src)
    t = src - base
    for offset in (-1, 0, 1, 2):
      m[i, min(max(base + offset, 0), n_in - 1)] += _cubic(np.array(t - offset))
  return m


def resize_relpos_table(table: np.ndarray, rows: int) -> np.ndarray:
  """Resizes a ((2w-1)^2, heads) bias table to `rows` = (2w'-1)^2 rows, bicubically per head.

  As the Swin authors do when fine-tuning at another window: view each head's table as a
  (2w-1, 2w-1) image (row index = dy offset, column = dx offset) and resample it.
  """
  table = np.asarray(table)
  n_in, n_out = int(round(math.sqrt(table.shape[0]))), int(round(math.sqrt(rows)))
  if n_in * n_in != table.shape[0] or n_out * n_out != rows:
    raise ValueError(f"relative-position tables must have (2w-1)^2 rows; got {table.shape[0]} "
                     f"-> {rows}")
  if n_in == n_out:
    return table.astype(np.float32)
  m = bicubic_matrix(n_in, n_out)
  grid = table.astype(np.float64).reshape(n_in, n_in, -1)
  out = np.einsum("ij,jkh,lk->ilh", m, grid, m)
  return out.reshape(rows, -1).astype(np.float32)


def resize_tables(flat: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
  """All tables resized to window `window` (other weights untouched)."""
  rows = (2 * window - 1) ** 2
  return {k: resize_relpos_table(v, rows) if is_table(k) else v for k, v in flat.items()}
