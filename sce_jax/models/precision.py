"""Mixed precision whose weight gradients are float32 before they are summed (docs/SCE.md 5).

A bfloat16 layer casts its float32 weight to bfloat16, so autodiff computes the weight's
gradient as a bfloat16 convolution (or matmul) over the batch and casts it to float32 last. On a
batch-sharded mesh that convolution yields one partial sum per device, and XLA's SPMD
partitioner all-reduces the partials where they arise: in bfloat16, before the cast. The
authors' mixed precision sums gradients in float32. Here the weight reaches the layer in
float32 and a custom VJP computes its gradient from the bfloat16 operands with a float32 result
(`preferred_element_type`), so the partials, and their all-reduce, are float32; the input's
gradient and the forward pass are unchanged. A bias (only the CIFAR projector's last layer has
one) stays float32 too: it is added in float32, and its gradient is summed in float32.

`conv_options(dtype)` and `dense_options(dtype)` are the nn.Conv and nn.Dense fields that do
this; float32 layers get none and stay plain Flax, and so does every layer with `enabled` False
(model.f32_weight_grads=False: the plain Flax path, to compare their cost).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _apply(op, weight_grad, x, w):
  """op(x, w cast to x's dtype); the gradient of w is weight_grad(x, cotangent), float32."""
  return op(x, w.astype(x.dtype))


def _apply_fwd(op, weight_grad, x, w):
  return _apply(op, weight_grad, x, w), (x, w)


def _apply_bwd(op, weight_grad, residuals, g):
  x, w = residuals
  _, pullback = jax.vjp(lambda x: op(x, w.astype(x.dtype)), x)
  return pullback(g)[0], weight_grad(x, g)


_apply.defvjp(_apply_fwd, _apply_bwd)


def _cast_inputs(inputs, kernel, bias=None, *, dtype=None):
  """Flax's `promote_dtype` slot: the inputs go to the computation dtype, the weights stay."""
  return jnp.asarray(inputs, dtype), kernel, bias


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """lax.conv_general_dilated of a half-precision lhs with a float32 kernel (nn.Conv's call).

  The kernel's gradient is JAX's own transpose of the convolution (lax's
  `_conv_general_dilated_transpose_rhs` for undilated, ungrouped convolutions) with a float32
  result.
  """
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or (
      feature_group_count != 1):
    raise NotImplementedError("float32 weight gradients: dilated or grouped convolutions")
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  op = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                         padding=padding, dimension_numbers=dn, precision=precision)

  def weight_grad(x, g):
    if not g.size:  # An empty output (the kernel overhangs the padded input): lax's zeros.
      return jnp.zeros(rhs.shape, jnp.float32)
    swap = lambda spec: (spec[1], spec[0], *spec[2:])
    lhs_spec, rhs_spec, out_spec = dn
    sizes = lambda shape, spec: [shape[d] for d in spec[2:]]
    x_size, k_size, g_size = sizes(x.shape, lhs_spec), sizes(rhs.shape, rhs_spec), sizes(
        g.shape, out_spec)
    pads = (lax.padtype_to_pads(x_size, k_size, window_strides, padding)
            if isinstance(padding, str) else padding)
    # Output positions o of stride s cover (o - 1) * s + 1 rows; the window is the kernel size.
    pads = [(lo, (o - 1) * s + k - i - lo)
            for (lo, _), i, k, o, s in zip(pads, x_size, k_size, g_size, window_strides)]
    return lax.conv_general_dilated(
        x, g, window_strides=(1,) * len(pads), padding=pads, rhs_dilation=window_strides,
        dimension_numbers=lax.ConvDimensionNumbers(swap(lhs_spec), swap(out_spec),
                                                   swap(rhs_spec)),
        precision=precision, preferred_element_type=jnp.float32)

  return _apply(op, weight_grad, lhs, rhs)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's lax.dot_general (last axis of lhs with the kernel's first) of a half-precision
  lhs with a float32 kernel; the kernel's gradient is lhs^T g over all leading axes, float32."""
  del preferred_element_type  # nn.Dense passes none.
  if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(
      dimension_numbers[1]):
    raise NotImplementedError(f"float32 weight gradients: dot_general {dimension_numbers}")
  op = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers,
                         precision=precision)
  batch = tuple(range(lhs.ndim - 1))
  weight_grad = lambda x, g: lax.dot_general(x, g, ((batch, batch), ((), ())),
                                             precision=precision,
                                             preferred_element_type=jnp.float32)
  return _apply(op, weight_grad, lhs, rhs)


def _options(dtype, enabled, **op):
  if not enabled or jnp.dtype(dtype) == jnp.float32:
    return {}
  return dict(promote_dtype=_cast_inputs, **op)


def conv_options(dtype, enabled=True):
  """nn.Conv fields for float32 weight gradients in a `dtype` network (none for float32)."""
  return _options(dtype, enabled, conv_general_dilated=conv_general_dilated)


def dense_options(dtype, enabled=True):
  """nn.Dense fields for float32 weight gradients in a `dtype` network (none for float32)."""
  return _options(dtype, enabled, dot_general=dot_general)
