r"""Ingest raw images into a cellrep dataset store.

  python -m cellrep.launch --config=configs/ingest.py --workdir=workdir/mibi \
      --config.ingest.input=../shared/data/mibi_fov8

Variants (`:arg`, comma-separated):
  configs/ingest.py:mibi             ../shared/data/mibi_fov8 with landmark labels
                                     gated from lineage markers (T cell, B cell,
                                     Tumor, Stroma)
  configs/ingest.py:format=cellsighter   a CellSighter data folder
  configs/ingest.py:format=deepprofiler  a DeepProfiler project's inputs folder (index.csv,
                                         images, nuclei locations; --config.ingest.channels=
                                         DNA,RNA,ER,AGP,Mito)

Writes the store to `ingest.output` (default WORKDIR/store). Lists (channels,
fovs, class_names, blacklist) are comma-separated strings, so a name with a
space needs only shell quotes: --config.ingest.channels="CD3,NaK ATPase".
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cellrep import config_util

# Lineage markers of the MIBI breast FOV: 5 T, 5 B, 33 tumour and 22 stromal landmarks of 272 cells.
MIBI_RULES = "T cell=CD3;B cell=CD20;Tumor=PanKeratin;Stroma=SMA+Vimentin"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # `format` is checked by the task, where overrides from the command line are checked too.
  args = config_util.parse_arg(arg, format="tiff_folder", mibi=False)
  config = ml_collections.ConfigDict()
  config.task = "ingest"

  config.ingest = ingest = ml_collections.ConfigDict()
  ingest.format = args.format            # "tiff_folder" or "cellsighter"
  ingest.input = config_dict.placeholder(str)   # the folder to read (required)
  ingest.output = config_dict.placeholder(str)  # the store to write; default WORKDIR/store
  ingest.overwrite = False               # replace an existing store at `output`
  ingest.chunk_size = 64                 # store chunk edge in pixels (~one crop touches 4 chunks)
  ingest.fovs = ""                       # FOV names to ingest, comma-separated; "" = all
  # tiff_folder: FOV/<channel_dir>/<channel>.tif[f] and FOV/<segmentation>.
  ingest.channel_dir = "TIFs"
  ingest.segmentation = "segmentation.tiff"  # relative to the FOV folder; {fov} = FOV name
  ingest.channels = ""                   # channels to keep, in order, comma-separated; "" = all, sorted
  ingest.labels = config_dict.placeholder(str)  # CSV/parquet: cell_id, label (, fov)
  ingest.id_column = "cell_id"
  ingest.label_column = "label"
  ingest.fov_column = "fov"
  # cellsighter: CellTypes/{data/images,cells,cells2labels}/ and channels.txt.
  ingest.channels_file = config_dict.placeholder(str)  # default INPUT/channels.txt
  ingest.blacklist = ""                  # channels to drop, comma-separated (CellSighter's blacklist)
  ingest.class_names = ""                # name of class id 0, 1, ...; "" = the ids as names

  # deepprofiler: INPUT/metadata/index.csv, INPUT/images/, INPUT/locations/ (DeepProfiler's
  # project inputs); ingest.channels names the index columns of the channel images.
  ingest.index = config_dict.placeholder(str)      # default INPUT/metadata/index.csv
  ingest.images = config_dict.placeholder(str)     # image paths are relative to it; default INPUT/images
  ingest.locations = config_dict.placeholder(str)  # default INPUT/locations
  ingest.location_pattern = "{Plate}/{Well}-{Site}-Nuclei.csv"
  ingest.location_columns = "Nuclei_Location_Center_X,Nuclei_Location_Center_Y"
  ingest.label_field = ""                # index column of each site's class (its treatment); "" = none
  ingest.illumination = True             # per plate and channel illumination correction
  ingest.illum_scale = 0.25              # the mean image is computed at this fraction of the size
  ingest.illum_median = 25               # median filter size (pixels at that scale)
  ingest.illum_floor = 2.0               # floor of the function, a percentile of itself
  ingest.stretch = "0.05,99.95"          # percentiles stretched onto 0..255 per image (uint8)

  # Landmark labels from marker gates, replacing any input labels; "" = off.
  config.gating = gating = ml_collections.ConfigDict()
  gating.rules = ""                      # "T cell=CD3;Tumor=PanKeratin+ECadherin"
  gating.percentile = 80.0               # a marker is positive above this percentile of cells

  if args.mibi:
    ingest.input = "../shared/data/mibi_fov8"
    gating.rules = MIBI_RULES
  return config
