"""Backend kernels beneath the models, and the one policy that chooses them per run.

- `policy`: what ``auto`` means on this backend (convolution implementation, compute
  dtype, member strategy), resolved once per run and logged in one line;
- `conv`: 2-D convolutions as XLA convolutions, im2col matrix products or Winograd
  (dense, grouped and depthwise), bfloat16 products accumulating in float32;
- `pool`: max pooling by strided views, with a gradient XLA:CPU runs fast;
- `cpu`: the host's CPU flags and memory.

`ops` imports nothing of cellrep but `errors`.
"""
