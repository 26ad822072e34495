"""Channel mapping between panels: read a store with a model trained on other channels.

A model expects its training channels in its training order. Another store
(another panel, another lab) holds some of them, maybe in another order, under
slightly different names ("NaK ATPase" / "NaK_ATPase"), plus channels the model
never saw. `map_channels` pairs every trained channel with a channel of the
store: by exact name first, then by name with case, spaces, `_`, `-` and `.`
ignored, or through explicit renames. Trained channels the store lacks are fed
as zeros, with a warning that lists them; when fewer than `min_overlap` of the
trained channels are found, the mapping is refused. `remap` applies the mapping
to a batch of crops on device.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from cellrep.data.crops import NUM_MASK_CHANNELS
from cellrep.errors import BadValue, InputError


def _key(name: str) -> str:
  return re.sub(r"[\s_\-.]", "", name).lower()


def parse_renames(text: str) -> dict[str, str]:
  """"trained=store;..." -> {trained channel: store channel}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    trained, eq, other = part.partition("=")
    if not eq or not trained.strip() or not other.strip():
      raise BadValue("renames", f"{part!r} is not 'trained=store'",
                        "'PanKeratin=PanCK;...'")
    out[trained.strip()] = other.strip()
  return out


@dataclasses.dataclass(frozen=True)
class ChannelMap:
  """index[i]: the store channel that feeds trained channel i, -1 when it is missing."""
  trained: tuple[str, ...]
  available: tuple[str, ...]
  index: tuple[int, ...]

  @property
  def missing(self) -> tuple[str, ...]:
    return tuple(c for c, i in zip(self.trained, self.index) if i < 0)

  @property
  def overlap(self) -> float:
    """Fraction of the trained channels found in the store."""
    return 1.0 - len(self.missing) / len(self.trained)

  @property
  def identity(self) -> bool:
    return self.index == tuple(range(len(self.available))) and len(self.available) == len(self.trained)


def map_channels(trained: Sequence[str], available: Sequence[str], *, min_overlap: float = 0.8,
                 renames: Mapping[str, str] | None = None, where="store") -> ChannelMap:
  """Pairs each trained channel with a channel of `available`.

  Args:
    trained: the model's channels, in its input order.
    available: the store's channels, in the store's order.
    min_overlap: least fraction of trained channels that must be found.
    renames: trained name -> store name, for markers renamed between panels.
    where: the store's path, named in errors.

  Raises:
    InputError: fewer than `min_overlap` of the trained channels are found, or a
      rename names a channel the store does not have.
  """
  trained, available = tuple(trained), tuple(available)
  renames = dict(renames or {})
  unknown = sorted(set(renames) - set(trained))
  if unknown:
    raise BadValue("renames", f"{unknown} are not channels of the model",
                      f"names among {list(trained)}")
  exact = {c: i for i, c in enumerate(available)}
  loose: dict[str, list[int]] = {}
  for i, c in enumerate(available):
    loose.setdefault(_key(c), []).append(i)
  index = []
  for c in trained:
    if c in renames:
      if renames[c] not in exact:
        raise InputError(where, f"renamed channel {renames[c]!r} (for {c!r}) is not in the store",
                         f"a channel among {list(available)}")
      index.append(exact[renames[c]])
    elif c in exact:
      index.append(exact[c])
    elif len(loose.get(_key(c), [])) == 1:
      index.append(loose[_key(c)][0])
    else:
      index.append(-1)
  cmap = ChannelMap(trained, available, tuple(index))
  if cmap.overlap < min_overlap:
    raise InputError(where, f"has {len(trained) - len(cmap.missing)} of the model's {len(trained)} "
                     f"channels ({cmap.overlap:.0%}); missing {list(cmap.missing)}",
                     f"at least {min_overlap:.0%} of them (the minimum overlap), or renames "
                     "of the markers named otherwise")
  if cmap.missing:
    logging.warning("%s lacks %d of the model's channels, fed as zeros: %s", where,
                    len(cmap.missing), ", ".join(cmap.missing))
  return cmap


def remap(crops: jnp.ndarray, cmap: ChannelMap, masks: int = NUM_MASK_CHANNELS) -> jnp.ndarray:
  """Crops of the store's channels -> crops of the model's channels.

  Args:
    crops: [B, K_store + masks, S, S] (markers in store order, then `masks` mask channels:
      the two of `cellrep.data.crops`, or none).

  Returns:
    [B, K_trained + masks, S, S] float32: trained channel i is store channel
    `cmap.index[i]`, or zeros where it is missing; the masks follow unchanged.
  """
  if cmap.identity:
    return crops
  index = np.asarray(cmap.index)
  gathered = jnp.take(crops, np.maximum(index, 0), axis=1)
  present = jnp.asarray(index >= 0, crops.dtype)[None, :, None, None]
  return jnp.concatenate([gathered * present, crops[:, crops.shape[1] - masks:]], axis=1)
