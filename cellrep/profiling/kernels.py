"""Jitted block kernels: pair masks, similarities and the ranks of positives.

A block is `B` queries against `W` candidate columns; shapes are static so one
compilation serves every block. The memory a block needs is O(B * W), never N^2.

Ranking follows copairs exactly. copairs sorts each query's list by `1 - sim`
(float32) with a stable sort in which positives were listed before negatives, so
at equal `1 - sim` a positive ranks ahead of a negative. We pack that rule into
one int32 sort key: the order-preserving integer image of `1 - sim`, times two,
plus the label bit (0 positive, 1 negative). A single integer sort then gives
copairs' order, ties included. The similarities are float32 matmuls rather than
copairs' elementwise sums; the two can differ in the last bit, which reorders two
candidates only when their similarities lie within float32 rounding (~1e-7) of
each other.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DISTANCES = ("cosine", "correlation", "euclidean")

INVALID = np.iinfo(np.int32).max  # odd, so it reads as "negative" and sorts last


def _ordered_int(x: np.ndarray) -> np.ndarray:
  bits = np.asarray(x, np.float32).view(np.int32)
  return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


# `1 - sim` lies in [0, 2] for cosine and correlation and in [0, 1) for euclidean,
# up to rounding; [-0.5, 2.5] keeps a margin and its integer image, halved around
# its centre, leaves one bit for the label inside int32.
_KEY_LO, _KEY_HI = -0.5, 2.5
_CENTER = int((int(_ordered_int(_KEY_LO)) + int(_ordered_int(_KEY_HI))) // 2)


def prepare(feats: np.ndarray, distance: str):
  """Row-wise preparation so that a block's similarity is one matmul.

  Returns (rows [N, D] float32 on device, squared norms [N] float32).
  cosine: rows scaled to unit norm; correlation: rows centred, then unit norm
  (copairs' `pairwise_corr`); euclidean: rows as they are.
  """
  x = jnp.asarray(feats, jnp.float32)
  if distance == "correlation":
    x = x - x.mean(axis=1, keepdims=True)
  if distance in ("cosine", "correlation"):
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  return x, jnp.sum(x * x, axis=1)


def similarity(xq, nq, xc, nc, distance: str):
  """[B, W] float32 similarities: cosine / correlation, or 1 / (1 + euclidean)."""
  dots = jnp.dot(xq, xc.T, precision=lax.Precision.HIGHEST)
  if distance == "euclidean":
    d2 = nq[:, None] + nc[None, :] - 2.0 * dots
    return 1.0 / (1.0 + jnp.sqrt(jnp.maximum(d2, 0.0)))
  return dots


def pair_masks(codes, labels, q, q_label, q_ok, c, c_ok, rules):
  """Positive and negative masks [B, W] of queries `q` against columns `c`.

  codes: [N, C] int32; labels: [N, L] float32 multi-hot (or [N, 1] unused);
  q, q_label, q_ok: [B] query rows, their label (-1: none) and validity;
  c, c_ok: [W] candidate rows and validity. `rules` is the static tuple
  (pos_same, pos_diff, neg_same, neg_diff, multilabel, neg_no_shared_label).
  """
  pos_same, pos_diff, neg_same, neg_diff, multilabel, no_shared = rules
  cq, cc = codes[q], codes[c]
  ok = q_ok[:, None] & c_ok[None, :] & (q[:, None] != c[None, :])

  def rule(same, diff):
    m = ok
    for i in same:
      m = m & (cq[:, i][:, None] == cc[:, i][None, :])
    for i in diff:
      m = m & (cq[:, i][:, None] != cc[:, i][None, :])
    return m

  pos, neg = rule(pos_same, pos_diff), rule(neg_same, neg_diff)
  if multilabel:
    lc = labels[c]
    pos = pos & (jnp.take(lc.T, jnp.maximum(q_label, 0), axis=0) > 0.5)
  if no_shared:
    shared = jnp.dot(labels[q], labels[c].T) > 0.5
    neg = neg & ~shared
  return pos, neg


@functools.partial(jax.jit, static_argnames=("rules",))
def count_block(codes, labels, q, q_label, q_ok, rules):
  """Per query: positives, negatives, pairs that are both [B] int32 (multilabel rules)."""
  n = codes.shape[0]
  c = jnp.arange(n, dtype=jnp.int32)
  pos, neg = pair_masks(codes, labels, q, q_label, q_ok, c, jnp.ones(n, bool), rules)
  count = lambda m: jnp.sum(m, axis=1, dtype=jnp.int32)
  return count(pos), count(neg), count(pos & neg)


@functools.partial(jax.jit, static_argnames=("rules",))
def candidate_union(codes, labels, q, q_label, q_ok, rules):
  """[N] bool: rows that are a positive or a negative of at least one query of the block."""
  n = codes.shape[0]
  c = jnp.arange(n, dtype=jnp.int32)
  pos, neg = pair_masks(codes, labels, q, q_label, q_ok, c, jnp.ones(n, bool), rules)
  return jnp.any(pos | neg, axis=0)


def pack_keys(sim, label, mask):
  """int32 sort keys: order-preserving image of float32(1 - sim), label bit appended.

  label: 0 (positive) or 1 (negative), scalar or [B, W]; masked-out entries get INVALID.
  """
  key = jnp.clip(1.0 - sim.astype(jnp.float32), _KEY_LO, _KEY_HI)
  bits = lax.bitcast_convert_type(key, jnp.int32)
  ordered = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  return jnp.where(mask, (ordered - _CENTER) * 2 + label, INVALID)


def positive_ranks_host(packed: np.ndarray, p_max: int) -> np.ndarray:
  """[B, p_max] int32 1-based ranks of each query's positives, ascending (0 pads).

  numpy's SIMD int32 sort is ~8x faster than XLA:CPU's comparator sort, so on CPU
  the sort runs here, between two jitted steps; the positions of the positives
  come out of one vectorised pass.
  """
  s = np.sort(packed, axis=1)
  pos = (s & 1) == 0
  rows, cols = np.nonzero(pos)
  counts = pos.sum(axis=1)
  k = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
  out = np.zeros((packed.shape[0], p_max), np.int32)
  keep = k < p_max
  out[rows[keep], k[keep]] = cols[keep] + 1
  return out


def positive_ranks_device(packed, p_max: int):
  """`positive_ranks_host` in XLA (GPU/TPU, where sort and cumsum are fast)."""
  s = lax.sort(packed, dimension=1, is_stable=False)
  tp = jnp.cumsum((s & 1) == 0, axis=1, dtype=jnp.int32)
  k = jnp.arange(1, p_max + 1, dtype=jnp.int32)
  idx = jax.vmap(lambda row: jnp.searchsorted(row, k, side="left"))(tp)
  return jnp.where(k[None, :] <= tp[:, -1:], idx + 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("rules", "distance", "dual"))
def packed_block(x, sqn, codes, labels, q, q_label, q_ok, c, c_ok, *, rules, distance, dual):
  """[B, W] (or [B, 2W] when `dual`) int32 sort keys of queries `q` against columns `c`.

  `dual` lists a pair that is both positive and negative twice, as copairs does
  (its positive copy ahead of its negative copy); it doubles the sort width.
  """
  pos, neg = pair_masks(codes, labels, q, q_label, q_ok, c, c_ok, rules)
  sim = similarity(x[q], sqn[q], x[c], sqn[c], distance)
  if dual:
    return jnp.concatenate([pack_keys(sim, 0, pos), pack_keys(sim, 1, neg)], axis=1)
  return pack_keys(sim, jnp.where(pos, 0, 1), pos | neg)


@functools.partial(jax.jit, static_argnames=("rules", "distance", "dual", "p_max"))
def rank_block(x, sqn, codes, labels, q, q_label, q_ok, c, c_ok, *, rules, distance, dual,
               p_max):
  """Ranks [B, p_max] of each query's positives, entirely in XLA."""
  packed = packed_block(x, sqn, codes, labels, q, q_label, q_ok, c, c_ok, rules=rules,
                        distance=distance, dual=dual)
  return positive_ranks_device(packed, p_max)
