"""The simulations of CellSighter's paper on real crops: can a foreign marker fool a classifier?

Each simulation takes crops of cells of class A from a store, rewrites two
marker channels inside the cell, and asks the CNN ensemble and the XGBoost
baseline (on the expression features of the rewritten crop) what the cell is.
"Fooled" means called class B, the class that marker B defines.

  spillover patch   remove the cell's own signal of markers A and B; re-add A as
                    membrane signal (Poisson counts within `membrane_width` px
                    of the cell's outline); add B as a disc (`patch_radius`)
                    centred at a random point of the outline moved by a distance
                    d along the outward normal (d < 0: into the cell), as when a
                    neighbour's membrane spills over. One row per d.
  membrane fraction as above, but B is added on a contiguous arc covering 100%,
                    50%, 25%, 12.5% of the membrane ring, its total signal held
                    constant: the same mean in the mask, so the same expression
                    features, whatever the fraction.
  moving patch      the B disc moved from the cell's centroid outward (in units
                    of the cell radius) in a random direction; reported against
                    its overlap with the cell mask.
  control           A re-added on the membrane, no B: how often each model
                    still calls the rewritten cell A.

Signal levels are Poisson rates. `lambda_a` (per membrane pixel) and
`lambda_b` (per patch pixel) set them directly; 0 means the typical cell: the
median total count of marker A over cells of class A (mean in mask x area) is
spread over this cell's membrane ring, and that of B over cells of class B over
the patch (or arc). `blur_sigma` > 0 blurs the added rates by a Gaussian point
spread before drawing counts. Crops are rewritten on the host in chunks of one
setting at a time, so memory stays at `cells x repeats` crops.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import ndimage  # noqa: E402

from cellrep.data.crops import CELL_CHANNEL  # noqa: E402
from cellrep.errors import BadValue  # noqa: E402
from cellrep.eval.report import Report  # noqa: E402

EXPERIMENTS = ("control", "spillover_patch", "membrane_fraction", "moving_patch")


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """Which cells and markers, how strong, where. Distances in pixels unless stated."""
  class_a: str
  marker_a: str
  class_b: str
  marker_b: str
  lambda_a: float = 0.0           # counts per membrane pixel; 0 = class A's typical total
  lambda_b: float = 0.0           # counts per patch pixel; 0 = class B's typical total
  membrane_width: float = 2.0     # membrane ring: cell pixels within this of the outline
  patch_radius: float = 2.0
  blur_sigma: float = 0.0         # point spread of the added signal; 0 = none
  border_distances: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
  fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
  centre_distances: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # cell radii
  cells: int = 200                # cells of class A used (at most)
  repeats: int = 2                # random draws per cell and setting
  seed: int = 0

  def __post_init__(self):
    for name in ("border_distances", "fractions", "centre_distances"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if not all(0 < f <= 1 for f in self.fractions):
      raise BadValue("fractions", f"{self.fractions}", "fractions in (0, 1]")
    for name in ("membrane_width", "patch_radius"):
      if getattr(self, name) <= 0:
        raise BadValue(name, f"{getattr(self, name)}", "a positive distance in pixels")
    if self.cells < 1 or self.repeats < 1:
      raise BadValue("cells", f"cells {self.cells}, repeats {self.repeats}", "≥ 1 each")


def check_names(cfg: SimulationConfig, classes: Sequence[str], channels: Sequence[str]) -> None:
  for key, name, among in (("class_a", cfg.class_a, classes), ("class_b", cfg.class_b, classes),
                           ("marker_a", cfg.marker_a, channels), ("marker_b", cfg.marker_b, channels)):
    if name not in among:
      raise BadValue(key, f"{name!r} is not known", f"one of {list(among)}")


# ---------------------------------------------------------------- geometry and rewriting


@dataclasses.dataclass
class _Cell:
  """A crop's centre cell: mask [S, S] bool, outline and membrane pixels, centroid, radius (px)."""
  mask: np.ndarray
  outline: np.ndarray    # [P, 2] (y, x) of cell pixels touching the outside
  membrane: np.ndarray   # [S, S] bool
  centre: np.ndarray     # (y, x)
  radius: float

  @classmethod
  def of(cls, crop: np.ndarray, membrane_width: float) -> "_Cell":
    mask = crop[CELL_CHANNEL] > 0.5
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # px to the outside
    yy, xx = np.nonzero(mask)
    return cls(mask, np.argwhere(mask & (depth <= 1.0)), mask & (depth <= membrane_width),
               np.array([yy.mean(), xx.mean()]), float(np.sqrt(mask.sum() / np.pi)))


def _disc(shape, centre, radius: float) -> np.ndarray:
  yy, xx = np.indices(shape)
  return np.hypot(yy - centre[0], xx - centre[1]) <= radius


def _arc(cell: _Cell, fraction: float, start: float) -> np.ndarray:
  """The membrane pixels whose angle about the centroid lies in [start, start + 2 pi fraction)."""
  yy, xx = np.nonzero(cell.membrane)
  angle = np.arctan2(yy - cell.centre[0], xx - cell.centre[1])
  keep = np.mod(angle - start, 2 * np.pi) < 2 * np.pi * fraction
  out = np.zeros_like(cell.membrane)
  out[yy[keep], xx[keep]] = True
  if not out.any():  # a tiny arc on a tiny cell: at least one pixel
    out[yy[0], xx[0]] = True
  return out


class _Rewriter:
  """Rewrites markers A and B of one cell's crop; the same typical totals for every cell."""

  def __init__(self, cfg: SimulationConfig, a: int, b: int, total_a: float, total_b: float):
    self.cfg, self.a, self.b = cfg, a, b
    self.total_a, self.total_b = total_a, total_b

  def base(self, crop: np.ndarray, cell: _Cell, rng) -> np.ndarray:
    """The crop with the cell's own A and B removed and A re-added on its membrane."""
    out = crop.copy()
    out[self.a][cell.mask] = 0
    out[self.b][cell.mask] = 0
    ring = cell.membrane.sum()
    rate = self.cfg.lambda_a if self.cfg.lambda_a > 0 else self.total_a / max(ring, 1)
    self.add(out, self.a, cell.membrane * rate, rng)
    return out

  def add_b(self, crop: np.ndarray, where: np.ndarray, rng, ring: int | None = None) -> None:
    """Adds B on the pixels `where`: lambda_b per pixel (per ring pixel, spread, for an arc),
    or class B's typical total spread over them."""
    n = max(int(where.sum()), 1)
    if self.cfg.lambda_b > 0:
      total = self.cfg.lambda_b * (ring if ring is not None else n)
    else:
      total = self.total_b
    self.add(crop, self.b, where * (total / n), rng)

  def add(self, crop: np.ndarray, channel: int, rate: np.ndarray, rng) -> None:
    if self.cfg.blur_sigma > 0:
      rate = ndimage.gaussian_filter(rate.astype(np.float64), self.cfg.blur_sigma)
    crop[channel] += rng.poisson(rate).astype(np.float32)


def _settings(cfg: SimulationConfig) -> list[tuple[str, float]]:
  return ([("control", 0.0)] + [("spillover_patch", d) for d in cfg.border_distances]
          + [("membrane_fraction", f) for f in cfg.fractions]
          + [("moving_patch", t) for t in cfg.centre_distances])


def _where_b(experiment: str, value: float, cell: _Cell, shape, cfg: SimulationConfig,
             rng) -> np.ndarray | None:
  """The pixels that receive marker B in one draw of a setting (None for the control)."""
  if experiment == "spillover_patch":
    point = cell.outline[rng.integers(len(cell.outline))].astype(np.float64)
    normal = point - cell.centre
    normal /= max(np.linalg.norm(normal), 1e-6)
    return _disc(shape, point + value * normal, cfg.patch_radius)
  if experiment == "moving_patch":
    angle = rng.uniform(0, 2 * np.pi)
    offset = value * cell.radius * np.array([np.sin(angle), np.cos(angle)])
    return _disc(shape, cell.centre + offset, cfg.patch_radius)
  if experiment == "membrane_fraction":
    return _arc(cell, value, rng.uniform(0, 2 * np.pi))
  return None


def rewrite(crops: np.ndarray, cfg: SimulationConfig, a: int, b: int, total_a: float,
            total_b: float) -> Iterator[tuple[str, float, np.ndarray, np.ndarray]]:
  """Yields (experiment, setting, rewritten crops [cells x repeats, C, S, S], patch overlap [...]).

  crops: [N, C, S, S] raw crops of class-A cells; a, b: marker channel indices;
  total_a, total_b: the typical total counts (`typical_total`) used when lambda is 0.
  Overlap is the fraction of B's pixels inside the cell mask (NaN for the control).
  Setting i draws from `default_rng([cfg.seed, i])`, so a setting's draws do not
  depend on which other settings run.
  """
  rw = _Rewriter(cfg, a, b, total_a, total_b)
  cells = [_Cell.of(c, cfg.membrane_width) for c in crops]
  for i, (experiment, value) in enumerate(_settings(cfg)):
    rng = np.random.default_rng([cfg.seed, i])
    out, overlap = [], []
    for _ in range(cfg.repeats):
      for crop, cell in zip(crops, cells):
        new = rw.base(crop, cell, rng)
        where = _where_b(experiment, value, cell, crops.shape[-2:], cfg, rng)
        if where is None:
          overlap.append(np.nan)
        else:
          ring = int(cell.membrane.sum()) if experiment == "membrane_fraction" else None
          rw.add_b(new, where, rng, ring)
          overlap.append(float((where & cell.mask).sum() / max(where.sum(), 1)))
        out.append(new)
    yield experiment, value, np.stack(out), np.asarray(overlap)


def typical_total(means: np.ndarray, area: np.ndarray, labels: np.ndarray, cls: int) -> float:
  """Median total count (mean in mask x area) of a marker over the cells of class `cls`."""
  rows = labels == cls
  if not rows.any():
    raise BadValue("lambda", f"no labelled cells of class {cls} to take a typical level from",
                   "training cells of the class, or an explicit level")
  return float(np.nanmedian(means[rows] * area[rows]))


# ---------------------------------------------------------------- scoring and report

Scorer = Callable[[np.ndarray], np.ndarray]  # crops [N, C, S, S] -> probabilities [N, classes]


def run(crops: np.ndarray, cfg: SimulationConfig, a: int, b: int, total_a: float, total_b: float,
        scorers: Mapping[str, Scorer], class_a: int, class_b: int) -> pd.DataFrame:
  """Every setting, scored by every model.

  Returns one row per (experiment, setting, model): cells, frac_b (called class B),
  frac_a (called class A), mean_p_b (mean probability of B), mean_confidence
  (mean max probability) and overlap (mean fraction of B's pixels in the cell).
  """
  rows = []
  for experiment, value, rewritten, overlap in rewrite(crops, cfg, a, b, total_a, total_b):
    for name, score in scorers.items():
      probs = score(rewritten)
      pred = probs.argmax(axis=1)
      rows.append({"experiment": experiment, "setting": value, "model": name,
                   "cells": len(pred), "frac_b": float(np.mean(pred == class_b)),
                   "frac_a": float(np.mean(pred == class_a)),
                   "mean_p_b": float(np.mean(probs[:, class_b])),
                   "mean_confidence": float(np.mean(probs.max(axis=1))),
                   "overlap": float(np.nanmean(overlap)) if np.isfinite(overlap).any() else np.nan})
  return pd.DataFrame(rows)


def fooled(table: pd.DataFrame, experiment: str, model: str, below: float = 1.0) -> float:
  """Mean fraction called class B over an experiment's settings (< `below` for membrane_fraction)."""
  rows = table[(table.experiment == experiment) & (table.model == model)]
  if experiment == "membrane_fraction":
    rows = rows[rows.setting < below]
  return float(rows.frac_b.mean())


def plot(table: pd.DataFrame, cfg: SimulationConfig):
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
  panels = (("spillover_patch", "setting", "patch centre from the outline (px, + outward)"),
            ("membrane_fraction", "setting", "fraction of the membrane carrying B"),
            ("moving_patch", "overlap", "fraction of the patch inside the cell"))
  for ax, (experiment, x, label) in zip(axes, panels):
    for model, rows in table[table.experiment == experiment].groupby("model", sort=False):
      ax.plot(rows[x], rows.frac_b, marker="o", ms=3, label=model)
    ax.set_xlabel(label)
    ax.set_title(experiment.replace("_", " "), fontsize=9)
  axes[0].set_ylabel(f"fraction called {cfg.class_b}")
  axes[1].set_xscale("log", base=2)
  axes[0].set_ylim(-0.02, 1.02)
  axes[0].legend(fontsize=8)
  return fig


def add_to_report(report: Report, table: pd.DataFrame, cfg: SimulationConfig) -> dict:
  """The table, the plot, and scalars sim/<experiment>_frac_b_<model> for every model."""
  report.heading("Simulations: a foreign marker on real crops")
  report.paragraph(
      f"{cfg.class_a} cells (marker {cfg.marker_a}) rewritten with marker {cfg.marker_b} of class "
      f"{cfg.class_b}; frac_b = fraction called {cfg.class_b}, frac_a = fraction still called "
      f"{cfg.class_a}. XGBoost scores the expression features of the rewritten crop. "
      f"{cfg.repeats} random draw(s) per cell and setting.")
  report.figure(plot(table, cfg), "simulations", f"Fraction called {cfg.class_b}: lower is less fooled.")
  report.table(table.set_index(["experiment", "setting", "model"]))
  scalars = {}
  for model in table.model.unique():
    key = model.lower().replace(" ", "_")
    scalars[f"sim/spillover_frac_b_{key}"] = fooled(table, "spillover_patch", model)
    scalars[f"sim/partial_membrane_frac_b_{key}"] = fooled(table, "membrane_fraction", model)
    scalars[f"sim/control_frac_a_{key}"] = float(
        table[(table.experiment == "control") & (table.model == model)].frac_a.mean())
  report.key_values(scalars)
  return scalars
