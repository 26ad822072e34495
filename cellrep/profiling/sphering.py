"""Sphering (whitening) fitted on control profiles and applied to every profile.

W = U f(Λ) Uᵀ (ZCA) or U f(Λ) (PCA), U, Λ the eigenvectors and eigenvalues of the
controls' covariance (or correlation, for the `-cor` methods), with two conventions:
- `reg` = λ on the eigenvalues, f(Λ) = (Λ + λ)^(-1/2), the Cell Painting CNN paper's
  form; `reg="knee"` sets λ to a tenth of the eigenvalue at the knee of the spectrum
  (Microsnoop; pycytominer issue #116).
- `epsilon` = ε on the singular values σ of the centred controls, f = sqrt(n-1)/(σ+ε):
  pycytominer's `Spherize`, whose output this reproduces.
When n <= d (or the controls are rank-deficient) the directions beyond the rank r get
the r-th value, as pycytominer does; with λ > 0 they get λ^(-1/2) instead.

The fit is O(n d min(n, d) + min(n, d)^3) on the controls only, in float64 on the
host so that the smallest eigenvalues mean something; applying it is one jitted
float32 matmul (or float64 on the host, to reproduce pycytominer to its precision).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.linalg
import threadpoolctl

from cellrep.errors import InputError
from cellrep.profiling import tables

METHODS = ("ZCA", "PCA", "ZCA-cor", "PCA-cor")


@dataclasses.dataclass(frozen=True)
class Sphering:
  """A fitted sphering: out = ((x - mean) / scale) @ w.

  mean, scale: [d] float64; w: [d, d] float64; eigenvalues: [d] float64, descending,
  of the fitted covariance (or correlation); rank: numerical rank of the controls;
  reg: the λ used (0 in the ε convention).
  """
  mean: np.ndarray
  scale: np.ndarray
  w: np.ndarray
  eigenvalues: np.ndarray
  rank: int
  reg: float
  method: str

  def apply(self, x, dtype=np.float32) -> np.ndarray:
    """[n, d] sphered profiles of `x` [n, d].

    float32 (default): one jitted matmul on device. float64: numpy on the host, for
    reproducing pycytominer to its own precision.
    """
    if np.dtype(dtype) == np.float64:
      return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.w
    # Folding the centring into the matrix keeps float32 rounding off (x - mean).
    w = self.w / self.scale[:, None]
    bias = -(self.mean / self.scale) @ self.w
    return np.asarray(_apply(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                             jnp.asarray(bias, jnp.float32)))


@jax.jit
def _apply(x, w, bias):
  return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + bias


def knee_index(values: np.ndarray, sensitivity: float = 1.0) -> int:
  """Index of the knee of a convex decreasing curve (Kneedle, as kneed's KneeLocator
  with curve="convex", direction="decreasing", online=False)."""
  y = np.asarray(values, np.float64)
  n = len(y)
  if n < 3:
    return 0
  x = np.arange(n, dtype=np.float64)
  xn = (x - x.min()) / (x.max() - x.min())
  span = y.max() - y.min()
  yn = (y - y.min()) / span if span > 0 else np.zeros(n)
  diff = (yn.max() - yn) - xn
  maxima = [i for i in range(n) if (i == 0 or diff[i] >= diff[i - 1]) and
            (i == n - 1 or diff[i] >= diff[i + 1])]
  minima = {i for i in range(n) if (i == 0 or diff[i] <= diff[i - 1]) and
            (i == n - 1 or diff[i] <= diff[i + 1])}
  step = sensitivity * np.abs(np.diff(xn).mean())
  threshold, knee = 0.0, None
  for i in range(maxima[0], n - 1):
    if i in maxima:
      threshold, knee = diff[i] - step, i
    if i in minima:
      threshold = 0.0
    if diff[i + 1] < threshold and knee is not None:
      return knee
  return int(np.argmax(diff))


def knee_regularization(eigenvalues: np.ndarray) -> float:
  """λ = eigenvalue at the knee of the descending spectrum / 10."""
  ev = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
  return float(ev[knee_index(ev)] / 10.0)


def _spectrum(xc: np.ndarray, structural_rank: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Singular values, right singular vectors [d, k] and numerical rank of xc [n, d].

  From the eigendecomposition of the smaller Gram matrix (d x d, or n x n when
  n < d): O(n d min(n, d)), several times faster than an SVD. Squaring resolves
  singular values down to ~sqrt(eps) * sigma_max, so the rank counts those above
  10 sqrt(eps max(n, d)) sigma_max and never exceeds the structural rank
  (n - 1 after centring): pycytominer's exact-rank test (numpy's matrix_rank)
  differs only for controls whose covariance has a condition number above ~1e10.
  """
  n, d = xc.shape
  # One BLAS thread: for matrices of a few hundred rows OpenBLAS' threads cost more
  # than they gain, and under CPU contention they made eigh 3-20x slower (measured).
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    # LAPACK's MRRR driver (evr) is ~1.5x faster than numpy's divide and conquer here.
    if n > d:
      evals, v = scipy.linalg.eigh(xc.T @ xc, driver="evr")
    else:
      evals, u = scipy.linalg.eigh(xc @ xc.T, driver="evr")
  order = np.argsort(evals)[::-1]
  sigma = np.sqrt(np.clip(evals[order], 0.0, None))
  tol = sigma[0] * 10 * np.sqrt(np.finfo(np.float64).eps * max(n, d)) if sigma.size else 0.0
  rank = min(int((sigma > tol).sum()), structural_rank)
  if n > d:
    return sigma, v[:, order], rank
  # Right singular vectors from the left ones: v_i = xc' u_i / sigma_i.
  u = u[:, order[:rank]]
  return sigma, (xc.T @ u) / sigma[:rank], rank


def fit(x, method: str = "ZCA", center: bool = True, reg: float | str = 0.0,
        epsilon: float | None = None, ddof: int = 1, feature_names=None,
        source: str = "controls") -> Sphering:
  """Fits a sphering on `x` [n, d] (the controls).

  method: ZCA, PCA, ZCA-cor, PCA-cor (the -cor variants standardise each feature
  with its population std first, as pycytominer; they require center=True).
  reg: λ added to the covariance eigenvalues, or "knee"; epsilon: pycytominer's ε
  on singular values instead (then reg must be 0). ddof: covariance denominator
  n - ddof in the λ convention (the paper's code used 0).
  """
  if method not in METHODS:
    raise InputError(source, f"sphering method {method!r} is not known", f"one of {METHODS}")
  if method.endswith("-cor") and not center:
    raise InputError(source, f"{method} without centring", "center=True for the -cor methods")
  if epsilon is not None and reg not in (0, 0.0):
    raise InputError(source, "both reg (λ on eigenvalues) and epsilon (ε on singular values)",
                     "one regularisation convention")
  x = np.asarray(x, np.float64)
  n, d = x.shape
  names = list(feature_names) if feature_names is not None else [f"feature {i}" for i in range(d)]
  if n < 2:
    raise InputError(source, f"{n} control rows to fit the sphering", "at least 2 control rows")
  tables.check_finite(x, names, source)
  mean = x.mean(axis=0) if center else np.zeros(d)
  scale = np.ones(d)
  if method.endswith("-cor"):
    scale = x.std(axis=0)
    if np.any(scale == 0):
      col = names[int(np.argmin(scale))]
      raise InputError(source, f"feature {col!r} is constant over the control rows",
                       "features with non-zero variance (drop constant features first)")
  xc = (x - mean) / scale
  sigma, v, rank = _spectrum(xc, min(n - 1 if center else n, d))
  if rank == 0:
    raise InputError(source, "the control rows are all identical", "varying control profiles")
  v_r = v[:, :rank]
  denom = n - (1 if epsilon is not None else ddof)
  evals = np.zeros(d)
  evals[:rank] = sigma[:rank] ** 2 / denom
  if reg == "knee":
    reg = knee_regularization(evals)
  elif isinstance(reg, str):
    raise InputError(source, f"reg {reg!r}", "a number or 'knee'")
  reg = float(reg)
  if epsilon is not None:
    f = np.sqrt(n - 1) / (sigma[:rank] + epsilon)
    f_null = np.sqrt(n - 1) / (sigma[rank - 1] + epsilon)
  else:
    f = 1.0 / np.sqrt(evals[:rank] + reg)
    f_null = 1.0 / np.sqrt(reg) if reg > 0 else 1.0 / np.sqrt(evals[rank - 1])
  if method.startswith("ZCA"):
    # Basis-free: the null space gets one scale, whatever basis an SVD picks for it:
    # W = V_r f V_r' + f_null (I - V_r V_r') = f_null I + V_r (f - f_null) V_r'.
    null_scale = f_null if rank < d else 0.0
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      w = (v_r * (f - null_scale)) @ v_r.T
    w[np.diag_indices(d)] += null_scale
  else:
    w = np.zeros((d, d))
    w[:, :rank] = v_r * f
    if rank < d:
      null = np.linalg.svd(np.eye(d) - v_r @ v_r.T)[0][:, :d - rank]
      w[:, rank:] = null * f_null
  return Sphering(mean, scale, w, evals, rank, reg, method)


def control_mask(df: pd.DataFrame, controls, source: str) -> np.ndarray:
  """Rows that are controls: a pandas query string or a boolean mask/column."""
  if isinstance(controls, str):
    try:
      # On the metadata only: pandas builds a resolver per column it is given.
      mask = df[tables.metadata_columns(df)].eval(controls).to_numpy(dtype=bool)
    except Exception as e:  # pandas raises many types for a bad expression
      raise InputError(source, f"controls query {controls!r} failed: {e}",
                       "a pandas query on Metadata_ columns") from None
  else:
    mask = np.asarray(controls, dtype=bool)
    if mask.shape != (len(df),):
      raise InputError(source, f"control mask of shape {mask.shape}",
                       f"one flag per row ({len(df)})")
  if not mask.any():
    raise InputError(source, f"no control rows match {controls!r}" if isinstance(controls, str)
                     else "no control rows", "at least 2 control rows to fit the sphering")
  return mask


def sphere(df: pd.DataFrame, controls, method: str = "ZCA", center: bool = True,
           reg: float | str = 0.0, epsilon: float | None = None, by: str | None = None,
           ddof: int = 1, source: str = "profiles") -> pd.DataFrame:
  """Sphered copy of a profile table: fit on `controls` rows, apply to all rows.

  controls: pandas query ("Metadata_control == True") or boolean mask. by: fit one
  sphering per value of this column (per plate or batch), on that group's own
  controls. PCA methods rename features PC1..PCd, as pycytominer.
  """
  features = tables.feature_columns(df)
  x = tables.feature_matrix(df, features, source)
  mask = control_mask(df, controls, source)
  out = np.empty_like(x)
  groups = [(None, np.ones(len(df), bool))]
  if by is not None:
    tables.require_columns(df, [by], source, "sphering `by`")
    groups = [(g, (df[by] == g).to_numpy()) for g in pd.unique(df[by])]
  for g, rows in groups:
    fit_rows = rows & mask
    if not fit_rows.any():
      raise InputError(source, f"{by} {g!r} has no control rows", "control rows in every group")
    s = fit(x[fit_rows], method, center, reg, epsilon, ddof, features,
            source if g is None else f"{source} ({by}={g})")
    out[rows] = s.apply(x[rows])
  names = features if method.startswith("ZCA") else [f"PC{i + 1}" for i in range(len(features))]
  meta = df[tables.metadata_columns(df)].reset_index(drop=True)
  return pd.concat([meta, pd.DataFrame(out, columns=names)], axis=1)
