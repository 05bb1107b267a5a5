"""Pretrained-weight helpers that need no torch (backbone hash, table resize, the torch hint).

Split from tests/test_convert_swin.py, which is skipped as a whole when the optional torch extra
is missing; these run either way.
"""
import sys

import numpy as np
import pytest

from freesine_jax import checkpointing
from freesine_jax.models import pretrained
from freesine_jax.models import relpos_resize


def test_backbone_hash():
  a = {"x/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "y/bias": np.ones(3, np.float32)}
  b = dict(reversed(list(a.items())))
  assert checkpointing.backbone_hash(a) == checkpointing.backbone_hash(b)
  c = dict(a, **{"y/bias": np.array([1, 1, 1.0000001], np.float32)})
  assert checkpointing.backbone_hash(a) != checkpointing.backbone_hash(c)
  d = dict(a, **{"x/kernel": a["x/kernel"].reshape(3, 2)})  # same bytes, other shape
  assert checkpointing.backbone_hash(a) != checkpointing.backbone_hash(d)


def test_resize_constant_table_stays_constant():
  table = np.full((13 * 13, 3), 0.37, np.float32)
  out = relpos_resize.resize_relpos_table(table, 23 * 23)  # window 7 -> 12
  assert out.shape == (529, 3)
  np.testing.assert_allclose(out, 0.37, rtol=0, atol=1e-6)


def test_resize_keeps_separable_structure():
  """Resizing is separable: a table that varies along dx only still does, per row identical."""
  side = 13
  ramp = np.sin(np.linspace(0, 3, side))
  table = np.tile(ramp[None, :], (side, 1)).reshape(-1, 1).astype(np.float32)
  out = relpos_resize.resize_relpos_table(table, 23 * 23).reshape(23, 23)
  np.testing.assert_allclose(out, np.tile(out[:1], (23, 1)), atol=1e-6)
  # Along dx it equals the 1-D resampling matrix applied to the ramp.
  np.testing.assert_allclose(out[0], relpos_resize.bicubic_matrix(13, 23) @ ramp, atol=1e-6)
  np.testing.assert_allclose(relpos_resize.bicubic_matrix(13, 23).sum(1), 1.0, atol=1e-12)


def test_pth_without_torch_gives_install_hint(tmp_path, monkeypatch):
  """Reading a .pth needs torch; without it the error says how to install it."""
  path = tmp_path / "weights.pth"
  path.write_bytes(b"not read: torch is missing")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    pretrained.read_checkpoint(str(path))
