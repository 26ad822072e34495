"""report/index.html of the pretrain task: the run, reconstructions of probe cells, the loss
curve, the probe tables (pretrained against random-init) and the mask-ratio sweep."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cellrep.data import augment
from cellrep.data import normalize as normalize_lib
from cellrep.data.crops import CropSource
from cellrep.eval.report import Report
from cellrep.train.metrics import read_metrics

# Probe cells whose reconstructions the report draws.
SAMPLES = 6


def reconstructions(config, trained, store, rows: np.ndarray, seed: int = 0) -> dict:
  """Member 0 on one channel of each of `rows` (the channel with the widest 1st-99th
  percentile range), masked at model.mask_ratio: {"input", "masked", "output"} [n, H, W]."""
  crops = CropSource(store, trained.crop_size).read(rows)["crop"]
  k = len(store.meta.channels)
  markers = crops[:, :k]
  spread = np.percentile(markers, 99, axis=(2, 3)) - np.percentile(markers, 1, axis=(2, 3))
  x = markers[np.arange(len(rows)), np.argmax(spread, axis=1)][:, None]  # [n, 1, S, S]
  x = augment.center(jnp.asarray(x), trained.input_size)                # [n, n', n', 1]
  x = normalize_lib.normalize(x, trained.normalize, masks=0)
  one = jax.tree.map(lambda v: v[0], trained.variables)
  (out, feats) = trained.model.apply(one, x, train=False, capture=("masked_input",),
                                     mask_ratio=config.model.mask_ratio or None,
                                     rngs={"mask": jax.random.key(seed)})
  return {"input": np.asarray(x[..., 0]), "masked": np.asarray(feats["masked_input"][..., 0]),
          "output": np.asarray(out["reconstruction"][..., 0]),
          "hidden": np.asarray(out["mask"])}


def _reconstruction_figure(r: dict):
  import matplotlib.pyplot as plt
  n = len(r["input"])
  fig, axes = plt.subplots(n, 4, figsize=(7, 1.8 * n), squeeze=False, layout="constrained")
  lo, hi = np.percentile(r["input"], 1), np.percentile(r["input"], 99.5)
  for i in range(n):
    error = np.abs(r["output"][i] - r["input"][i])
    for j, (title, image, kw) in enumerate((
        ("input", r["input"][i], dict(vmin=lo, vmax=hi, cmap="gray")),
        ("masked input", r["masked"][i], dict(vmin=lo, vmax=hi, cmap="gray")),
        ("output", r["output"][i], dict(vmin=lo, vmax=hi, cmap="gray")),
        ("|error|", error, dict(vmin=0, vmax=max(hi - lo, 1e-6), cmap="magma")))):
      ax = axes[i, j]
      ax.imshow(image, **kw)
      if j == 3:
        ax.contour(r["hidden"][i], levels=[0.5], colors="cyan", linewidths=0.5)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=9)
  return fig


def report(config, workdir, plan, trained, probe_store, table: pd.DataFrame,
           sweep: pd.DataFrame | None) -> None:
  import matplotlib.pyplot as plt
  from cellrep.tasks import pretrain_probes

  workdir = pathlib.Path(workdir)
  rep = Report(workdir / "report", "cellrep: Microsnoop pretraining (masked U-Net)")
  sources = sorted(set(plan.store.cells["Metadata_Source"].astype(str)))
  rep.key_values({"sources": ", ".join(sources), "pool images": len(plan.store.meta.fovs),
                  "pool crops": len(plan.train_idx), "unit": config.data.unit,
                  "steps": plan.num_steps, "members": config.ensemble.members,
                  "input": f"{config.data.input_size} px, {config.data.normalize}",
                  "mask": f"{config.model.mask_ratio:g} of {config.model.mask_patch} px patches",
                  "loss": "masked pixels" if config.objective.masked_only else "all pixels",
                  "probe store": str(probe_store.path)})

  records = [r for r in read_metrics(workdir) if "train/loss" in r]
  if records:
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    steps = [r["step"] for r in records]
    for key, label in (("train/mse_masked", "hidden pixels"), ("train/mse_all", "all pixels")):
      ax.plot(steps, [r.get(key, np.nan) for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (normalised intensity)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rep.heading("Pretraining")
    rep.figure(fig, "loss", "Reconstruction error of the training batches")

  rows = pretrain_probes.probe_rows(config, probe_store)
  rng = np.random.default_rng(config.seed)
  sample = np.sort(rng.choice(rows, size=min(SAMPLES, len(rows)), replace=False))
  rep.heading("Reconstructions")
  rep.figure(_reconstruction_figure(reconstructions(config, trained, probe_store, sample,
                                                    config.seed)),
             "reconstructions", "Probe cells (unseen FOVs), each its brightest-range channel: "
             "the input, what the network saw (hidden patches zero), its output and the error "
             "(hidden patches outlined)")

  rep.heading("Probes")
  rep.paragraph(f"Balanced accuracy (mean ± SD over {config.probe.folds} stratified folds) of "
                f"a cosine {config.probe.k}-NN and a logistic regression on the per-channel "
                "embeddings of the probe store's cells: the pretrained encoder against a "
                "randomly initialised one.")
  shown = table.assign(balanced_accuracy=[f"{m:.3f} ± {s:.3f}" for m, s in zip(
      table.balanced_accuracy, table.balanced_accuracy_sd)])
  rep.table(shown.pivot(index=["mode", "probe"], columns="encoder",
                        values="balanced_accuracy").reset_index())
  rep.table(table[["mode", "encoder", "probe", "cells", "dims", "accuracy", "mcc", "macro_f1"]])

  if sweep is not None and len(sweep):
    fig, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    ax.plot(sweep.mask_ratio, sweep.linear_balanced_accuracy, "o-")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("linear probe balanced accuracy")
    ax.grid(alpha=0.3)
    rep.heading("Mask-ratio sweep")
    rep.figure(fig, "mask_ratio_sweep", "Single-cell linear probe of an encoder pretrained at "
                                        "each mask ratio (sweep/ratio_<r>/)")
    rep.table(sweep)
  rep.write()
