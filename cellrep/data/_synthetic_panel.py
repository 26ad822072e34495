"""The marker panel and the cell classes of the synthetic tissue.

Each class is defined by the markers it expresses, where in the cell each one
sits, and how strongly. Levels are mean counts over the whole cell in units of
`SyntheticConfig.counts_scale` (a membrane marker at level 1 and a nuclear
marker at level 1 put the same total signal into the cell; the membrane one
spreads it over the rim, the nuclear one over the centre), so localisation is
not recoverable from mean intensity.

The table is built around the confusions that defeat a per-cell mean-intensity
classifier but not a model that sees the crop:

- Tumor vs Epithelial: both PanCK+; beta-catenin is nuclear in tumour cells
  (its nuclear translocation in colorectal cancer) and membranous in normal
  epithelium. The Epithelial level is raised (1.5) so that, after the rim's
  signal has partly spilled out of the cell, the median beta-catenin mean
  inside the mask is about the same for both classes.
- CD4 T vs CD8 T vs B vs Macrophage: lineage markers on the membrane, and the
  immune classes share niches. A piece of a neighbour's membrane at one border
  point (trogocytosis) or lateral spillover across a shared border gives a
  double-positive mean profile that reads the same whichever of the two cells
  carries it.
- Macrophages carry CD4 at a low level, as in real tissue.
"""

from __future__ import annotations

NUCLEAR, MEMBRANE, CYTOPLASMIC = "nuclear", "membrane", "cytoplasmic"
LOCALISATIONS = (NUCLEAR, MEMBRANE, CYTOPLASMIC)

# Panel order = channel order in the images.
PANEL = ("HH3", "PanCK", "bCatenin", "Ki67", "CD45", "CD3", "CD4", "CD8", "CD20",
         "CD68", "CD31", "Vimentin", "SMA")

# Every cell: histone H3, nuclear.
ALL_CELLS = (("HH3", NUCLEAR, 1.0, 1.0),)

# class -> ((marker, localisation, level, fraction of cells positive), ...),
# in the order `n_classes` takes them. The four lymphoid/myeloid classes come
# right after the epithelial pair, so a small n_classes keeps the hard pairs.
CLASSES: dict[str, tuple[tuple[str, str, float, float], ...]] = {
    "Tumor": (("PanCK", CYTOPLASMIC, 1.0, 1.0), ("bCatenin", NUCLEAR, 1.0, 1.0),
              ("Ki67", NUCLEAR, 1.0, 0.4)),
    "Epithelial": (("PanCK", CYTOPLASMIC, 1.0, 1.0), ("bCatenin", MEMBRANE, 1.5, 1.0),
                   ("Ki67", NUCLEAR, 1.0, 0.1)),
    "CD4 T": (("CD45", MEMBRANE, 0.6, 1.0), ("CD3", MEMBRANE, 1.0, 1.0),
              ("CD4", MEMBRANE, 1.0, 1.0)),
    "CD8 T": (("CD45", MEMBRANE, 0.6, 1.0), ("CD3", MEMBRANE, 1.0, 1.0),
              ("CD8", MEMBRANE, 1.0, 1.0)),
    "B": (("CD45", MEMBRANE, 0.6, 1.0), ("CD20", MEMBRANE, 1.0, 1.0)),
    "Macrophage": (("CD45", MEMBRANE, 0.6, 1.0), ("CD68", CYTOPLASMIC, 1.0, 1.0),
                   ("CD4", MEMBRANE, 0.35, 1.0)),
    "Endothelial": (("CD31", MEMBRANE, 1.0, 1.0), ("Vimentin", CYTOPLASMIC, 0.5, 1.0)),
    "Stroma": (("SMA", CYTOPLASMIC, 1.0, 1.0), ("Vimentin", CYTOPLASMIC, 1.0, 1.0)),
}

# Tissue-like relative frequencies (most common / rarest = 4), raised to the
# power `SyntheticConfig.imbalance`.
FREQUENCY = {"Tumor": 0.24, "Epithelial": 0.10, "CD4 T": 0.12, "CD8 T": 0.10, "B": 0.06,
             "Macrophage": 0.12, "Endothelial": 0.08, "Stroma": 0.18}

# Tissue compartment of each class: classes of one compartment cluster in the
# same niches (tumour nests, lymphoid aggregates, stroma), so neighbours are
# often of confusable classes, as in real tissue.
COMPARTMENTS = ("epithelium", "immune", "stroma")
COMPARTMENT = {"Tumor": "epithelium", "Epithelial": "epithelium", "CD4 T": "immune",
               "CD8 T": "immune", "B": "immune", "Macrophage": "immune",
               "Endothelial": "stroma", "Stroma": "stroma"}

# Cell radius relative to `SyntheticConfig.cell_radius`: lymphocytes are small.
SIZE = {"Tumor": 1.1, "Epithelial": 1.0, "CD4 T": 0.85, "CD8 T": 0.85, "B": 0.85,
        "Macrophage": 1.15, "Endothelial": 1.0, "Stroma": 1.0}


def panel(class_names) -> tuple[str, ...]:
  """The channels the given classes use, in panel order (HH3 always first)."""
  used = {m for c in class_names for m, *_ in CLASSES[c] + ALL_CELLS}
  return tuple(m for m in PANEL if m in used)
