"""Where a classifier looks: input gradients of a class probability, per marker and by radius.

For a cell's network input x [n, n, K + 2] (markers, all-cells mask, cell mask)
and a class c, the saliency is d p_c / d x, p the softmax of one member or the
mean of the ensemble's members (the gradient of a mean is the mean of the
members' gradients). Two flavours:

  plain    the ordinary gradient;
  guided   guided backpropagation (Springenberg et al. 2015): through every ReLU
           only positive gradients flow back, and only where the ReLU's input was
           positive. Implemented by re-evaluating the model's jaxpr with each
           `jax.nn.relu` (what `flax.linen.relu` is) replaced by a ReLU with that
           backward rule, so it works for any model built on `jax.nn.relu`
           without touching the model's code.

Summaries, as in CellSighter's paper:
  - per class and marker, the mean positive gradient over the class's cells and
    the pixels of the input (`positive_means`);
  - the radial profile: the positive gradient summed in concentric rings around
    the cell's centroid, radius in units of the cell's own radius (sqrt(area/pi)
    of its mask), normalised to sum to 1 per cell and marker (`radial_profiles`).
    A marker that defines a class from the nucleus puts its mass at small radii,
    a membrane marker around radius 1.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

from cellrep.data.crops import NUM_MASK_CHANNELS  # noqa: E402
from cellrep.eval.report import Report  # noqa: E402

METHODS = ("plain", "guided")
RADIAL_EDGES = tuple(np.round(np.linspace(0.0, 2.0, 17), 4))  # rings of 1/8 cell radius out to 2


# ---------------------------------------------------------------- guided backpropagation


@jax.custom_vjp
def guided_relu(x):
  return jnp.maximum(x, 0)


def _guided_relu_fwd(x):
  return jnp.maximum(x, 0), x


def _guided_relu_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _is_relu(eqn) -> bool:
  """`jax.nn.relu`: a custom_jvp_call around a jit named relu."""
  if eqn.primitive.name != "custom_jvp_call":
    return False
  inner = eqn.params["call_jaxpr"].jaxpr.eqns
  return len(inner) == 1 and inner[0].params.get("name") == "relu"


def _contains_relu(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if _is_relu(eqn):
      return True
    if "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "jaxpr"):
      if _contains_relu(eqn.params["jaxpr"].jaxpr):
        return True
  return False


def _eval_guided(jaxpr, consts, *args):
  """Evaluates `jaxpr` with every jax.nn.relu swapped for `guided_relu` (recursing into jits)."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if _is_relu(eqn):
      outvals = [guided_relu(invals[eqn.params["num_consts"]])]
    elif "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "jaxpr") and \
        _contains_relu(eqn.params["jaxpr"].jaxpr):
      inner = eqn.params["jaxpr"]
      outvals = _eval_guided(inner.jaxpr, inner.consts, *invals)
    else:
      outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    env.update(zip(eqn.outvars, outvals))
  return [read(v) for v in jaxpr.outvars]


def guided(fn: Callable) -> Callable:
  """`fn` with guided-backpropagation ReLUs; `fn` returns one array."""

  def wrapped(*args):
    closed = jax.make_jaxpr(fn)(*args)
    if not _contains_relu(closed.jaxpr):
      raise ValueError("guided backpropagation needs a model built on jax.nn.relu; found none")
    return _eval_guided(closed.jaxpr, closed.consts, *jax.tree.leaves(args))[0]

  return wrapped


# ---------------------------------------------------------------- gradients


def gradient_fn(model, method: str = "plain") -> Callable:
  """(variables of one member, images [B, n, n, C], targets [B] int) -> d p_target / d images."""
  if method not in METHODS:
    raise ValueError(f"unknown saliency method {method!r}; known: {METHODS}")

  def prob(variables, images, targets):
    p = jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)
    # Cells are independent in eval mode, so one gradient of the sum gives each cell its own.
    return jnp.sum(jnp.take_along_axis(p, targets[:, None], axis=1))

  fn = guided(prob) if method == "guided" else prob
  return jax.jit(jax.grad(fn, argnums=1))


def input_gradients(model, variables, images: np.ndarray, targets: np.ndarray, *,
                    method: str = "plain", batch_size: int = 64) -> np.ndarray:
  """Gradients of the mean member probability of `targets` w.r.t. the network inputs.

  Args:
    variables: Flax variables with the member axis [M, ...] (slice it for one member).
    images: [N, n, n, C] network inputs (after preprocessing).
    targets: [N] class index per input.

  Returns:
    [N, n, n, C] float32.
  """
  grad = gradient_fn(model, method)
  members = int(jax.tree.leaves(variables)[0].shape[0])
  take = jax.jit(lambda v, m: jax.tree.map(lambda x: x[m], v))
  out = np.zeros(images.shape, np.float32)
  for m in range(members):
    one = take(variables, jnp.int32(m))
    for start in range(0, len(images), batch_size):
      x = jnp.asarray(images[start:start + batch_size], jnp.float32)
      t = jnp.asarray(targets[start:start + batch_size], jnp.int32)
      out[start:start + batch_size] += np.asarray(grad(one, x, t)) / members
  return out


# ---------------------------------------------------------------- summaries


def positive_means(grads: np.ndarray, classes_of: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, K] mean over each class's cells and all pixels of max(gradient, 0), markers only."""
  pos = np.maximum(grads[..., :-NUM_MASK_CHANNELS], 0).mean(axis=(1, 2))  # [N, K]
  out = np.full((num_classes, pos.shape[1]), np.nan)
  for c in range(num_classes):
    if (classes_of == c).any():
      out[c] = pos[classes_of == c].mean(axis=0)
  return out


def radial_profiles(grads: np.ndarray, cell_masks: np.ndarray,
                    edges: Sequence[float] = RADIAL_EDGES, per_area: bool = False) -> np.ndarray:
  """Positive gradient in rings around each cell's centroid, radius / cell radius.

  Args:
    grads: [N, n, n, C] input gradients (markers first).
    cell_masks: [N, n, n] the centre cell's mask in the same input.
    edges: ring edges in cell radii (B + 1 values).
    per_area: False: the sum over each ring's pixels (the paper's profile; outer
      rings hold more pixels). True: the mean per pixel of each ring, a density
      whose peak sits where the gradient is most concentrated.

  Returns:
    [N, K, B] float64: per cell and marker, normalised to sum to 1 over the rings
    (within the last edge); NaN where there is no positive gradient.
  """
  n = grads.shape[1]
  yy, xx = np.indices((n, n), dtype=np.float64)
  mask = cell_masks > 0.5
  area = np.maximum(mask.sum(axis=(1, 2)), 1)
  cy = (mask * yy).sum(axis=(1, 2)) / area
  cx = (mask * xx).sum(axis=(1, 2)) / area
  radius = np.sqrt(area / np.pi)
  r = np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]) / radius[:, None, None]
  ring = np.digitize(r, edges) - 1                                    # [N, n, n], -1 / B outside
  bins = len(edges) - 1
  onehot = (ring[..., None] == np.arange(bins)).astype(np.float64)    # [N, n, n, B]
  pos = np.maximum(grads[..., :-NUM_MASK_CHANNELS], 0).astype(np.float64)
  sums = np.einsum("nyxk,nyxb->nkb", pos, onehot)
  if per_area:
    pixels = onehot.sum(axis=(1, 2))[:, None, :]                      # [N, 1, B]
    sums = np.where(pixels > 0, sums / np.maximum(pixels, 1), 0.0)
  total = sums.sum(axis=2, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, sums / total, np.nan)


def mean_radius(profile: np.ndarray, edges: Sequence[float] = RADIAL_EDGES) -> np.ndarray:
  """Centre of mass of radial profiles [..., B], in cell radii."""
  centres = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
  return np.sum(profile * centres, axis=-1) / np.sum(profile, axis=-1)


def class_profiles(profiles: np.ndarray, classes_of: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, K, B] mean radial profile of each class's cells (NaN for absent classes)."""
  out = np.full((num_classes,) + profiles.shape[1:], np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a marker with no positive gradient: NaN
    for c in range(num_classes):
      if (classes_of == c).any():
        out[c] = np.nanmean(profiles[classes_of == c], axis=0)
  return out


@dataclasses.dataclass
class Saliency:
  """Saliency of a set of cells. grads: [N, n, n, C]; targets: [N] the class differentiated."""
  images: np.ndarray
  grads: np.ndarray
  targets: np.ndarray
  classes: tuple[str, ...]
  channels: tuple[str, ...]
  method: str
  edges: tuple[float, ...] = RADIAL_EDGES

  @property
  def marker_means(self) -> pd.DataFrame:
    """[classes, markers] mean positive gradient."""
    return pd.DataFrame(positive_means(self.grads, self.targets, len(self.classes)),
                        index=pd.Index(self.classes, name="class"), columns=list(self.channels))

  def profiles(self, per_area: bool = False) -> np.ndarray:
    """[classes, K, B] mean radial profile per class and marker (see `radial_profiles`)."""
    per_cell = radial_profiles(self.grads, self.images[..., -1], self.edges, per_area)
    return class_profiles(per_cell, self.targets, len(self.classes))

  def top_markers(self, k: int = 2) -> dict[str, list[str]]:
    """Per class present, the k markers with the largest mean positive gradient."""
    means = self.marker_means
    return {c: list(row.sort_values(ascending=False).index[:k])
            for c, row in means.iterrows() if row.notna().any()}

  def radius_table(self, markers: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Where each class's gradient for its markers (default its top 2) sits, in cell radii.

    Columns: mean_radius, the centre of mass of the ring sums; inner_fraction, the
    fraction of the ring sums within half the cell radius; peak_radius, the ring
    where the per-pixel gradient is largest.
    """
    sums, density, centres = self.profiles(), self.profiles(per_area=True), _centres(self.edges)
    inner = centres < 0.5
    rows = []
    for c, names in (markers or self.top_markers(2)).items():
      for m in names:
        i, k = self.classes.index(c), self.channels.index(m)
        if np.isnan(sums[i, k]).all():
          continue
        rows.append({"class": c, "marker": m,
                     "mean_radius": float(mean_radius(sums[i, k], self.edges)),
                     "inner_fraction": float(np.nansum(sums[i, k][inner])),
                     "peak_radius": float(centres[np.nanargmax(density[i, k])])})
    return pd.DataFrame(rows, columns=["class", "marker", "mean_radius", "inner_fraction",
                                       "peak_radius"]).set_index(["class", "marker"])


def _centres(edges) -> np.ndarray:
  return (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2


def compute(model, variables, images: np.ndarray, targets: np.ndarray, classes, channels, *,
            method: str = "guided", batch_size: int = 64) -> Saliency:
  """Saliency of the ensemble (or of the members in `variables`) for inputs [N, n, n, C]."""
  grads = input_gradients(model, variables, images, targets, method=method, batch_size=batch_size)
  return Saliency(np.asarray(images), grads, np.asarray(targets), tuple(classes), tuple(channels),
                  method)


# ---------------------------------------------------------------- figures


def plot_marker_means(means: pd.DataFrame):
  means = means.dropna(how="all")  # classes without cells
  data = means.to_numpy()
  scaled = data / np.nanmax(data, axis=1, keepdims=True)  # each class's row on its own scale
  fig, ax = plt.subplots(figsize=(1.5 + 0.45 * means.shape[1], 1.0 + 0.4 * means.shape[0]))
  im = ax.imshow(scaled, cmap="magma", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(means.shape[1]), means.columns, rotation=60, ha="right")
  ax.set_yticks(range(means.shape[0]), means.index)
  ax.set_xlabel("marker")
  ax.set_ylabel("class (gradient of its probability)")
  fig.colorbar(im, ax=ax, fraction=0.046, label="mean positive gradient / row max")
  return fig


def plot_profiles(sal: Saliency, k: int = 2):
  centres = _centres(sal.edges)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, per_area in zip(axes, (False, True)):
    profiles = sal.profiles(per_area)
    for c, markers in sal.top_markers(k).items():
      for m in markers:
        ax.plot(centres, profiles[sal.classes.index(c), sal.channels.index(m)], marker="o", ms=2,
                label=f"{c}: {m}")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("distance from the cell's centroid / cell radius")
    ax.set_ylabel("fraction of positive gradient" + (" per pixel" if per_area else ""))
    ax.set_title("per-pixel density of each ring" if per_area else "sum over each ring", fontsize=9)
  axes[1].legend(fontsize=6, ncol=2)
  return fig


def plot_cells(sal: Saliency, rows: Sequence[int]):
  """Per chosen cell: its strongest marker of the target class, and the summed saliency."""
  top = sal.top_markers(1)
  fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.2 * len(rows)), squeeze=False)
  for ax, i in zip(axes, rows):
    cls = sal.classes[sal.targets[i]]
    marker = top.get(cls, [sal.channels[0]])[0]
    k = sal.channels.index(marker)
    ax[0].imshow(sal.images[i, :, :, k], cmap="gray")
    ax[0].contour(sal.images[i, :, :, -1], levels=[0.5], colors="cyan", linewidths=0.8)
    ax[0].set_title(f"{cls}: {marker}", fontsize=8)
    heat = np.maximum(sal.grads[i, :, :, :-NUM_MASK_CHANNELS], 0).sum(axis=-1)
    ax[1].imshow(heat, cmap="magma")
    ax[1].contour(sal.images[i, :, :, -1], levels=[0.5], colors="cyan", linewidths=0.8)
    ax[1].set_title(f"{sal.method} saliency", fontsize=8)
    for a in ax:
      a.set_axis_off()
  return fig


def add_to_report(report: Report, sal: Saliency, heatmap_cells: int = 1, title: str = "Saliency"
                  ) -> pd.DataFrame:
  """Marker heat map, radial profiles, where they sit, and per-cell heat maps.

  Returns the radius table (class, marker) -> mean_radius, inner_fraction, peak_radius.
  """
  report.heading(title)
  report.paragraph(f"{sal.method} gradients of each class's probability for {len(sal.targets)} "
                   "held-out cells of that class (correctly predicted where there are enough).")
  means = sal.marker_means
  report.figure(plot_marker_means(means), "saliency_markers",
                "Mean positive gradient per class and marker (each row scaled to its maximum).")
  report.table(means, float_format="{:.2e}")
  radii = sal.radius_table()
  report.figure(plot_profiles(sal), "saliency_radial",
                "Radial profile of the positive gradient of each class's two strongest markers, "
                "summed per ring (left) and per pixel (right); radius 1 = the cell's own radius.")
  report.table(radii)
  rows = [int(i) for c in range(len(sal.classes))
          for i in np.flatnonzero(sal.targets == c)[:heatmap_cells]]
  if rows:
    report.figure(plot_cells(sal, rows), "saliency_cells", "One cell per class: its strongest "
                  "marker with the cell outline, and the summed positive saliency.")
  return radii
