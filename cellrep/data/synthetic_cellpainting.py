"""Synthetic Cell Painting plates, written as a DeepProfiler project with known treatments.

The project is what `cellrep.data.deepprofiler_project.ingest_deepprofiler` reads:

  DIR/metadata/index.csv   one row per site: Metadata_Plate, Metadata_Well (A01..P24),
                           Metadata_Site (1..sites), DNA, RNA, ER, AGP, Mito (each the
                           image's path relative to DIR/images), Metadata_compound ("DMSO"
                           for controls), Metadata_moa ("control" for DMSO),
                           Metadata_control (True/False), Metadata_strength (0 for DMSO),
                           Metadata_row (1..16, A = 1), Metadata_col (1..24)
  DIR/images/{plate}/{well}_s{site}_{channel}.tiff   uint16 (or 16-bit .png)
  DIR/locations/{plate}/{well}-{site}-Nuclei.csv     Nuclei_Location_Center_X, _Y (px)
  DIR/metadata/synthetic_cellpainting.json  the config and each compound's MoA, strength and
                           phenotype shift (the ground truth; the ingester does not read it)

What a site is made of, in the order it is made:

1. Plate map. The same `wells` positions on every plate (all 384 in plate order, or the
   first `wells` of a seeded shuffle, so edge wells are among them); on each plate
   `controls_per_plate` DMSO wells and the compounds cycled over the others (each
   compound on every plate, with replicates where there is room), the arrangement
   shuffled per plate so that well position and treatment are not confounded.
2. Phenotype. A cell is a point in `PARAMETERS` (nucleus size and shape, cytoplasm
   extent, per-channel brightness, chromatin texture, nucleoli, ER spread, actin
   fibres, mitochondrial density), each its baseline + its cell-to-cell sd x z. Each
   MoA is a random unit direction in z; a compound shifts z by strength x `effect` x
   (its MoA's direction + `compound_spread` x its own random direction). A well adds a
   little biological noise (sd `_WELL_SD`); every cell its own N(0, 1).
   Compound strengths are graded evenly over `strength_range` across all compounds, each
   MoA's compounds spanning the range (with the default (0, 1) some are invisible).
3. Rendering (in `cellrep.data._cellpainting_render`). Nuclei at least ~1.6 nuclear
   radii apart, uniform over the site (some near its borders; cells centred just outside
   it are drawn but not listed); pixels belong to the cell of least normalised distance,
   so touching cells share a border. DNA: an elliptical nucleus with chromatin texture
   and nucleolar holes; RNA: nucleoli spots, dim nucleoplasm, cytoplasm; ER: cytoplasm
   decaying away from the nucleus, reticular texture; AGP: bright cell borders and
   oriented stress fibres; Mito: puncta concentrated near the nucleus. A point spread
   blurs every channel.
4. Batch effects, multiplicative on the light (not the camera offset): per plate and
   channel a gain and a background level (log-sd `plate_effect`); per well position
   row, column and edge gains (log-sd `well_effect`, edges the same way on every
   plate); per plate and channel a smooth illumination field (an off-centre vignette and
   a random quadratic) whose max/min ratio is exp(`illumination`).
5. Counts: camera offset + light, with shot noise of sd `noise` x sqrt(counts), as uint16.

Given its well's treatment, a site is made from (seed, plate, well, site) alone, and
written before the next is made (memory: a few images of one site). Rendering takes
~10 ms of one core for a 128 px site, ~30 ms for 256 px (NumPy; cells drawn in their
bounding boxes). The default project (4 x 384 x 4 sites of 256 px) is ~30,000
uncompressed TIFFs, ~4 GB, written in a few minutes; PNG takes longer (zlib).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

# CHANNELS (the stains) and PARAMETERS (a cell's phenotype: name, baseline, sd, meaning)
# are part of this module's API; they are defined beside the rendering that draws them.
from cellrep.data._cellpainting_render import CHANNELS, PARAMETERS, render_site
from cellrep.errors import BadValue

ROWS, COLUMNS = 16, 24
CONTROL, CONTROL_MOA = "DMSO", "control"
IMAGE_FORMATS = ("tiff", "png")
LOCATION_COLUMNS = ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y")
TRUTH_FILE = "synthetic_cellpainting.json"  # in DIR/metadata

# Counts of a cell's brightest compartment at unit brightness, per channel; the
# autofluorescence and medium background (lit like the cells); the camera offset (not).
_PEAK = np.array([2500.0, 1500.0, 1400.0, 1200.0, 1800.0])
_BACKGROUND = np.array([120.0, 180.0, 200.0, 160.0, 140.0])
_CAMERA_OFFSET = 100.0
_WELL_SD = 0.2          # biological well-to-well noise of z (replicates differ a little)


@dataclasses.dataclass(frozen=True)
class CellPaintingConfig:
  """How to generate a Cell Painting screen. Lengths in pixels, light in camera counts.

  The same field names under a config (a mapping) map onto it (`from_config`).
  """
  plates: int = 4
  wells: int = 384              # per plate; < 384: the first N of a seeded shuffle of the 16x24
  sites: int = 4                # per well
  image_size: int = 256         # sites are image_size x image_size
  cells_per_site: float = 12.0  # Poisson mean of the nuclei listed per site (at least 1)
  nucleus_radius: float = 8.0   # px, a typical nucleus
  cell_radius: float = 22.0     # px, a typical cell (cut where cells touch)
  moas: int = 8
  compounds_per_moa: int = 4
  controls_per_plate: int = 32  # DMSO wells on every plate; the other wells get compounds
  strength_range: tuple[float, float] = (0.0, 1.0)  # compound strengths, graded evenly
  effect: float = 3.0           # |z shift| of a strength-1 compound, in cell-to-cell sds
  compound_spread: float = 0.3  # size of a compound's own direction next to its MoA's
  plate_effect: float = 0.3     # log-sd of per-plate, per-channel gains and backgrounds
  well_effect: float = 0.15     # log-sd of row, column and edge gains
  illumination: float = 0.6     # log of the illumination field's max/min (0.6: 1.8x)
  noise: float = 1.0            # shot noise: pixel sd = noise x sqrt(counts)
  seed: int = 0
  image_format: str = "tiff"    # or "png" (16-bit)

  def __post_init__(self):
    def need(ok, field, expected):
      if not ok:
        raise BadValue(field, f"got {getattr(self, field)!r}", expected)

    def integer(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def number(v):
      return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
          and math.isfinite(v)

    for f in ("plates", "wells", "sites", "image_size", "moas", "compounds_per_moa",
              "controls_per_plate", "seed"):
      need(integer(getattr(self, f)), f, "an integer")
    for f in ("cells_per_site", "nucleus_radius", "cell_radius", "effect", "compound_spread",
              "plate_effect", "well_effect", "illumination", "noise"):
      need(number(getattr(self, f)), f, "a finite number")
    need(self.plates >= 1, "plates", ">= 1")
    need(1 <= self.wells <= ROWS * COLUMNS, "wells", f"1..{ROWS * COLUMNS} (a 384-well plate)")
    need(self.sites >= 1, "sites", ">= 1")
    need(self.cells_per_site > 0, "cells_per_site", "> 0")
    need(self.nucleus_radius >= 2, "nucleus_radius", ">= 2 px")
    need(self.cell_radius >= 1.5 * self.nucleus_radius, "cell_radius", ">= 1.5 x nucleus_radius")
    need(self.image_size >= max(32, 2 * self.cell_radius), "image_size",
         ">= 32 px and >= 2 x cell_radius")
    need(self.moas >= 1, "moas", ">= 1")
    need(self.compounds_per_moa >= 1, "compounds_per_moa", ">= 1")
    need(self.controls_per_plate >= 1, "controls_per_plate", ">= 1 (DMSO on every plate)")
    need(self.controls_per_plate + self.compounds <= self.wells, "controls_per_plate",
         f"controls + moas x compounds_per_moa ({self.compounds}) <= wells ({self.wells}), "
         "so that every compound is on every plate")
    r = self.strength_range
    need(isinstance(r, (tuple, list)) and len(r) == 2 and all(number(v) for v in r)
         and 0 <= r[0] <= r[1], "strength_range", "(low, high) with 0 <= low <= high")
    for f in ("effect", "compound_spread", "plate_effect", "well_effect", "illumination", "noise"):
      need(getattr(self, f) >= 0, f, ">= 0")
    need(self.seed >= 0, "seed", ">= 0")
    need(self.image_format in IMAGE_FORMATS, "image_format", f"one of {IMAGE_FORMATS}")

  @property
  def compounds(self) -> int:
    return self.moas * self.compounds_per_moa


def from_config(cfg: Mapping) -> CellPaintingConfig:
  """A CellPaintingConfig from a ConfigDict (or mapping) with a subset of its field names."""
  names = {f.name for f in dataclasses.fields(CellPaintingConfig)}
  keys = list(cfg.keys())
  unknown = sorted(set(keys) - names)
  if unknown:
    raise BadValue(f"{unknown[0]}", "unknown field", f"one of {sorted(names)}")
  values = {k: cfg[k] for k in keys}
  if isinstance(values.get("strength_range"), list):
    values["strength_range"] = tuple(values["strength_range"])
  return CellPaintingConfig(**values)


def write_project(directory, cfg: CellPaintingConfig = CellPaintingConfig(), *,
                  overwrite: bool = False) -> dict:
  """Writes the project (module docstring) under `directory`; returns a summary.

  metadata/synthetic_cellpainting.json is written first and index.csv last (each under a
  temporary name renamed into place), so a project whose writing stopped has no index
  and cannot be ingested by mistake. A project this function wrote before (it has the
  json) is replaced whole, images and locations included; any other project (an
  index.csv without the json) is refused unless `overwrite`, which removes only its
  index.csv (files of the same names are then replaced as they are written).

  Summary: directory, plates (names), wells (per plate), sites, cells (nuclei listed),
  channels, compounds ({name: {moa, strength, shift}}, shift the z shift per
  `PARAMETERS`), moas (names), parameters, seconds.
  """
  start = time.perf_counter()
  root = pathlib.Path(directory)
  index_path = root / "metadata" / "index.csv"
  truth_path = root / "metadata" / TRUTH_FILE
  if truth_path.exists():  # ours, perhaps half written: replaced whole
    index_path.unlink(missing_ok=True)
    truth_path.unlink()
    for sub in ("images", "locations"):
      shutil.rmtree(root / sub, ignore_errors=True)
  elif index_path.exists():
    if not overwrite:
      raise BadValue("directory", f"{root} already holds a project (metadata/index.csv)",
                     "a folder without one, or overwrite=True")
    index_path.unlink()
  compounds = _compounds(cfg)
  truth = {"config": dataclasses.asdict(cfg),
           "parameters": [name for name, *_ in PARAMETERS],
           "compounds": {name: {"moa": c["moa"], "strength": c["strength"],
                                "shift": c["z"].tolist()} for name, c in compounds.items()}}
  truth_path.parent.mkdir(parents=True, exist_ok=True)
  _replace(truth_path, lambda tmp: tmp.write_text(json.dumps(truth, indent=1, sort_keys=True)))
  positions = _well_positions(cfg)
  edge_sign = np.random.default_rng([cfg.seed, 1]).normal(size=len(CHANNELS))
  suffix = "tiff" if cfg.image_format == "tiff" else "png"
  rows, n_cells = [], 0
  for p in range(cfg.plates):
    plate = f"P{p + 1:02d}"
    (root / "images" / plate).mkdir(parents=True, exist_ok=True)
    (root / "locations" / plate).mkdir(parents=True, exist_ok=True)
    batch = _plate_batch(cfg, p, edge_sign)
    treatments = _plate_map(cfg, p)
    for w, (row, col) in enumerate(positions):
      well = f"{chr(ord('A') + row)}{col + 1:02d}"
      treatment = treatments[w]
      cpd = compounds[treatment] if treatment is not None else None
      well_rng = np.random.default_rng([cfg.seed, 4, p, row, col])
      shift = (cpd["z"] if cpd else 0.0) + _WELL_SD * well_rng.normal(size=len(PARAMETERS))
      light = batch["gain"] * batch["well_gain"][row, col]  # [channel]
      for s in range(1, cfg.sites + 1):
        rng = np.random.default_rng([cfg.seed, 5, p, row, col, s])
        signal, xy = render_site(cfg, rng, shift)
        image = _expose(cfg, rng, signal, light, batch["background"], batch["field"])
        record = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": s}
        for k, ch in enumerate(CHANNELS):
          rel = f"{plate}/{well}_s{s}_{ch}.{suffix}"
          _write_image(root / "images" / rel, image[k], cfg.image_format)
          record[ch] = rel
        pd.DataFrame({LOCATION_COLUMNS[0]: np.round(xy[:, 0], 2),
                      LOCATION_COLUMNS[1]: np.round(xy[:, 1], 2)}).to_csv(
                          root / "locations" / plate / f"{well}-{s}-Nuclei.csv", index=False)
        n_cells += len(xy)
        record.update(
            Metadata_compound=treatment or CONTROL,
            Metadata_moa=cpd["moa"] if cpd else CONTROL_MOA,
            Metadata_control=cpd is None,
            Metadata_strength=cpd["strength"] if cpd else 0.0,
            Metadata_row=row + 1, Metadata_col=col + 1)
        rows.append(record)
  _replace(index_path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
  return {
      "directory": str(root),
      "plates": [f"P{p + 1:02d}" for p in range(cfg.plates)],
      "wells": cfg.wells,
      "sites": len(rows),
      "cells": n_cells,
      "channels": list(CHANNELS),
      "compounds": truth["compounds"],
      "moas": sorted({c["moa"] for c in compounds.values()}),
      "parameters": truth["parameters"],
      "seconds": time.perf_counter() - start,
  }


# ---------------------------------------------------------------- treatments and plates


def _compounds(cfg: CellPaintingConfig) -> dict[str, dict]:
  """{name: {moa, strength, z}}: z the compound's shift of a cell's z, [len(PARAMETERS)]."""
  rng = np.random.default_rng([cfg.seed, 0])
  n_par = len(PARAMETERS)
  moa_dirs = rng.normal(size=(cfg.moas, n_par))
  moa_dirs /= np.linalg.norm(moa_dirs, axis=1, keepdims=True)
  own = rng.normal(size=(cfg.compounds, n_par)) / math.sqrt(n_par)  # norm ~1
  lo, hi = (float(v) for v in cfg.strength_range)
  n = cfg.compounds
  out = {}
  for m in range(cfg.moas):
    for j in range(cfg.compounds_per_moa):
      c = m * cfg.compounds_per_moa + j
      rank = j * cfg.moas + m  # each MoA's compounds span the range
      strength = lo + (hi - lo) * rank / (n - 1) if n > 1 else hi
      z = strength * cfg.effect * (moa_dirs[m] + cfg.compound_spread * own[c])
      out[f"cpd{c:03d}"] = {"moa": f"moa{m:02d}", "strength": round(strength, 6), "z": z}
  return out


def _well_positions(cfg: CellPaintingConfig) -> list[tuple[int, int]]:
  """(row, column) 0-based of the wells used on every plate, in plate order."""
  order = np.arange(ROWS * COLUMNS)
  if cfg.wells < ROWS * COLUMNS:
    order = np.sort(np.random.default_rng([cfg.seed, 2]).permutation(order)[:cfg.wells])
  return [(int(i) // COLUMNS, int(i) % COLUMNS) for i in order]


def _plate_map(cfg: CellPaintingConfig, plate: int) -> list[str | None]:
  """The treatment of each used well of a plate: a compound name, None for DMSO."""
  names = [f"cpd{c:03d}" for c in range(cfg.compounds)]
  treated = cfg.wells - cfg.controls_per_plate
  treatments = [None] * cfg.controls_per_plate + [names[k % len(names)] for k in range(treated)]
  perm = np.random.default_rng([cfg.seed, 3, plate]).permutation(cfg.wells)
  return [treatments[i] for i in perm]


def _plate_batch(cfg: CellPaintingConfig, plate: int, edge_sign: np.ndarray) -> dict:
  """A plate's batch effects: gain, background [channel], well_gain [row, col, channel],
  field [channel, H, W] float32 (illumination, geometric mean 1 over the image)."""
  rng = np.random.default_rng([cfg.seed, 6, plate])
  k = len(CHANNELS)
  gain = np.exp(cfg.plate_effect * rng.normal(size=k))
  background = _BACKGROUND * np.exp(cfg.plate_effect * rng.normal(size=k))
  r, c = np.arange(ROWS)[:, None], np.arange(COLUMNS)[None, :]
  ring = np.minimum(np.minimum(r, ROWS - 1 - r), np.minimum(c, COLUMNS - 1 - c))
  edge = np.select([ring == 0, ring == 1], [1.0, 0.5], 0.0)  # outer wells most affected
  log_well = (edge[..., None] * edge_sign
              + 0.5 * rng.normal(size=(ROWS, 1, k)) + 0.5 * rng.normal(size=(1, COLUMNS, k)))
  well_gain = np.exp(cfg.well_effect * log_well)
  return {"gain": gain, "background": background, "well_gain": well_gain,
          "field": _illumination_fields(cfg, rng)}


def _illumination_fields(cfg: CellPaintingConfig, rng) -> np.ndarray:
  """[channel, H, W] float32: an off-centre vignette plus a random quadratic, its log
  spanning `illumination` exactly (max/min = exp(illumination))."""
  s = cfg.image_size
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
  fields = []
  for _ in CHANNELS:
    cy, cx = rng.uniform(0.2, 0.8, 2)
    a = rng.normal(size=5)
    f = (-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.3, 0.8)
         + 0.3 * (a[0] * yy + a[1] * xx + a[2] * yy * xx + a[3] * yy ** 2 + a[4] * xx ** 2))
    f = (f - f.min()) / (f.max() - f.min()) - 0.5
    fields.append(np.exp(cfg.illumination * f))
  return np.stack(fields).astype(np.float32)


# ---------------------------------------------------------------- light and camera


def _expose(cfg, rng, signal, light, background, field) -> np.ndarray:
  """[channel, H, W] uint16 counts of a site's stain (from `render_site`): camera offset +
  light (its lit background plus stain at per-channel peak, x the `light` gains x `field`),
  with shot noise."""
  def column(values):
    return np.asarray(values, np.float32)[:, None, None]

  expected = _CAMERA_OFFSET + column(light) * field * (column(background) + column(_PEAK) * signal)
  shot = rng.standard_normal(expected.shape, np.float32)
  counts = expected + cfg.noise * np.sqrt(expected) * shot
  return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _replace(path: pathlib.Path, write) -> None:
  """Calls `write(tmp)` on a temporary name beside `path`, then renames it into place."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)


def _write_image(path: pathlib.Path, image: np.ndarray, image_format: str) -> None:
  if image_format == "png":
    from PIL import Image
    Image.fromarray(image).save(path, compress_level=1)  # zlib's fastest: noise barely packs
  else:
    import tifffile
    tifffile.imwrite(path, image)
