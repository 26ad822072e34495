"""Synthetic multiplexed tissue: seeded FOVs of densely packed cells with known types.

What a FOV is made of, in the order it is made:

1. Layout. Cell centres from a few Lloyd iterations of random points (a
   centroidal Voronoi packing, like epithelium), some cells dropped to leave
   holes; each cell a power-diagram region cut to its own radius, with a
   slightly wobbly outline. Classes are drawn per cell from
   `imbalance`-skewed frequencies (`_synthetic_panel.FREQUENCY`), tilted by
   smooth random niche fields so that tumour, immune and stromal classes
   gather in their own regions (`niche_strength`, `niche_scale`).
2. Expression. Each class expresses a few markers of the panel, each nuclear,
   membranous or cytoplasmic (`_synthetic_panel.CLASSES`); per-cell levels are
   log-normal. A level is the mean over the cell, so where the signal sits does
   not change the cell's mean.
3. Artefacts that a per-cell mean-intensity classifier cannot see through but a
   model looking at the crop can:
   - patches: with probability `patch_prob` a cell carries, at the point where
     it touches a neighbour with a membrane marker its own class lacks, a small
     piece of that neighbour's membrane (trogocytosis): a blob with all the
     neighbour's membrane markers whose total signal matches the neighbour's;
   - lateral spillover: every signal is blurred by the point spread
     (`psf_sigma`) and a fraction `spillover` by a wider kernel
     (`spillover_sigma`), so a neighbour's rim bleeds over the shared border;
   - segmentation error: the mask is drawn from jittered centres and radii, so
     it is off the true boundary by about `segmentation_error` px.
4. Counts: Poisson of `counts_scale` x signal plus a per-channel background,
   with a per-FOV gain, as uint16.

Generation is vectorised over pixels (scipy.ndimage, a KD-tree); a 256x256 FOV
with ~500 cells takes a fraction of a second.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from scipy import ndimage, spatial

from cellrep.data import _synthetic_panel as panel
from cellrep.data.store import Store, StoreWriter
from cellrep.errors import BadValue

_LLOYD_ITERATIONS = 4
_CANDIDATES = 6            # nearest centres that compete for a pixel
_MIN_AREA_FRACTION = 0.2   # of pi * cell_radius**2; smaller cells (FOV edge) are dropped


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """How to generate synthetic tissue. Lengths in pixels, signal in counts.

  The same field names under `config.data.synthetic` map onto it (`from_config`).
  """
  seed: int = 0
  n_fovs: int = 8
  fov_size: int = 256            # FOVs are fov_size x fov_size
  n_classes: int = 8             # the first n of _synthetic_panel.CLASSES
  imbalance: float = 1.0         # 0: equal class frequencies; 1: tissue-like (4:1); more: skewed
  cell_radius: float = 6.0       # px; lymphocytes 0.85x, macrophages 1.15x; cut by neighbours,
                                 # the median cell's area-equivalent diameter is ~1.75x this
  radius_sd: float = 0.12        # log-normal sigma of a cell's radius
  shape_sd: float = 0.06         # outline's 2- and 3-fold wobble, fraction of the radius
  gap_fraction: float = 0.05     # cells removed from the packing, leaving holes
  niche_strength: float = 2.0    # 0: classes independent of place; more: compartments cluster
  niche_scale: float = 5.0       # niche correlation length, in cell radii
  nucleus_fraction: float = 0.5  # nucleus radius / cell radius
  expression_sd: float = 0.6     # log-normal sigma of a cell's level of each marker
  psf_sigma: float = 0.7         # Gaussian point spread of every signal
  spillover: float = 0.5         # fraction of each signal spread by the wider kernel
  spillover_sigma: float = 2.0   # that kernel's sigma
  patch_prob: float = 0.6        # chance a cell carries a patch of a neighbour's membrane
                                 # (if one touching has a membrane marker its class lacks)
  patch_radius: float = 2.0
  patch_strength: float = 1.0    # patch signal / the neighbour's level, times U(0.5, 1.5)
  segmentation_error: float = 1.0  # sd of the mask's centre offset (px) and radius error
  counts_scale: float = 8.0      # expected counts per pixel of a level-1 cytoplasmic marker
  background: float = 0.2        # mean background counts per pixel
  fov_gain_sd: float = 0.1       # log-normal sigma of a per-FOV intensity gain

  def __post_init__(self):
    def need(ok, field, expected):
      if not ok:
        raise BadValue(field, f"got {getattr(self, field)!r}", expected)
    need(self.n_fovs >= 1, "n_fovs", ">= 1")
    need(self.fov_size >= 4 * self.cell_radius, "fov_size", ">= 4 x cell_radius")
    need(1 <= self.n_classes <= len(panel.CLASSES), "n_classes", f"1..{len(panel.CLASSES)}")
    need(self.cell_radius >= 2, "cell_radius", ">= 2 px")
    need(0 <= self.gap_fraction < 1, "gap_fraction", "in [0, 1)")
    need(0 < self.nucleus_fraction < 1, "nucleus_fraction", "in (0, 1)")
    need(0 <= self.spillover <= 1, "spillover", "in [0, 1]")
    need(0 <= self.patch_prob <= 1, "patch_prob", "in [0, 1]")
    for f in ("imbalance", "niche_strength", "niche_scale", "radius_sd", "shape_sd",
              "expression_sd", "psf_sigma", "spillover_sigma", "patch_radius",
              "patch_strength", "segmentation_error", "counts_scale", "background",
              "fov_gain_sd"):
      need(getattr(self, f) >= 0, f, ">= 0")

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(panel.CLASSES)[:self.n_classes]

  @property
  def channels(self) -> tuple[str, ...]:
    return panel.panel(self.classes)


def from_config(cfg: Mapping) -> SyntheticConfig:
  """A SyntheticConfig from a ConfigDict (or mapping) with a subset of its field names."""
  names = {f.name for f in dataclasses.fields(SyntheticConfig)}
  keys = list(cfg.keys())
  unknown = sorted(set(keys) - names)
  if unknown:
    raise BadValue(f"{unknown[0]}", "unknown field", f"one of {sorted(names)}")
  return SyntheticConfig(**{k: cfg[k] for k in keys})


@dataclasses.dataclass
class SyntheticTissue:
  """Generated FOVs and their ground truth.

  images: per FOV [K, H, W] uint16 Poisson counts, channel order `channels`.
  masks: per FOV [H, W] int32 segmentation (cell ids 1..n, 0 = background);
    off the true cell outlines by the segmentation error.
  labels: per FOV, cell id -> class name, for every id in the mask.
  localisation: class -> {marker: "nuclear" | "membrane" | "cytoplasmic"}.
  true_masks: per FOV [H, W] int32, the cells' true outlines, same ids.
  patches: per FOV, cell id -> id of the neighbour whose membrane patch it carries.
  """
  images: list[np.ndarray]
  masks: list[np.ndarray]
  labels: list[dict[int, str]]
  channels: tuple[str, ...]
  classes: tuple[str, ...]
  fovs: tuple[str, ...]
  localisation: dict[str, dict[str, str]]
  true_masks: list[np.ndarray]
  patches: list[dict[int, int]]


def generate(config: SyntheticConfig) -> SyntheticTissue:
  """Generates `config.n_fovs` FOVs. FOV i depends only on (seed, i), not on n_fovs."""
  classes, channels = config.classes, config.channels
  tables = _Tables.build(classes, channels, config.imbalance)
  fovs = [_generate_fov(config, tables, np.random.default_rng([config.seed, i]))
          for i in range(config.n_fovs)]
  localisation = {c: {m: loc for m, loc, *_ in panel.ALL_CELLS + panel.CLASSES[c]}
                  for c in classes}
  return SyntheticTissue(
      images=[f["image"] for f in fovs],
      masks=[f["mask"] for f in fovs],
      labels=[{int(i): classes[c] for i, c in f["classes"].items()} for f in fovs],
      channels=channels,
      classes=classes,
      fovs=tuple(f"synth_{i:03d}" for i in range(config.n_fovs)),
      localisation=localisation,
      true_masks=[f["true_mask"] for f in fovs],
      patches=[dict(f["patches"]) for f in fovs],
  )


def write_store(tissue: SyntheticTissue, path, chunk_size: int = 64,
                overwrite: bool = False) -> Store:
  """Writes the tissue as a cellrep store at `path` (uint16 images) and opens it."""
  shapes = [m.shape for m in tissue.masks]
  with StoreWriter(path, tissue.channels, tissue.fovs, shapes, dtype="uint16",
                   classes=tissue.classes, chunk_size=chunk_size, overwrite=overwrite) as w:
    for i, (image, mask, labels) in enumerate(zip(tissue.images, tissue.masks, tissue.labels)):
      w.write_fov(i, image, mask, labels)
    return w.commit()


@dataclasses.dataclass(frozen=True)
class _Tables:
  """Class definitions as arrays over [class, channel]."""
  level: np.ndarray      # float, 0 where the class lacks the marker
  loc: np.ndarray        # int index into panel.LOCALISATIONS, -1 where absent
  positive: np.ndarray   # fraction of the class's cells that express the marker
  frequency: np.ndarray  # [class], sums to 1
  size: np.ndarray       # [class], radius factor
  compartment: np.ndarray  # [class], index into panel.COMPARTMENTS

  @classmethod
  def build(cls, classes, channels, imbalance):
    n, k = len(classes), len(channels)
    level, loc, positive = np.zeros((n, k)), np.full((n, k), -1), np.zeros((n, k))
    for c, name in enumerate(classes):
      for marker, where, lvl, frac in panel.ALL_CELLS + panel.CLASSES[name]:
        j = channels.index(marker)
        level[c, j], loc[c, j], positive[c, j] = lvl, panel.LOCALISATIONS.index(where), frac
    freq = np.array([panel.FREQUENCY[c] for c in classes]) ** imbalance
    size = np.array([panel.SIZE[c] for c in classes])
    compartment = np.array([panel.COMPARTMENTS.index(panel.COMPARTMENT[c]) for c in classes])
    return cls(level, loc, positive, freq / freq.sum(), size, compartment)


def _layout(cfg: SyntheticConfig, tables: _Tables, rng) -> dict:
  """Cell centres (FOV coordinates, may lie just outside), radii, outline wobble, classes."""
  size = cfg.fov_size
  margin = 2 * cfg.cell_radius  # lay out past the edges so FOV-edge cells are cut, not squeezed
  extent = size + 2 * margin
  n = max(int(round(extent ** 2 / (np.pi * cfg.cell_radius ** 2))), 2)
  centres = rng.uniform(0, extent, size=(n, 2))
  # Lloyd's centroids on a 2-px grid: a quarter of the work, same packing.
  grid_shape = (int(extent) // 2,) * 2
  grid = 2 * np.indices(grid_shape).reshape(2, -1).T + 1.0
  for _ in range(_LLOYD_ITERATIONS):
    nearest = spatial.cKDTree(centres).query(grid)[1]
    count = np.bincount(nearest, minlength=n)
    sums = np.stack([np.bincount(nearest, grid[:, d], minlength=n) for d in (0, 1)], 1)
    moved = count > 0
    centres[moved] = sums[moved] / count[moved, None]
  centres = centres[rng.random(n) >= cfg.gap_fraction] - margin
  n = len(centres)
  # Classes: Gumbel-max over log frequency plus each compartment's smooth random
  # field at the cell, so a compartment's classes gather where its field is high.
  fields = ndimage.gaussian_filter(rng.normal(size=(len(panel.COMPARTMENTS),) + grid_shape),
                                   (0,) + (cfg.niche_scale * cfg.cell_radius / 2,) * 2, mode="wrap")
  fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
  at = np.clip(((centres + margin) / 2).astype(int), 0, grid_shape[0] - 1)
  niche = fields[:, at[:, 0], at[:, 1]].T[:, tables.compartment]  # [cell, class]
  logits = np.log(tables.frequency) + cfg.niche_strength * niche
  cls = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
  radii = cfg.cell_radius * tables.size[cls] * rng.lognormal(0, cfg.radius_sd, n)
  wobble = np.concatenate([rng.normal(0, cfg.shape_sd, (n, 2)),
                           rng.uniform(0, 2 * np.pi, (n, 2))], 1)
  return dict(centres=centres, radii=radii, wobble=wobble, cls=cls)


def _rasterise(centres, radii, wobble, size: int) -> np.ndarray:
  """[size, size] int32: pixel -> 1 + index of its cell, 0 outside every cell.

  A pixel belongs to the cell of least power distance d^2 - r(theta)^2 among
  its nearest centres, if it lies within that cell's radius r(theta).
  """
  pix = np.indices((size, size)).reshape(2, -1).T + 0.5
  k = min(_CANDIDATES, len(centres))
  d, idx = spatial.cKDTree(centres).query(pix, k=k)
  d, idx = d.reshape(len(pix), k), idx.reshape(len(pix), k)
  delta = pix[:, None, :] - centres[idx]
  # cos(m theta - phase) from the unit vector, without trigonometry per pixel.
  sin, cos = np.moveaxis(delta / np.maximum(d, 1e-6)[..., None], -1, 0)
  a2, a3, p2, p3 = wobble.T
  c2, s2 = a2 * np.cos(p2), a2 * np.sin(p2)
  c3, s3 = a3 * np.cos(p3), a3 * np.sin(p3)
  wob = (c2[idx] * (cos ** 2 - sin ** 2) + s2[idx] * (2 * sin * cos)
         + c3[idx] * (4 * cos ** 3 - 3 * cos) + s3[idx] * (3 * sin - 4 * sin ** 3))
  r = radii[idx] * (1 + wob)
  power = d ** 2 - r ** 2
  best = np.argmin(power, axis=1)
  rows = np.arange(len(pix))
  ids = np.where(power[rows, best] < 0, idx[rows, best] + 1, 0)
  return ids.reshape(size, size).astype(np.int32)


def _touching_pairs(ids: np.ndarray) -> np.ndarray:
  """[P, 2] ordered pairs (a, b) of cell ids sharing a border, both orders."""
  a = np.concatenate([ids[:, :-1].ravel(), ids[:-1, :].ravel()])
  b = np.concatenate([ids[:, 1:].ravel(), ids[1:, :].ravel()])
  keep = (a != b) & (a > 0) & (b > 0)
  pairs = np.unique(np.stack([a[keep], b[keep]], 1), axis=0)
  return np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)


def _rim_distance(ids: np.ndarray) -> np.ndarray:
  """[H, W] distance (px) from each cell pixel to its cell's outline (0 on the outline)."""
  edge = np.zeros(ids.shape, bool)
  edge[:-1] |= ids[:-1] != ids[1:]
  edge[1:] |= ids[1:] != ids[:-1]
  edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
  edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
  return ndimage.distance_transform_edt(~(edge & (ids > 0)))


def _generate_fov(cfg: SyntheticConfig, tables: _Tables, rng) -> dict:
  size = cfg.fov_size
  cell = _layout(cfg, tables, rng)
  centres, radii, wobble, cls = cell["centres"], cell["radii"], cell["wobble"], cell["cls"]
  n = len(centres)
  true_ids = _rasterise(centres, radii, wobble, size)
  seg_ids = _rasterise(
      centres + rng.normal(0, cfg.segmentation_error, (n, 2)),
      radii + rng.normal(0, cfg.segmentation_error, n),
      wobble + np.concatenate([rng.normal(0, cfg.shape_sd / 2, (n, 2)), np.zeros((n, 2))], 1),
      size)
  # Cells mostly outside the FOV, or lost by the segmentation, are not cells of this FOV.
  min_area = _MIN_AREA_FRACTION * np.pi * cfg.cell_radius ** 2
  area = np.bincount(true_ids.ravel(), minlength=n + 1)
  seg_area = np.bincount(seg_ids.ravel(), minlength=n + 1)
  kept = (area >= min_area) & (seg_area >= min_area)
  kept[0] = False
  renumber = np.zeros(n + 1, np.int32)
  renumber[kept] = np.arange(1, kept.sum() + 1)
  true_ids, seg_ids = renumber[true_ids], renumber[seg_ids]
  old = np.nonzero(kept)[0] - 1  # new id - 1 -> layout index
  centres, radii, cls, n = centres[old], radii[old], cls[old], len(old)

  signal, donors = _signal(cfg, tables, rng, true_ids, centres, radii, cls)
  gain = rng.lognormal(0, cfg.fov_gain_sd)
  background = cfg.background * rng.lognormal(0, 0.3, (signal.shape[0], 1, 1))
  counts = rng.poisson(cfg.counts_scale * gain * signal + background)
  return dict(
      image=np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16),
      mask=seg_ids, true_mask=true_ids,
      classes=dict(zip(range(1, n + 1), cls.tolist())),
      patches=donors)


def _signal(cfg, tables, rng, ids, centres, radii, cls):
  """[K, H, W] float32 expected signal (level units) after spillover; {cell id: patch donor id}."""
  n, k = len(centres), tables.level.shape[1]
  inside = ids > 0
  pix = np.indices(ids.shape).transpose(1, 2, 0) + 0.5
  # Per-cell expression, row 0 = background.
  expressed = rng.random((n, k)) < tables.positive[cls]
  expr = np.zeros((n + 1, k))
  expr[1:] = expressed * tables.level[cls] * rng.lognormal(0, cfg.expression_sd, (n, k))
  loc = np.full((n + 1, k), -1)
  loc[1:] = np.where(expressed, tables.loc[cls], -1)
  # Where each compartment is: weights over pixels.
  rim = _rim_distance(ids)
  nucleus_centre = np.zeros((n + 1, 2))
  nucleus_centre[1:] = centres + rng.normal(0, 0.1, (n, 2)) * radii[:, None]
  nucleus_radius = np.zeros(n + 1)
  nucleus_radius[1:] = cfg.nucleus_fraction * radii
  nuclear = (inside & (rim >= 1.5)
             & (np.linalg.norm(pix - nucleus_centre[ids], axis=-1) < nucleus_radius[ids]))
  weights = {
      panel.NUCLEAR: nuclear.astype(float),
      panel.MEMBRANE: np.exp(-0.5 * (rim / 0.6) ** 2) * inside,
      panel.CYTOPLASMIC: (inside & ~nuclear).astype(float),
  }
  area = np.bincount(ids.ravel(), minlength=n + 1).astype(float)
  signal = np.zeros(ids.shape + (k,))
  for r, where in enumerate(panel.LOCALISATIONS):
    total = np.bincount(ids.ravel(), weights[where].ravel(), minlength=n + 1)
    # Spread the cell's mean level over this compartment: the mean stays the level.
    per_pixel = expr * (loc == r) * (area / np.maximum(total, 1e-6))[:, None]
    per_pixel[0] = 0
    signal += per_pixel[ids] * weights[where][..., None]

  donors = _patch_donors(cfg, rng, ids, cls, tables)
  if donors:
    cell_ids = np.array(list(donors))
    i, j = cell_ids - 1, np.array(list(donors.values())) - 1  # layout indices
    # The patch sits just inside this cell where the power-diagram border meets
    # the line to the donor's centre.
    u = centres[j] - centres[i]
    dist = np.linalg.norm(u, axis=1)
    border = (dist ** 2 + radii[i] ** 2 - radii[j] ** 2) / (2 * dist)
    border = np.clip(border - 0.5, 0.3 * radii[i], radii[i])
    centre = np.zeros((n + 1, 2))
    centre[cell_ids] = centres[i] + u / dist[:, None] * border[:, None]
    has = np.zeros(n + 1, bool)
    has[cell_ids] = True
    in_patch = has[ids] & (np.linalg.norm(pix - centre[ids], axis=-1) < cfg.patch_radius)
    patch_area = np.bincount(ids[in_patch], minlength=n + 1).astype(float)
    # A piece of the donor's membrane: all its membrane markers, with a total
    # signal of `strength` x the donor's level spread over this cell.
    donor_membrane = expr[j + 1] * (loc[j + 1] == panel.LOCALISATIONS.index(panel.MEMBRANE))
    strength = cfg.patch_strength * rng.uniform(0.5, 1.5, len(cell_ids))
    value = np.zeros((n + 1, k))
    value[cell_ids] = (donor_membrane * (strength * area[cell_ids]
                                         / np.maximum(patch_area[cell_ids], 1))[:, None])
    signal += value[ids] * in_patch[..., None]

  signal = signal.transpose(2, 0, 1)
  near = ndimage.gaussian_filter(signal, (0, cfg.psf_sigma, cfg.psf_sigma))
  far = ndimage.gaussian_filter(signal, (0, cfg.spillover_sigma, cfg.spillover_sigma))
  out = ((1 - cfg.spillover) * near + cfg.spillover * far).astype(np.float32)
  return out, donors


def _patch_donors(cfg, rng, ids, cls, tables) -> dict[int, int]:
  """{cell id: donor cell id} for the cells that carry a piece of a neighbour's membrane.

  The donor touches the cell and has a membrane marker the cell's class lacks,
  so the patch is foreign signal.
  """
  pairs = _touching_pairs(ids)
  if not len(pairs) or cfg.patch_prob == 0:
    return {}
  carries = rng.random(len(cls) + 1) < cfg.patch_prob
  pairs = pairs[carries[pairs[:, 0]]]
  cls1 = np.concatenate([[0], cls])
  membrane = tables.loc == panel.LOCALISATIONS.index(panel.MEMBRANE)
  foreign = (membrane[cls1[pairs[:, 1]]] & (tables.level[cls1[pairs[:, 0]]] == 0)).any(1)
  pairs = pairs[foreign]
  if not len(pairs):
    return {}
  # One random donor per carrying cell.
  pairs = pairs[np.lexsort((rng.random(len(pairs)), pairs[:, 0]))]
  first = np.unique(pairs[:, 0], return_index=True)[1]
  return {int(a): int(b) for a, b in pairs[first]}
