"""Landmark-cell labels from marker gates, as CellSighter's paper labels unlabelled data.

A rule names the markers that define a class::

  {"T cell": ["CD3"], "B cell": ["CD20"], "Tumor": ["PanKeratin", "ECadherin"],
   "Stroma": ["SMA", "Vimentin"]}

A marker is positive in a cell when the cell's (arcsinh) mean expression of it
exceeds the marker's `percentile`-th percentile over all cells; a class is
positive when all its markers are. A cell positive for exactly one class gets
that class; cells positive for none or for several stay unlabelled — landmark
cells are the unambiguous ones, not a full annotation.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cellrep.data.expression import expression_matrix
from cellrep.data.store import Store, StoreWriter
from cellrep.errors import BadValue, InputError

Rules = Mapping[str, Sequence[str]]


def parse_rules(text: str) -> dict[str, list[str]]:
  """Rules from a one-line spec, `;` between classes and `+` between markers.

  "T cell=CD3;Tumor=PanKeratin+ECadherin" -> {"T cell": ["CD3"], "Tumor": ["PanKeratin", "ECadherin"]}
  """
  rules: dict[str, list[str]] = {}
  for part in filter(str.strip, text.split(";")):
    name, eq, markers = part.partition("=")
    markers = [m.strip() for m in markers.split("+") if m.strip()]
    if not eq or not name.strip() or not markers:
      raise InputError(f"gating rule {part.strip()!r}", "not of the form 'class=marker+marker'",
                       "e.g. 'T cell=CD3;Tumor=PanKeratin+ECadherin'")
    if name.strip() in rules:
      raise InputError(f"gating rule {part.strip()!r}", f"class {name.strip()!r} given twice",
                       "one rule per class")
    rules[name.strip()] = markers
  return rules


def gate(expression: pd.DataFrame, rules: Rules, percentile: float = 80.0) -> pd.Series:
  """Landmark labels from an expression matrix.

  Args:
    expression: [cells, channels] (e.g. `expression_matrix(store, cofactor=5)`).
    rules: class name -> markers that must all be positive.
    percentile: per-marker threshold, in [0, 100), over all rows of `expression`.

  Returns:
    "string" Series aligned with `expression.index`: the class, or <NA>.
  """
  if not rules:
    raise InputError("gating rules", "no rules", "at least one 'class=marker' rule")
  if not 0 <= percentile < 100:
    raise InputError("gating percentile", f"{percentile}", "a percentile in [0, 100)")
  for name, markers in rules.items():
    unknown = [m for m in markers if m not in expression.columns]
    if unknown or not markers:
      raise InputError(f"gating rule {name!r}", f"markers {unknown} are not channels" if unknown
                       else "no markers", f"markers among {list(expression.columns)}")
  values = expression.to_numpy(np.float64)
  column = {c: i for i, c in enumerate(expression.columns)}
  # NaN (a cell with no pixels) is never positive: nanpercentile ignores it and NaN > t is False.
  threshold = np.nanpercentile(values, percentile, axis=0) if len(values) else np.zeros(values.shape[1])
  positive = values > threshold
  classes = list(rules)
  hits = np.stack([positive[:, [column[m] for m in rules[c]]].all(axis=1) for c in classes], axis=1)
  unique = hits.sum(axis=1) == 1
  labels = pd.array([None] * len(values), dtype="string")
  labels[unique] = np.asarray(classes, dtype=object)[hits[unique].argmax(axis=1)]
  return pd.Series(labels, index=expression.index, name="label")


def gate_store(store: Store, rules: Rules, *, percentile: float = 80.0,
               cofactor: float | None = 5.0) -> pd.Series:
  """`gate` on the store's arcsinh mean expression; aligned with `store.cells`.

  A percentile threshold is a rank, and arcsinh is monotone, so `cofactor` does
  not change which cells pass; it is here so the gated values are the usual ones.
  """
  return gate(expression_matrix(store, cofactor=cofactor), rules, percentile)


def relabel_store(store: Store, labels: pd.Series, out, *, classes: Sequence[str] | None = None,
                  overwrite: bool = False) -> Store:
  """A copy of `store` at `out` with new labels; images and masks are copied FOV by FOV.

  Args:
    labels: class name or <NA> per cell, indexed like `store.cells` (rows missing
      from `labels` become unlabelled).
    classes: the class list, in order (default the labels present, sorted).
    out: may be `store.path` itself with `overwrite=True`: the new store is
      written beside it and replaces it only once complete.

  Metadata_* columns are kept when they are constant within each FOV (the
  StoreWriter takes per-FOV metadata); per-cell ones raise ValueError.
  """
  cells = store.cells
  extra = labels.index.difference(cells.index)
  if len(extra):
    raise ValueError(f"labels for rows not in the store's cells: {list(extra[:5])}")
  labels = labels.reindex(cells.index)
  meta_columns = [c for c in cells.columns if c.startswith("Metadata_")]
  per_cell = [c for c in meta_columns if (cells.groupby("fov")[c].nunique(dropna=False) > 1).any()]
  if per_cell:
    raise ValueError(f"per-cell metadata columns {per_cell} cannot be copied by StoreWriter")
  m = store.meta
  with StoreWriter(out, m.channels, m.fovs, m.fov_shapes, m.dtype, classes=classes,
                   chunk_size=m.chunk_size, overwrite=overwrite) as writer:
    for fov in range(len(m.fovs)):
      rows = np.flatnonzero(cells["fov"].to_numpy() == fov)
      fov_labels = {int(i): (None if pd.isna(v) else str(v))
                    for i, v in zip(cells["cell_id"].to_numpy()[rows], labels.to_numpy()[rows])}
      metadata = {c: cells[c].iloc[rows[0]] for c in meta_columns} if len(rows) else None
      image, mask = store.read_fov(fov)
      writer.write_fov(fov, image, mask, fov_labels, metadata)
    return writer.commit()


def gate_and_relabel(store: Store, rules: Rules, out, *, percentile: float = 80.0,
                     cofactor: float | None = 5.0, overwrite: bool = False) -> Store:
  """Gates `store` and writes the labelled copy at `out`.

  Classes keep the order of `rules`. A class that no cell passes alone (its markers never
  positive together, or every such cell positive for another class too) is a `BadValue`
  of ``rules``: a model cannot learn a class without cells, and dropping it silently
  would train on the others as if it had been asked for.
  """
  labels = gate_store(store, rules, percentile=percentile, cofactor=cofactor)
  present = set(labels.dropna())
  empty = [c for c in rules if c not in present]
  if empty:
    raise BadValue("rules", f"classes {empty} match no cell of {store.path} at percentile "
                   f"{percentile:g} (a cell positive for several classes stays unlabelled)",
                   "rules each of which some cells pass alone")
  return relabel_store(store, labels, pathlib.Path(out), classes=list(rules), overwrite=overwrite)
