"""The packed int32 sort key orders exactly as copairs' lexsort of (1 - sim, label)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cellrep.profiling import kernels


def test_packed_order_is_copairs_order():
  rng = np.random.default_rng(0)
  sim = rng.choice(np.array([-1.0, -0.3, 0.0, 1e-8, 0.25, 0.5, 1.0, 1.0000001], np.float32),
                   size=(4, 64))
  sim = np.concatenate([sim, rng.uniform(-1, 1, size=(4, 64)).astype(np.float32)], axis=1)
  label = rng.integers(0, 2, size=sim.shape)
  packed = np.asarray(kernels.pack_keys(jnp.asarray(sim), jnp.asarray(label),
                                        jnp.ones(sim.shape, bool)))
  for row in range(sim.shape[0]):
    # copairs: stable lexsort by 1 - sim (float32) with positives listed first.
    first = np.argsort(label[row], kind="stable")
    expect = first[np.argsort((1 - sim[row])[first], kind="stable")]
    got = np.argsort(packed[row], kind="stable")
    np.testing.assert_array_equal(label[row][got], label[row][expect])
    np.testing.assert_array_equal((1 - sim[row])[got], (1 - sim[row])[expect])
  assert (packed < kernels.INVALID).all()


def test_positive_ranks_host_and_device_agree():
  rng = np.random.default_rng(1)
  packed = rng.integers(-2**30, 2**30, size=(6, 50)).astype(np.int32)
  packed[:, ::7] = kernels.INVALID
  host = kernels.positive_ranks_host(packed, 32)
  device = np.asarray(kernels.positive_ranks_device(jnp.asarray(packed), 32))
  np.testing.assert_array_equal(host, device)
