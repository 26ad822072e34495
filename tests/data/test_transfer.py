"""Channel mapping across panels: order, loose names, renames, missing channels, refusal."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from cellrep.data import transfer
from cellrep.errors import BadValue, InputError

TRAINED = ("HH3", "CD3", "NaK ATPase", "PanKeratin", "Ki67")


def test_map_by_name_loose_and_renamed():
  cmap = transfer.map_channels(TRAINED, ("ki67", "PanCK", "NaK_ATPase", "HH3", "CD3", "extra"),
                               renames={"PanKeratin": "PanCK"})
  assert cmap.index == (3, 4, 2, 1, 0) and cmap.missing == () and cmap.overlap == 1.0
  assert not cmap.identity
  assert transfer.map_channels(TRAINED, TRAINED).identity


def test_missing_channels_warn_and_read_as_zero(caplog):
  with caplog.at_level(logging.WARNING):
    cmap = transfer.map_channels(TRAINED, ("Ki67", "CD3", "HH3", "PanKeratin"), min_overlap=0.8)
  assert cmap.missing == ("NaK ATPase",) and cmap.overlap == pytest.approx(0.8)
  assert "NaK ATPase" in caplog.text
  # Store crops [B, 4 markers + 2 masks, S, S]: marker j holds 10 * (j + 1), masks 1 and 2.
  crops = np.stack([np.full((3, 3), 10.0 * (j + 1)) for j in range(4)] + [np.ones((3, 3)), 2 * np.ones((3, 3))])
  out = np.asarray(transfer.remap(jnp.asarray(crops[None]), cmap))[0]
  assert out.shape == (7, 3, 3)
  np.testing.assert_array_equal(out[:, 0, 0], [30, 20, 0, 40, 10, 1, 2])


def test_too_little_overlap_is_refused():
  with pytest.raises(InputError, match=r"has 2 of the model's 5 channels \(40%\).*NaK ATPase"):
    transfer.map_channels(TRAINED, ("HH3", "CD3"), min_overlap=0.5, where="other/store")
  with pytest.raises(InputError, match="renamed channel"):
    transfer.map_channels(TRAINED, TRAINED, renames={"CD3": "CD3e"})
  with pytest.raises(BadValue, match="renames"):
    transfer.map_channels(TRAINED, TRAINED, renames={"CD4": "CD3"})
  assert transfer.parse_renames(" PanKeratin=PanCK; CD3=CD3e ") == {"PanKeratin": "PanCK", "CD3": "CD3e"}
  with pytest.raises(BadValue):
    transfer.parse_renames("PanKeratin")
