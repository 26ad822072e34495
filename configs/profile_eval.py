r"""Profile evaluation: sphere on controls, aggregate, AP/mAP, enrichment, strength.

  python -m cellrep.launch --config=configs/profile_eval.py --workdir=workdir/profiles \
      --config.input=wells.parquet

Variants (`:arg`, comma-separated):
  configs/profile_eval.py:synthetic   a generated well table (no input needed; laptop CPU)
  configs/profile_eval.py:level=cell  the input holds single cells (aggregated to sites, wells)
  configs/profile_eval.py:by_class=C  cells of tissue without treatments (the embed job's
                                      embeddings.parquet): each FOV x cell class is a well, the
                                      class its treatment, one plate, class C's wells the controls

Reads a parquet (or CSV, or compressed CSV such as pycytominer's .csv.gz) profile table whose metadata columns start with
`Metadata_`; writes WORKDIR/profiles.parquet (the well profiles as scored: sphered),
ap.parquet (AP per treated well against controls),
map.parquet (mAP and p-values per treatment), moa_ap.parquet / moa_map.parquet
(same-MoA retrieval between treatments), enrichment.parquet, strength.parquet,
lambda_sweep.parquet and report/index.html with the mAP-vs-λ plot.
"""

from __future__ import annotations

import ml_collections

from cellrep import config_util
from cellrep.tasks import profile_eval


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, synthetic=False, level="well", by_class="")
  config = profile_eval.default_config()
  config.synthetic = args.synthetic
  config.level = args.level
  columns, sphering, retrieval = config.columns, config.sphering, config.retrieval
  if args.synthetic:
    sphering.sweep = "1e-3,1e-2,1e-1,1"
    retrieval.null_size = 2000
  if args.by_class:
    config.level = "cell"
    columns.site = columns.well = "Metadata_fov_name,Metadata_label"
    columns.treatment = "Metadata_label"
    columns.moa = columns.plate = ""
    config.controls = f"Metadata_label == {args.by_class!r}"
  return config
