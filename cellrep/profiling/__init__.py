"""Profiling: aggregate, sphere, retrieve (AP / mAP / enrichment) and treatment strength.

Jitted kernels over pandas tables that follow pycytominer's convention
(`Metadata_*` columns are metadata, every other column is a feature).

Modules: `aggregate` (aggregate, aggregate_levels), `sphering` (fit, sphere,
knee_regularization), `retrieval` (average_precision), `significance`
(mean_average_precision, benjamini_hochberg), `enrichment` (enrichment,
folds_of_enrichment), `strength` (treatment_strength), `sweep` (lambda_sweep).
`kernels` and `ranking` are the device-side machinery. The names below are
re-exported for convenience (module names are not shadowed).
"""

from cellrep.profiling.aggregate import aggregate_levels
from cellrep.profiling.enrichment import folds_of_enrichment
from cellrep.profiling.retrieval import average_precision
from cellrep.profiling.significance import benjamini_hochberg, mean_average_precision
from cellrep.profiling.sphering import Sphering, knee_regularization, sphere
from cellrep.profiling.strength import treatment_strength
from cellrep.profiling.sweep import lambda_sweep

__all__ = [
    "Sphering", "aggregate_levels", "average_precision", "benjamini_hochberg",
    "folds_of_enrichment", "knee_regularization", "lambda_sweep", "mean_average_precision",
    "sphere", "treatment_strength",
]
