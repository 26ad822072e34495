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
`Metadata_`; writes WORKDIR/ap.parquet (AP per treated well against controls),
map.parquet (mAP and p-values per treatment), moa_ap.parquet / moa_map.parquet
(same-MoA retrieval between treatments), enrichment.parquet, strength.parquet,
lambda_sweep.parquet and report/index.html with the mAP-vs-λ plot.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cellrep import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_util.parse_arg(arg, synthetic=False, level="well", by_class="")
  config = ml_collections.ConfigDict()
  config.task = "profile_eval"
  config.input = config_dict.placeholder(str)  # profiles .parquet/.csv/.csv.gz (unless synthetic)
  config.synthetic = args.synthetic            # generate a well table instead of reading one
  config.level = args.level                    # rows of the input: "cell", "site" or "well"

  # Comma-separated column lists: the groups of each aggregation level.
  config.columns = columns = ml_collections.ConfigDict()
  columns.site = "Metadata_Plate,Metadata_Well,Metadata_Site"  # cells -> site (median)
  columns.well = "Metadata_Plate,Metadata_Well"                 # sites -> well (mean)
  columns.treatment = "Metadata_compound"                       # wells -> treatment (mean)
  columns.moa = "Metadata_moa"                                  # "" skips same-MoA retrieval
  columns.plate = "Metadata_Plate"                              # "" = all wells on one plate
  config.controls = "Metadata_control == True"  # pandas query selecting control wells

  config.sphering = sphering = ml_collections.ConfigDict()
  sphering.method = "ZCA"          # ZCA, PCA, ZCA-cor, PCA-cor; "none" skips sphering
  sphering.reg = 1e-2              # λ added to the eigenvalues
  sphering.knee = False            # λ = eigenvalue at the knee / 10 instead of `reg`
  sphering.epsilon = config_dict.placeholder(float)  # pycytominer's ε on singular values
                                   # (e.g. 1e-6, its default) instead of λ; unset = λ
  sphering.per_plate = False       # fit on each plate's own controls
  sphering.sweep = "1e-4,1e-3,1e-2,1e-1,1"  # λ values of the mAP-vs-λ plot; "" = none

  config.retrieval = retrieval = ml_collections.ConfigDict()
  retrieval.distance = "cosine"    # cosine, correlation or euclidean
  retrieval.null_size = 10000      # null samples per (positives, total) configuration
  retrieval.null_method = "fast"   # "fast", or "copairs" for copairs' exact random stream
  retrieval.seed = 0
  retrieval.threshold = 0.05       # significance level of corrected p-values
  retrieval.moa_sep = "|"          # separator of multi-label MoA strings
  retrieval.percentile = 99.0      # folds of enrichment threshold (per query)
  retrieval.memory_budget_mb = 512  # memory one block of the ranking may hold
  retrieval.strength_fraction = 0.2  # weakest / median / strongest fraction of treatments

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
