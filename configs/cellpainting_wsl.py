r"""The Cell Painting CNN: EfficientNet-B0 trained weakly supervised on treatments (Moshkov et al.
2024), its block6a_activation features, profiles scored by the profiling kernels.

  python -m cellrep.launch --config=configs/cellpainting_wsl.py --workdir=workdir/cp \
      --config.data.store=workdir/cp_store/store
  python -m cellrep.launch --config=configs/cellpainting_wsl.py:runlocal --workdir=workdir/cp-local

The store holds nuclei-centred cells of a DeepProfiler project (configs/ingest.py with
ingest.format=deepprofiler: index.csv, images, locations, illumination correction, 8-bit
stretch), its label the treatment. Paper settings: 128x128 crops of 5 channels, no masks,
treatments resampled to the median count every epoch, DeepProfiler's augmentations, SGD with
Nesterov momentum 0.9, lr 0.005, L2 1e-5, batch 32, 30 epochs; features block6a_activation
(672) averaged over space; site median, well mean, sphering on the controls.

Variants (`:arg`, comma-separated):
  runlocal    for a laptop CPU (~8 min on 2 cores): 3 synthetic plates of 40 wells x 4
              sites with strong phenotypes, 64 px crops, 800 steps at lr 0.05 (random
              weights learn nothing in so few steps at 0.005), smaller null distributions
  members=N   ensemble size (default 1)
"""

from cellrep import config_util
from cellrep.tasks import cellpainting


def get_config(arg=None):
  args = config_util.parse_arg(arg, runlocal=False, members=1)
  c = cellpainting.default_config()
  c.ensemble.members = args.members
  if args.runlocal:
    c.data.source = "synthetic_plates"
    c.data.synthetic_plates.update(plates=3, wells=40, sites=4, image_size=160,
                                   cells_per_site=8.0, nucleus_radius=6.0, cell_radius=14.0,
                                   moas=4, compounds_per_moa=3, controls_per_plate=12,
                                   effect=8.0)
    c.data.crop_size = c.data.input_size = 64
    c.data.val_plates = "P03"
    c.train.update(steps=800, lr=0.05, log_every=10, checkpoint_every=100)
    c.profile.retrieval.null_size = 2000
    c.profile.sphering.sweep = "1e-3,1e-2,1e-1,1"
  return c
