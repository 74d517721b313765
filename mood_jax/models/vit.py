"""Vision Transformer encoder and classifier (pre-LN, as in ViT/BEiT/MAE).

Parameter layout, shared by every model that holds an encoder so that stages can
hand weights to each other by top-level key:
  encoder/   patch embedding, cls token, position embedding, blocks
  norm       final LayerNorm over all tokens (CLS pooling and MIM)
  fc_norm    LayerNorm of the mean patch token (mean pooling, MOOD's feature)
  head       classifier

BEiT's options are options of the same modules: q/v-only attention biases, LayerScale,
relative position bias (per block or shared) and no absolute position embedding.

Mixed precision: `dtype` is the compute dtype of the matmuls (patch embedding, attention,
MLP); params stay float32 and so does the residual stream, since adding float32 params (the
position embedding, LayerScale) promotes it. LayerNorms, pooled features and logits are
float32, so losses and OOD scores never see bfloat16 rounding.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from mood_jax import config_checks
from mood_jax.errors import UserError

# name -> (width, depth, mlp_dim, num_heads). `mu` is a micro size for CPU runs.
VARIANTS = {
    'mu': (96, 6, 384, 3),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
}


# The valid values of the encoder's and classifier's string options, checked here and by
# `check_config`.
POSEMBS = ('learn', 'sincos2d', 'none')
POOLS = ('mean', 'cls')
QKV_BIASES = ('qkv', 'qv', 'none')
REL_POS_BIASES = ('none', 'block', 'shared')
# 'auto' resolves by backend (`resolve_auto`); the modules take the others.
ATTENTIONS = ('auto', 'einsum', 'fused')


def _check_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
  """For the modules used directly; a run's config was checked first (`check_config`)."""
  if value not in valid:
    raise ValueError(f'unknown {option} {value!r}: use one of {", ".join(valid)}')


def check_every_patch_seen(rel_pos_bias: str) -> None:
  """Relative position bias is a table over the whole patch grid: an encoder that sees only
  some patches (MAE's random masking drops the rest) cannot use it."""
  if rel_pos_bias != 'none':
    raise UserError('model.rel_pos_bias needs every patch in the encoder, which MAE-style '
                    'random masking drops: use --config.pretrain.scheme=blockwise')


def parse_variant(variant: str) -> dict:
  """'S/16' -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  name, _, patch = variant.partition('/')
  if name not in VARIANTS or not patch.isdigit():
    raise UserError(
        f'unknown model variant {variant!r}: use <size>/<patch> with size in '
        f'{sorted(VARIANTS)} and an integer patch size, e.g. "Ti/4" or "B/16"')
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch))


def check_config(model_cfg, image_size: int) -> None:
  """`config.model`'s errors, before anything runs."""
  patch = parse_variant(model_cfg.variant)['patch_size']
  if patch < 1 or image_size % patch:
    # Flax's strided patch embedding would drop the last rows and columns without a word.
    config_checks.fail('model.variant', model_cfg.variant, f'has a patch size that does not '
                       f'divide data.image_size={image_size}', 'mu/4')
  for field, valid in (('posemb', POSEMBS), ('pool', POOLS), ('dtype', ('auto', *DTYPES)),
                       ('qkv_bias', QKV_BIASES), ('rel_pos_bias', REL_POS_BIASES),
                       ('attention', ATTENTIONS)):
    config_checks.choice(f'model.{field}', model_cfg[field], valid)
  if model_cfg.get('layer_scale') is not None:
    config_checks.at_least('model.layer_scale', model_cfg.layer_scale, 0, 0.1)


def sincos_posemb_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [grid*grid, width] (MAE/MoCo v3)."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got {width}')
  y, x = np.mgrid[:grid, :grid]
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum('m,d->md', y.ravel(), omega)
  x = np.einsum('m,d->md', x.ravel(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def posemb_grid(pos_embedding) -> int | None:
  """Side of the square patch grid of a learned [1, 1 + g*g, D] embedding, or None."""
  patches = pos_embedding.shape[1] - 1 if pos_embedding.ndim == 3 else 0
  grid = math.isqrt(patches)
  return grid if patches and grid * grid == patches else None


def resample_posemb(pos_embedding, grid: int):
  """A learned [1, 1 + g*g, D] position embedding for a `grid` x `grid` patch grid: the
  CLS entry kept, the patch entries resized as a g x g image (bicubic, as timm does when
  a ViT meets a new image size)."""
  old = posemb_grid(pos_embedding)
  width = pos_embedding.shape[-1]
  patches = pos_embedding[:, 1:].reshape(1, old, old, width)
  patches = jax.image.resize(patches, (1, grid, grid, width), method='bicubic')
  return jnp.concatenate([pos_embedding[:, :1], patches.reshape(1, grid * grid, width)], axis=1)


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT's [1 + g*g, 1 + g*g] index into a relative position bias table of
  (2g - 1)^2 patch offsets followed by 3 entries: CLS->patch, patch->CLS, CLS->CLS."""
  y, x = np.mgrid[:grid, :grid].reshape(2, -1)
  span = 2 * grid - 1
  offsets = (y[:, None] - y[None, :] + grid - 1) * span + (x[:, None] - x[None, :] + grid - 1)
  index = np.empty((1 + grid * grid,) * 2, np.int32)
  index[1:, 1:] = offsets
  index[0, :], index[:, 0], index[0, 0] = span * span, span * span + 1, span * span + 2
  return index


def resample_relpos_table(table, grid: int):
  """A [(2g' - 1)^2 + 3, heads] relative position bias table for a `grid` x `grid` patch
  grid: the offsets resized as a (2g' - 1)^2 image (bicubic), the 3 CLS entries kept."""
  span, heads = math.isqrt(table.shape[0] - 3), table.shape[1]
  offsets = table[:-3].reshape(1, span, span, heads)
  new_span = 2 * grid - 1
  offsets = jax.image.resize(offsets, (1, new_span, new_span, heads), method='bicubic')
  return jnp.concatenate([offsets.reshape(new_span * new_span, heads), table[-3:]], axis=0)


class RelativePositionBias(nn.Module):
  """Learned attention bias [heads, 1 + g*g, 1 + g*g] indexed by relative patch offset."""
  num_heads: int
  grid: int

  @nn.compact
  def __call__(self):
    span = 2 * self.grid - 1
    table = self.param('relative_position_bias_table', nn.initializers.zeros,
                       (span * span + 3, self.num_heads))
    return jnp.moveaxis(table[relative_position_index(self.grid)], -1, 0)


def gelu(x):
  """Exact GELU, x * Phi(x), written with erf: the same function as jax.nn.gelu(approximate=
  False), whose erfc form XLA:CPU lowers to a slower polynomial (the whole train step was 7%
  faster on CPU this way, benchmarks/train_step.py)."""
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example. `rate` may be traced
  (a scanned block's rate)."""
  rate: float | jax.Array

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or (isinstance(self.rate, float) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, 0.0)


class SplitHeads(nn.Module):
  """[B, T, W] -> [k, B, heads, T, W / heads] (`heads_first`, as the einsum attention uses
  it) or [k, B, T, heads, W / heads] (as jax.nn.dot_product_attention takes it): nn.Dense(k *
  W)'s params and product, laid out by the matmul itself.

  Folding the layout into the matmul's einsum, instead of reshaping and transposing the
  Dense output, saved a quarter of attention's time (forward and backward) on CPU.
  """
  num_outputs: int  # k, e.g. 3 for q, k, v
  num_heads: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  heads_first: bool = True

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (width, self.num_outputs * width))
    bias = (self.param('bias', nn.initializers.zeros, (self.num_outputs * width,))
            if self.use_bias else jnp.zeros((self.num_outputs * width,)))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    shape = (self.num_outputs, self.num_heads, width // self.num_heads)
    layout = 'kbhtd' if self.heads_first else 'kbthd'
    out = jnp.einsum(f'btw,wkhd->{layout}', x, kernel.reshape(width, *shape))
    return out + bias.reshape(shape[0], 1, *_over_tokens(*shape[1:], self.heads_first))


def _over_tokens(heads: int, head_dim: int, heads_first: bool) -> tuple[int, ...]:
  """The shape that adds a [heads * head_dim] bias to each token of a heads-first
  [..., heads, T, head_dim] or a tokens-first [..., T, heads, head_dim] tensor."""
  return (heads, 1, head_dim) if heads_first else (1, heads, head_dim)


class MergeHeads(nn.Module):
  """[B, heads, T, D] (`heads_first`) or [B, T, heads, D] -> [B, T, heads * D] through
  nn.Dense(heads * D)'s params (see SplitHeads)."""
  dtype: jnp.dtype = jnp.float32
  heads_first: bool = True

  @nn.compact
  def __call__(self, x):
    heads, head_dim = (x.shape[1], x.shape[3]) if self.heads_first else x.shape[2:]
    width = heads * head_dim
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (width, width))
    bias = self.param('bias', nn.initializers.zeros, (width,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    layout = 'bhtd' if self.heads_first else 'bthd'
    return jnp.einsum(f'{layout},hdw->btw', x, kernel.reshape(heads, head_dim, width)) + bias


def fused_implementation(backend: str, dtype, head_dim: int) -> str | None:
  """jax.nn.dot_product_attention's `implementation`: cuDNN's fused (flash) kernel where it
  runs (a GPU, 16-bit inputs, head_dim a multiple of 8 up to 128: the limits of
  jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention on pre-Hopper GPUs), else
  None: XLA's own attention (on TPU and CPU the only one JAX offers there)."""
  if (backend == 'gpu' and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0 and head_dim <= 128):
    return 'cudnn'
  return None


def fused_attention(q, k, v, bias=None, *, implementation: str | None = None,
                    pad_to: int = 1):
  """softmax(q k^T / sqrt(D) + bias) v through jax.nn.dot_product_attention, the logits and
  softmax in float32; q, k, v [B, T, heads, D], `bias` [heads, T, T] (relative position
  bias). `pad_to`: the tokens padded to a multiple of it, the padded keys masked out by
  `key_value_seq_lengths` and the padded queries dropped, since cuDNN's kernel trains with a
  bias only on an even token count (BEiT at 224 px has 197 tokens)."""
  tokens = q.shape[1]
  padding = -tokens % pad_to
  lengths = None
  if padding:
    q, k, v = (jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) for x in (q, k, v))
    bias = None if bias is None else jnp.pad(bias, ((0, 0), (0, padding), (0, padding)))
    lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
  if bias is not None:
    # XLA's path adds the bias to float32 logits; cuDNN's takes it in the inputs' dtype.
    bias = bias[None].astype(q.dtype if implementation == 'cudnn' else jnp.float32)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :tokens]


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; softmax in float32.

  qkv_bias: 'qkv' (one fused bias), 'qv' (BEiT: q and v biases, none on k) or 'none'.
  `bias` ([heads, T, T]) is added to the attention logits (relative position bias);
  `rel_pos_grid` gives this block its own relative position bias for that patch grid.
  attention: 'einsum' (the logits [B, heads, T, T] written out by our einsums) or 'fused'
  (`fused_attention`); the same params and, up to float rounding, the same function.
  """
  num_heads: int
  qkv_bias: str = 'qkv'
  rel_pos_grid: int | None = None
  dtype: jnp.dtype = jnp.float32
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x, bias=None):
    _check_choice('qkv_bias', self.qkv_bias, QKV_BIASES)
    _check_choice('attention', self.attention, ATTENTIONS[1:])
    width = x.shape[-1]
    head_dim = width // self.num_heads
    heads_first = self.attention == 'einsum'
    q, k, v = SplitHeads(3, self.num_heads, use_bias=self.qkv_bias == 'qkv', dtype=self.dtype,
                         heads_first=heads_first, name='qkv')(x)
    if self.qkv_bias == 'qv':
      per_head = _over_tokens(self.num_heads, head_dim, heads_first)
      q_bias = self.param('q_bias', nn.initializers.zeros, (width,))
      v_bias = self.param('v_bias', nn.initializers.zeros, (width,))
      q = q + q_bias.reshape(per_head).astype(q.dtype)
      v = v + v_bias.reshape(per_head).astype(v.dtype)
    if self.rel_pos_grid is not None:
      own = RelativePositionBias(self.num_heads, self.rel_pos_grid, name='rel_pos_bias')()
      bias = own if bias is None else bias + own
    if self.attention == 'fused':
      implementation = fused_implementation(jax.default_backend(), q.dtype, head_dim)
      out = fused_attention(q, k, v, bias, implementation=implementation,
                            pad_to=2 if implementation == 'cudnn' else 1)
      return MergeHeads(self.dtype, heads_first=False, name='proj')(out)
    logits = jnp.einsum('bhtd,bhsd->bhts', q * jnp.asarray(head_dim**-0.5, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return MergeHeads(self.dtype, name='proj')(jnp.einsum('bhts,bhsd->bhtd', probs, v))


class Block(nn.Module):
  """Pre-LN transformer block; `layer_scale` (an init value, e.g. BEiT's 0.1) scales each
  residual branch by a learned per-channel gamma (CaiT's LayerScale)."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  qkv_bias: str = 'qkv'
  layer_scale: float | None = None
  rel_pos_grid: int | None = None
  dtype: jnp.dtype = jnp.float32
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rel_pos_bias=None):
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.qkv_bias, self.rel_pos_grid, self.dtype, self.attention,
                  name='attn')(nn.LayerNorm(name='norm1')(x), rel_pos_bias)
    x = x + drop(self._scale('gamma_1', y), deterministic)
    # The MLP sees tokens as rows of one matrix: XLA:CPU's 2-D matmuls (forward and
    # backward) ran 12% faster than the same ones batched over [B, T].
    y = nn.LayerNorm(name='norm2')(x).reshape(-1, x.shape[-1])
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1')(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(gelu(y)).reshape(x.shape)
    return x + drop(self._scale('gamma_2', y), deterministic)

  def _scale(self, name: str, y):
    if self.layer_scale is None:
      return y
    return y * self.param(name, nn.initializers.constant(self.layer_scale), (y.shape[-1],))


class Encoder(nn.Module):
  """Patchify, embed, prepend CLS and run the blocks; returns raw tokens [B, 1+n, D].

  `mask` ([B, N] bool) replaces masked patch embeddings by a learned mask token
  (BEiT/SimMIM); `keep_ids` ([B, n] int) keeps only those patches (MAE). Both
  keep shapes static, so masking never retraces.

  posemb: 'learn', 'sincos2d' or 'none' (BEiT with relative position bias only).
  rel_pos_bias: 'none', 'block' (one table per block) or 'shared' (one for all blocks).
  remat: recompute each block's activations in the backward pass instead of keeping them
  (less memory, about a third more compute).
  scan: run the blocks as one `lax.scan` over their stacked params, so XLA compiles one
  block instead of `depth` (see _scan_blocks).
  attention: 'einsum' or 'fused' (see Attention).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  posemb: str = 'learn'
  drop_path: float = 0.0
  qkv_bias: str = 'qkv'
  layer_scale: float | None = None
  rel_pos_bias: str = 'none'
  dtype: jnp.dtype = jnp.float32
  attention: str = 'einsum'
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, images, *, mask=None, keep_ids=None, train: bool = False, edit=None):
    """`edit(block index, tokens) -> tokens`, if given, changes what each block passes on
    (RankFeat's); each block's output is sown as intermediates 'blockNN' (kept only when
    `apply` is given mutable=['intermediates']: then `named_layers` reads them)."""
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', dtype=self.dtype, name='patch_embed')(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    if mask is not None:
      mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    cls_pos, patch_pos = self._posemb(grid_h)
    x = x + patch_pos
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
    cls = self.param('cls', nn.initializers.normal(1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls + cls_pos, (batch, 1, self.width)), x], axis=1)
    _check_choice('rel_pos_bias', self.rel_pos_bias, REL_POS_BIASES)
    if keep_ids is not None:
      check_every_patch_seen(self.rel_pos_bias)
    shared = (RelativePositionBias(self.num_heads, grid_h, name='rel_pos_bias')()
              if self.rel_pos_bias == 'shared' else None)
    rates = np.linspace(0.0, self.drop_path, self.depth)  # linearly increasing, as in DeiT
    # Argument 2 (`deterministic`; `self` is 0) is a Python bool: static under remat.
    block = functools.partial(nn.remat(Block, static_argnums=(2,)) if self.remat else Block,
                              self.num_heads, self.mlp_dim, qkv_bias=self.qkv_bias,
                              layer_scale=self.layer_scale, dtype=self.dtype,
                              attention=self.attention, rel_pos_grid=grid_h if self.rel_pos_bias == 'block' else None)
    if self.scan and not self.is_initializing():
      return self._scan_blocks(block, x, rates, train, shared, edit)
    for i in range(self.depth):
      x = block(drop_path=float(rates[i]), name=f'block{i}')(x, not train, shared)
      self.sow('intermediates', f'block{i:02d}', x)
      if edit is not None:
        x = edit(i, x)
    return x

  def _scan_blocks(self, block, x, rates, train: bool, shared_bias, edit=None):
    """The blocks as a `lax.scan` of one unbound Block over their params stacked on a new
    leading axis. The stored params keep the per-block layout (block0, block1, ...), so
    checkpoints, layer decay, weight masks and sharding rules are the same with or without
    scan; the price is one copy of the block params per step, made by the stack.
    Drop path draws its own key per block here: with drop_path > 0 the masks differ from
    the unrolled loop's (the same distribution), and with it off the results agree."""
    params = self.variables['params']
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers),
                           *(params[f'block{i}'] for i in range(self.depth)))
    drop = train and self.drop_path > 0
    keys = jax.random.split(self.make_rng('dropout'), self.depth) if drop else None

    collect = self.is_mutable_collection('intermediates')

    def body(x, layer):
      index, layer_params, rate, key = layer
      out = block(drop_path=rate if drop else 0.0, parent=None).apply(
          {'params': layer_params}, x, not train, shared_bias,
          rngs={'dropout': key} if drop else None)
      return out if edit is None else edit(index, out), out if collect else None

    x, outs = jax.lax.scan(body, x, (jnp.arange(self.depth), stacked,
                                     jnp.asarray(rates, jnp.float32), keys))
    for i in range(self.depth if collect else 0):
      self.sow('intermediates', f'block{i:02d}', outs[i])
    return x

  def _posemb(self, grid: int):
    if self.posemb == 'learn':
      pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                       (1, 1 + grid * grid, self.width))
      return pos[:, :1], pos[:, 1:]
    if self.posemb == 'sincos2d':
      return jnp.zeros((1, 1, self.width)), jnp.asarray(sincos_posemb_2d(grid, self.width))[None]
    if self.posemb == 'none':
      return jnp.zeros((1, 1, self.width)), jnp.zeros((1, 1, self.width))
    _check_choice('posemb', self.posemb, POSEMBS)


class Classifier(nn.Module):
  """ViT classifier; `__call__` returns (logits, aux).

  aux['features'] is the pooled feature the feature-space scorers use:
  pool='mean' -> LayerNorm of the mean patch token (`fc_norm`, MOOD's choice),
  pool='cls'  -> the final-LayerNorm CLS token.
  """
  num_classes: int
  encoder: Encoder
  pool: str = 'mean'

  @nn.compact
  def __call__(self, images, *, train: bool = False, edit=None):
    tokens = self.encoder(images, train=train, edit=edit)
    if self.pool == 'mean':
      features = nn.LayerNorm(name='fc_norm')(tokens[:, 1:].mean(axis=1))
    elif self.pool == 'cls':
      features = nn.LayerNorm(name='norm')(tokens)[:, 0]
    else:
      _check_choice('pool', self.pool, POOLS)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(features)
    return logits, {'features': features, 'pre_logits': features, 'tokens': tokens}


def named_layers(aux: dict, intermediates) -> dict:
  """A classifier's named features, as big_vision's ViT `out` dict: 'encoder/blockNN'
  ([B, tokens, D], each block's output), 'encoder' (the last block's, before the final
  norm), and 'pre_logits' ([B, D], the feature the head reads: MOOD's)."""
  blocks = intermediates['encoder']
  return {**{f'encoder/{name}': values[0] for name, values in sorted(blocks.items())},
          'encoder': aux['tokens'], 'pre_logits': aux['pre_logits']}


# The encoder's BEiT options and their defaults, which a config.model may leave out.
ENCODER_OPTIONS = dict(qkv_bias='qkv', layer_scale=None, rel_pos_bias='none')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# What 'auto' means for model.dtype and model.attention, by backend. On CPU: float32, since
# XLA:CPU has no fast bfloat16 matmuls, and the einsum attention, which ran the train step
# faster there than jax.nn.dot_product_attention (README, "Performance on accelerators").
AUTO = {'dtype': {'cpu': 'float32', 'accelerator': 'bfloat16'},
        'attention': {'cpu': 'einsum', 'accelerator': 'fused'}}


def resolve_auto(field: str, value: str, backend: str | None = None) -> str:
  """`value` of model.`field` ('dtype' or 'attention'), with 'auto' replaced by the choice
  for `backend` (default: JAX's default backend)."""
  if value != 'auto':
    return value
  backend = backend or jax.default_backend()
  return AUTO[field]['cpu' if backend == 'cpu' else 'accelerator']


def compute_settings(model_cfg, backend: str | None = None) -> dict[str, str]:
  """{'dtype': ..., 'attention': ...} as a model of `config.model` runs on `backend`."""
  return {field: resolve_auto(field, model_cfg.get(field, 'auto' if field == 'attention'
                                                   else 'float32'), backend)
          for field in AUTO}


def compute_record(model_cfg) -> dict[str, str]:
  """How a model of `config.model` runs in this process: {'backend', 'dtype', 'attention'}."""
  return {'backend': jax.default_backend(), **compute_settings(model_cfg)}


def encoder_from_config(model_cfg, drop_path: float = 0.0) -> Encoder:
  """The encoder that `config.model` describes, its 'auto' options resolved for this
  backend."""
  options = {name: model_cfg.get(name, default) for name, default in ENCODER_OPTIONS.items()}
  settings = compute_settings(model_cfg)
  return Encoder(**parse_variant(model_cfg.variant), posemb=model_cfg.posemb,
                 drop_path=drop_path, dtype=DTYPES[settings['dtype']],
                 attention=settings['attention'], remat=model_cfg.get('remat', False),
                 scan=model_cfg.get('scan', False), **options)


# --- Loading pretrained weights into a model's params. ---

def _resamplable(saved, fresh) -> bool:
  """Both learned position embeddings of square patch grids, of the same width."""
  return (posemb_grid(saved) is not None and posemb_grid(fresh) is not None
          and saved.shape[-1] == fresh.shape[-1])


def merge_pretrained(fresh: dict, pretrained: dict, source: str = 'pretrain',
                     with_head: bool = False) -> dict:
  """Fresh classifier params with every top-level module the pretrained model shares
  (encoder, and `norm` for CLS pooling) copied in; the head stays fresh unless `with_head`
  (a converted classifier scored as it is).

  A learned position embedding from another image size is resampled to this patch grid.
  Any other param that does not fit, and any shared one the model lacks, is a UserError
  listing them all. Pretraining-only params (the encoder's mask token) are left out.
  """
  shared = [name for name in fresh if (with_head or name != 'head') and name in pretrained]
  want = traverse_util.flatten_dict({name: fresh[name] for name in shared}, sep='/')
  saved = traverse_util.flatten_dict({name: pretrained[name] for name in shared}, sep='/')
  loaded = {}
  misfits = [f'{path}: not in the model' for path in saved
             if path not in want and not path.endswith('mask_token')]
  for path, value in want.items():
    if path not in saved:
      misfits.append(f'{path}: not in the checkpoint')
    elif saved[path].shape == value.shape:
      loaded[path] = saved[path]
    elif path.endswith('pos_embedding') and _resamplable(saved[path], value):
      old, new = posemb_grid(saved[path]), posemb_grid(value)
      loaded[path] = resample_posemb(saved[path], new)
      logging.info('resampled %s from %dx%d to %dx%d patches', path, old, old,
                   new, new)
    else:
      misfits.append(f'{path}: model {value.shape}, checkpoint {saved[path].shape}')
  if misfits:
    raise UserError(f'the {source} checkpoint does not fit the model config: '
                    f'{"; ".join(misfits)}. Use the model options it was made with')
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(fresh, sep='/'), **loaded}, sep='/')
