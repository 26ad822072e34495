"""One synthetic Cell Painting site's stains, before light and camera (step 3 of
`cellrep.data.synthetic_cellpainting`).

`render_site` places the nuclei, draws each cell from its `PARAMETERS` (baseline + sd x
(shift + its own N(0, 1))) and returns, per channel of `CHANNELS`, the stain at unit
brightness, blurred by the point spread: DNA, a textured elliptical nucleus with
nucleolar holes; RNA, nucleoli, nucleoplasm and cytoplasm; ER, reticular cytoplasm fading
away from the nucleus; AGP, bright cell borders and stress fibres; Mito, puncta near the
nucleus.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
  from cellrep.data.synthetic_cellpainting import CellPaintingConfig

CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")

# A cell's phenotype: value = baseline + sd x z (z ~ N(0, 1) among DMSO cells).
PARAMETERS = (
    # name                baseline  sd    meaning
    ("nucleus_size",        0.0,   0.12),  # log nuclear radius / nucleus_radius
    ("nucleus_elongation",  0.2,   0.10),  # log of the nucleus's axis ratio
    ("cytoplasm_extent",    0.0,   0.12),  # log cell radius / cell_radius
    ("DNA_intensity",       0.0,   0.20),  # log brightness of each channel's stain
    ("RNA_intensity",       0.0,   0.20),
    ("ER_intensity",        0.0,   0.20),
    ("AGP_intensity",       0.0,   0.20),
    ("Mito_intensity",      0.0,   0.20),
    ("chromatin_texture",   0.25,  0.08),  # DNA granularity, relative amplitude
    ("nucleoli",            1.1,   0.30),  # log mean number of nucleoli
    ("ER_spread",          -1.0,   0.25),  # log ER decay length / cytoplasm width
    ("actin_fibres",        0.35,  0.12),  # AGP stress-fibre amplitude
    ("mito_density",        0.4,   0.30),  # log puncta per 100 px^2 of cytoplasm
)
_BASELINE = np.array([p[1] for p in PARAMETERS])
_SD = np.array([p[2] for p in PARAMETERS])
_P = {name: i for i, (name, *_) in enumerate(PARAMETERS)}

_PSF_SIGMA = 0.8        # px
_MIN_SPACING = 1.6      # nuclei centres at least this many nucleus radii apart (when they fit)


def _nuclei_centres(cfg: CellPaintingConfig, rng) -> tuple[np.ndarray, int]:
  """([n, 2] (x, y) centres, m): the first m inside the image (listed), the rest in a
  margin of one cell radius around it (drawn, cut by the border, not listed)."""
  s, margin = cfg.image_size, cfg.cell_radius
  n_in = max(1, int(rng.poisson(cfg.cells_per_site)))
  ring_area = (s + 2 * margin) ** 2 - s ** 2
  n_out = int(rng.poisson(cfg.cells_per_site * ring_area / s ** 2))
  spacing = _MIN_SPACING * cfg.nucleus_radius
  inside = rng.uniform(1.0, s - 1.0, size=(20 * n_in + 20, 2))
  outside = rng.uniform(-margin, s + margin, size=(40 * n_out + 40, 2))
  outside = outside[((outside < 0) | (outside >= s)).any(axis=1)]
  kept = []

  def take(candidates, count):
    got = 0
    for c in candidates:
      if got == count:
        break
      if not kept or np.min(np.sum((np.asarray(kept) - c) ** 2, axis=1)) >= spacing ** 2:
        kept.append(c)
        got += 1
    return got

  got = take(inside, n_in)
  if got < n_in:  # crowded: the rest wherever they fall, so the site has its cells
    kept.extend(rng.uniform(1.0, s - 1.0, size=(n_in - got, 2)))
  m = len(kept)
  take(outside, n_out)
  return np.asarray(kept, np.float64).reshape(-1, 2), m


def render_site(cfg, rng, shift):
  """([channel, H, W] float32 stain, [m, 2] (x, y) of the listed nuclei) of a site whose
  cells' z is shifted by `shift` [len(PARAMETERS)] (the treatment and the well)."""
  s = cfg.image_size
  xy, m = _nuclei_centres(cfg, rng)
  n = len(xy)
  v = _BASELINE + _SD * (shift + rng.normal(size=(n, len(PARAMETERS))))  # [cell, parameter]
  rn = cfg.nucleus_radius * np.exp(v[:, _P["nucleus_size"]])
  aspect = np.exp(v[:, _P["nucleus_elongation"]])
  ax, bx = rn * np.sqrt(aspect), rn / np.sqrt(aspect)  # nuclear half-axes
  rc = np.maximum(cfg.cell_radius * np.exp(v[:, _P["cytoplasm_extent"]]), 1.3 * rn)
  theta = rng.uniform(0, np.pi, n)           # nucleus orientation
  fibre = rng.uniform(0, np.pi, n)           # stress-fibre orientation
  fibre_phase = rng.uniform(0, 2 * np.pi, n)
  wobble = np.concatenate([rng.normal(0, 0.12, (n, 2)), rng.uniform(0, 2 * np.pi, (n, 2))], 1)
  # The cell's centre is off its nucleus's, the nucleus still inside the cell.
  slack = np.maximum(0.5 * (rc - np.maximum(ax, bx)), 0)[:, None]
  cxy = xy + np.clip(rng.normal(0, 0.5, (n, 2)) * slack, -slack, slack)

  # Ownership: each pixel goes to the cell of least normalised distance (nucleus first).
  best = np.full((s, s), np.inf, np.float32)
  owner = np.full((s, s), -1, np.int32)
  e_map = np.full((s, s), np.inf, np.float32)   # owner's normalised nuclear distance
  q_map = np.full((s, s), np.inf, np.float32)   # owner's normalised cell distance
  phase = np.zeros((s, s), np.float32)          # owner's stress-fibre phase
  centre = np.arange(s, dtype=np.float32) + 0.5
  period = max(4.0, 0.6 * cfg.nucleus_radius)
  # Python floats per cell, so the float32 pixel arithmetic stays float32.
  per = zip(xy.tolist(), cxy.tolist(), rc.tolist(), rn.tolist(), ax.tolist(), bx.tolist(),
            theta.tolist(), fibre.tolist(), fibre_phase.tolist(), wobble.tolist())
  for i, ((x, y), (cx, cy), rc_i, rn_i, a_i, b_i, t_i, f_i, p_i, (w2, w3, p2, p3)) \
      in enumerate(per):
    reach = rc_i * (1 + abs(w2) + abs(w3)) + 1
    x0, x1 = max(0, int(cx - reach)), min(s, int(cx + reach) + 2)
    y0, y1 = max(0, int(cy - reach)), min(s, int(cy + reach) + 2)
    if x0 >= x1 or y0 >= y1:
      continue
    ox, oy = (centre[x0:x1] - cx)[None, :], (centre[y0:y1] - cy)[:, None]
    angle = np.arctan2(oy, ox)
    outline = rc_i * (1 + w2 * np.cos(2 * angle - p2) + w3 * np.cos(3 * angle - p3))
    q = np.hypot(ox, oy) / outline
    dx, dy = (centre[x0:x1] - x)[None, :], (centre[y0:y1] - y)[:, None]
    cos, sin = math.cos(t_i), math.sin(t_i)
    e = np.sqrt(((dx * cos + dy * sin) / a_i) ** 2 + ((dy * cos - dx * sin) / b_i) ** 2)
    score = np.minimum(q, e * (rn_i / rc_i))
    box = (slice(y0, y1), slice(x0, x1))
    win = score < best[box]
    best[box] = np.where(win, score, best[box])
    owner[box] = np.where(win, i, owner[box])
    e_map[box] = np.where(win, e, e_map[box])
    q_map[box] = np.where(win, q, q_map[box])
    stripes = (2 * np.pi / period) * (dx * math.cos(f_i) + dy * math.sin(f_i)) + p_i
    phase[box] = np.where(win, stripes, phase[box])

  # Per-pixel values of the owning cell (index 0 = no cell).
  def per_cell(values, empty=0.0):
    return np.concatenate([[empty], values]).astype(np.float32)[owner + 1]

  rn_px, rc_px = per_cell(rn, 1.0), per_cell(rc, 1.0)
  nucleus = np.clip((1 - e_map) * rn_px + 0.5, 0, 1)
  cell = np.maximum(np.clip((1 - q_map) * rc_px + 0.5, 0, 1), nucleus)
  owner = np.where(cell > 0, owner, -1)  # the pixels near a cell but outside it: no one's
  cytoplasm = cell * (1 - nucleus)
  from_nucleus = np.maximum(e_map - 1, 0) * rn_px   # px past the nuclear edge (about)
  width = np.maximum(rc_px - rn_px, 1.0)
  edges = np.zeros((s, s), bool)  # where the owner changes: cell borders, between cells too
  edges[:-1] |= owner[:-1] != owner[1:]
  edges[1:] |= owner[1:] != owner[:-1]
  edges[:, :-1] |= owner[:, :-1] != owner[:, 1:]
  edges[:, 1:] |= owner[:, 1:] != owner[:, :-1]
  edges |= (cell > 0) & (cell < 1)
  rim = ndimage.distance_transform_edt(~edges).astype(np.float32)
  fine = _texture(rng, s, 1.0)
  mid = _texture(rng, s, 2.0)

  # Nucleoli inside the nucleus (RNA bright, DNA dim); mitochondria in the cytoplasm.
  counts = rng.poisson(np.exp(v[:, _P["nucleoli"]]))
  cell_of = np.repeat(np.arange(n), counts)
  r = 0.55 * np.sqrt(rng.uniform(size=len(cell_of)))
  a = rng.uniform(0, 2 * np.pi, len(cell_of))
  u, w = ax[cell_of] * r * np.cos(a), bx[cell_of] * r * np.sin(a)
  t = theta[cell_of]
  nucleoli = _spots(s, xy[cell_of, 0] + u * np.cos(t) - w * np.sin(t),
                    xy[cell_of, 1] + u * np.sin(t) + w * np.cos(t),
                    None, owner, cell_of, 0.14 * cfg.nucleus_radius)
  area = np.pi * (rc ** 2 - ax * bx)
  counts = rng.poisson(np.exp(v[:, _P["mito_density"]]) * area / 100)
  cell_of = np.repeat(np.arange(n), counts)
  inner = 1.1 * np.maximum(ax, bx)[cell_of]
  r = inner + rng.uniform(size=len(cell_of)) ** 1.7 * np.maximum(1.2 * rc[cell_of] - inner, 0)
  a = rng.uniform(0, 2 * np.pi, len(cell_of))
  mito = _spots(s, xy[cell_of, 0] + r * np.cos(a), xy[cell_of, 1] + r * np.sin(a),
                e_map, owner, cell_of, 0.9)

  brightness = np.exp(v[:, [_P[f"{c}_intensity"] for c in CHANNELS]])  # [cell, channel]
  granularity = per_cell(np.clip(v[:, _P["chromatin_texture"]], 0, 0.8))
  er_length = per_cell(np.exp(v[:, _P["ER_spread"]]), 1.0) * width
  fibres = per_cell(np.clip(v[:, _P["actin_fibres"]], 0, 1))
  planes = np.stack([
      nucleus * np.clip(1 + granularity * fine, 0.1, None) * (1 - 0.5 * nucleoli),
      0.45 * cytoplasm * (0.7 + 0.3 * np.exp(-from_nucleus / (0.5 * width)))
      + 0.2 * nucleus + 0.9 * nucleoli * nucleus,
      cytoplasm * (0.2 + 0.8 * np.exp(-from_nucleus / er_length)) * np.clip(1 + 0.4 * mid, 0, None)
      + 0.1 * nucleus,
      cell * (0.15 + 0.85 * np.exp(-0.5 * (rim / 1.2) ** 2)
              + fibres * ((1 + np.cos(phase)) / 2) ** 4 * np.clip(mid, 0, None)),
      cytoplasm * (0.1 + 0.15 * np.clip(fine, 0, None) + 0.8 * mito),
  ])
  for k in range(len(CHANNELS)):
    planes[k] *= per_cell(brightness[:, k])
  signal = ndimage.gaussian_filter(planes, (0, _PSF_SIGMA, _PSF_SIGMA))
  return signal, xy[:m]


def _texture(rng, size: int, sigma: float) -> np.ndarray:
  """[size, size] float32 smooth noise, mean 0, sd 1."""
  t = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), sigma)
  return (t - t.mean()) / (t.std() + 1e-6)


def _spots(size: int, x, y, e_map, owner, cell_of, sigma: float) -> np.ndarray:
  """[size, size] float32 in [0, 1): Gaussian spots (peak ~1, saturating where they
  overlap) at (x, y) that fall in their own cell (and, with `e_map`, outside its nucleus)."""
  ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
  ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
  ix, iy, cell_of = ix[ok], iy[ok], cell_of[ok]
  ok = owner[iy, ix] == cell_of
  if e_map is not None:
    ok &= e_map[iy, ix] >= 1
  impulses = np.zeros((size, size), np.float32)
  np.add.at(impulses, (iy[ok], ix[ok]), 1.0)
  density = ndimage.gaussian_filter(impulses, sigma) * (2 * np.pi * sigma ** 2)
  return 1 - np.exp(-1.5 * density)
