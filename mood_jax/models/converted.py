"""Public ViT/BEiT weights (timm or Hugging Face state dicts) as params of our model: the
library part of `python -m mood_jax.convert` (mood_jax/convert.py), and `load`, which puts
a converted checkpoint into a model's fresh params.

A timm `vit_*` / `beit_*` / `beitv2_*` state dict (`.safetensors`, or a PyTorch
`.pth`/`.pt`/`.bin` loaded with `weights_only`, never running code from the file; BEiT's
release files, with their argparse Namespace and DDP's `module.` prefix, load too) becomes a
directory: an orbax checkpoint of our param tree and the model options to run it with.

The architecture options (q/v biases, LayerScale, relative position bias, absolute
position embedding, pooling) are read off the names in the file; the variant gives the
sizes. Position embeddings and relative position tables are resampled to the image size.
`expand_shared_rel_pos` gives every block its own copy of a BEiT pretraining checkpoint's
shared relative position table, as MOOD does before fine-tuning.
Every name and shape must fit the variant: the error lists the file's unmatched names,
the model's missing params and the shape conflicts, so nothing loads partially. Left out
by design: the head unless kept (fine-tuning trains a fresh one), BEiT pretraining's mask
token and MIM head, and recomputed relative position index buffers.
"""

import argparse
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mood_jax.errors import UserError
from mood_jax.models import vit

# Left out: buffers that timm recomputes and some files still carry (so do we), and the
# BEiT pretraining checkpoints' MIM-only params.
_LEFT_OUT = re.compile(r'(^|\.)relative_position_index$|^mask_token$|^lm_head\.')
_PTH_SUFFIXES = ('.pth', '.pt', '.bin')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """name -> float32 array, from a `.safetensors` or `.pth` file."""
  if not os.path.isfile(path):
    raise UserError(f'--src {path!r} is not a file')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # only conversion needs it
    except ImportError:
      raise UserError('reading .safetensors needs the safetensors package: '
                      'pip install safetensors') from None
    try:
      state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged header
      raise UserError(f'cannot read {path} as safetensors: {e}') from None
  elif path.endswith(_PTH_SUFFIXES):
    try:
      import torch  # only .pth files need torch
    except ImportError:
      raise UserError('reading .pth files needs torch: pip install torch, or convert a '
                      '.safetensors file') from None
    try:
      # BEiT's utils.save_model stores its argparse Namespace beside the weights, which
      # weights_only refuses; that one plain-data type is allowed, nothing else.
      with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and torch errors, or a file that needs code to load
      raise UserError(f'cannot read {path} as a PyTorch state dict: {e}') from None
    for wrapper in ('model', 'module', 'state_dict'):  # training scripts nest it
      state = state.get(wrapper, state) if isinstance(state, dict) else state
    # DistributedDataParallel's prefix, which MOOD's eval_with_features.py strips too.
    state = {name.removeprefix('module.'): value.float().numpy()
             for name, value in state.items() if isinstance(value, torch.Tensor)}
  else:
    raise UserError(f'--src {path!r}: use a .safetensors, .pth, .pt or .bin file')
  return {name: np.asarray(value, np.float32) for name, value in state.items()}


_SHARED_TABLE = 'rel_pos_bias.relative_position_bias_table'


def expand_shared_rel_pos(state: dict) -> dict:
  """`state` with its shared relative position table copied into every block, so that each
  block fine-tunes its own (MOOD: MOODv1/utils.py set_checkpoint_for_finetune, as BEiT's
  run_class_finetuning.py); a state without a shared table is returned as is."""
  if _SHARED_TABLE not in state:
    return state
  depth = len({name.split('.')[1] for name in state if name.startswith('blocks.')})
  expanded = {name: value for name, value in state.items() if name != _SHARED_TABLE}
  for block in range(depth):
    expanded[f'blocks.{block}.attn.relative_position_bias_table'] = state[_SHARED_TABLE].copy()
  return expanded


def model_options(state: dict) -> dict:
  """The encoder and pooling options that the names in a timm state dict imply."""
  names = set(state)
  has = lambda pattern: any(re.search(pattern, name) for name in names)
  return dict(
      posemb='learn' if 'pos_embed' in names else 'none',
      qkv_bias='qv' if has(r'attn\.q_bias$') else 'qkv' if has(r'attn\.qkv\.bias$') else 'none',
      layer_scale=1.0 if has(r'(gamma_1|ls1\.gamma)$') else None,  # the file sets the values
      rel_pos_bias=('shared' if _SHARED_TABLE in names else
                    'block' if has(r'attn\.relative_position_bias_table$') else 'none'),
      pool='mean' if 'fc_norm.weight' in names else 'cls',
  )


def _our_name(name: str) -> tuple[str, str] | None:
  """timm name -> (our flat param path, how to convert the array), or None if unknown."""
  block = re.fullmatch(r'blocks\.(\d+)\.(.+)', name)
  if block:
    prefix, rest = f'encoder/block{block.group(1)}/', block.group(2)
    table = {
        'norm1.weight': 'norm1/scale', 'norm1.bias': 'norm1/bias',
        'norm2.weight': 'norm2/scale', 'norm2.bias': 'norm2/bias',
        'attn.qkv.weight': 'attn/qkv/kernel', 'attn.qkv.bias': 'attn/qkv/bias',
        'attn.q_bias': 'attn/q_bias', 'attn.v_bias': 'attn/v_bias',
        'attn.proj.weight': 'attn/proj/kernel', 'attn.proj.bias': 'attn/proj/bias',
        'attn.relative_position_bias_table': 'attn/rel_pos_bias/relative_position_bias_table',
        'mlp.fc1.weight': 'fc1/kernel', 'mlp.fc1.bias': 'fc1/bias',
        'mlp.fc2.weight': 'fc2/kernel', 'mlp.fc2.bias': 'fc2/bias',
        'gamma_1': 'gamma_1', 'gamma_2': 'gamma_2',  # BEiT's LayerScale
        'ls1.gamma': 'gamma_1', 'ls2.gamma': 'gamma_2',  # ViT's (DeiT-3, DINOv2)
    }
  else:
    prefix, rest = '', name
    table = {
        'cls_token': 'encoder/cls', 'pos_embed': 'encoder/pos_embedding',
        'patch_embed.proj.weight': 'encoder/patch_embed/kernel',
        'patch_embed.proj.bias': 'encoder/patch_embed/bias',
        _SHARED_TABLE: 'encoder/rel_pos_bias/relative_position_bias_table',
        'norm.weight': 'norm/scale', 'norm.bias': 'norm/bias',
        'fc_norm.weight': 'fc_norm/scale', 'fc_norm.bias': 'fc_norm/bias',
        'head.weight': 'head/kernel', 'head.bias': 'head/bias',
    }
  if rest not in table:
    return None
  path = prefix + table[rest]
  return path, ('conv' if rest == 'patch_embed.proj.weight' else
                'dense' if rest.endswith('.weight') and '/kernel' in path else 'copy')


def _ours(array: np.ndarray, how: str) -> np.ndarray:
  if how == 'conv':  # torch OIHW -> flax HWIO
    return array.transpose(2, 3, 1, 0)
  if how == 'dense':  # torch [out, in] -> flax [in, out]
    return array.T
  return array


def _fit(path: str, value, want: jax.ShapeDtypeStruct):
  """`value` resampled to `want`'s shape where it is a position table of another grid."""
  if value.shape == want.shape:
    return value
  new_grid = vit.posemb_grid(want)
  if path.endswith('pos_embedding') and vit.posemb_grid(value) and new_grid and (
      value.shape[-1] == want.shape[-1]):
    return vit.resample_posemb(value, new_grid)
  if path.endswith('relative_position_bias_table') and value.shape[1] == want.shape[1]:
    old, new = math.isqrt(value.shape[0] - 3), math.isqrt(want.shape[0] - 3)
    if old * old + 3 == value.shape[0] and new * new + 3 == want.shape[0]:
      return vit.resample_relpos_table(value, (new + 1) // 2)
  return value


def expected_params(variant: str, options: dict, image_size: int, channels: int,
                    num_classes: int) -> dict:
  """Our classifier's flat params {path: ShapeDtypeStruct} for these options."""
  encoder = vit.Encoder(**vit.parse_variant(variant), posemb=options['posemb'],
                        **{name: options[name] for name in vit.ENCODER_OPTIONS})
  model = vit.Classifier(num_classes, encoder, pool=options['pool'])
  images = jnp.zeros((1, image_size, image_size, channels))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {'/'.join(key.key for key in path): leaf for path, leaf in flat}


def source_image_size(state: dict) -> int:
  """The image size the file was made for: its position table's grid times the patch."""
  patch = state['patch_embed.proj.weight'].shape[-1]
  if 'pos_embed' in state and vit.posemb_grid(state['pos_embed']):
    return vit.posemb_grid(state['pos_embed']) * patch
  tables = [value for name, value in state.items() if name.endswith('bias_table')]
  if tables:
    return (math.isqrt(tables[0].shape[0] - 3) + 1) // 2 * patch
  raise UserError('cannot tell the image size from the file: pass --image_size')


def _sizes(state: dict) -> str:
  """The file's sizes, to choose a variant by."""
  width, _, patch, _ = state['patch_embed.proj.weight'].shape
  depth = len({name.split('.')[1] for name in state if name.startswith('blocks.')})
  fc1 = state.get('blocks.0.mlp.fc1.weight')
  mlp_dim = None if fc1 is None else fc1.shape[0]
  return f'width {width}, depth {depth}, mlp_dim {mlp_dim}, patch_size {patch}'


def convert(state: dict, variant: str, image_size: int | None = None,
            keep_head: bool = False) -> tuple[dict, dict]:
  """(our nested params, the model options) from a timm state dict; see the module doc."""
  if 'patch_embed.proj.weight' not in state:
    raise UserError('no patch_embed.proj.weight: not a timm ViT/BEiT state dict')
  options = model_options(state)
  image_size = image_size or source_image_size(state)
  channels = state['patch_embed.proj.weight'].shape[1]
  num_classes = state['head.weight'].shape[0] if 'head.weight' in state else 1
  want = expected_params(variant, options, image_size, channels, num_classes)
  if not keep_head:
    want = {path: shape for path, shape in want.items() if not path.startswith('head/')}
  loaded, unmatched, conflicts = {}, [], {}
  for name, array in state.items():
    known = _our_name(name)
    if _LEFT_OUT.search(name) or (known and known[0].startswith('head/') and not keep_head):
      continue
    if known is None or known[0] not in want:
      unmatched.append(name)
      continue
    path, how = known
    value = _fit(path, _ours(array, how), want[path])
    if value.shape == want[path].shape:
      loaded[path] = np.asarray(value, np.float32)
    else:
      conflicts[path] = f'{name} {array.shape} -> {path} {want[path].shape}'
  missing = sorted(set(want) - set(loaded) - set(conflicts))
  if unmatched or missing or conflicts:
    raise UserError(
        f'the state dict ({_sizes(state)}) does not fit variant {variant!r} '
        f'({vit.parse_variant(variant)}) with options {options}. '
        f'Unmatched names in the file: {", ".join(unmatched) or "none"}. Missing params: '
        f'{", ".join(missing) or "none"}. Shape conflicts: '
        f'{", ".join(conflicts.values()) or "none"}')
  params = {}
  for path, value in loaded.items():
    *parents, leaf = path.split('/')
    node = params
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return params, options


def save(out: str, params: dict, variant: str, options: dict) -> None:
  """Writes `out`/params, an orbax checkpoint of {'params': params}, and `out`/model.json,
  the model config it fits."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise UserError(f'--out {out} exists: pass a new directory')
  os.makedirs(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out, 'params'), {'params': params})
  with open(os.path.join(out, 'model.json'), 'w') as f:
    json.dump(dict(variant=variant, **options), f, indent=2)


def _builds(model_cfg, converted: dict) -> bool:
  """Whether `config.model` builds the model a checkpoint was converted for. Either pooling
  fits, and any LayerScale init value (the checkpoint's gammas replace it)."""
  ours = {name: model_cfg.get(name) for name in converted}
  return all((ours[name] is None) == (value is None) if name == 'layer_scale' else
             ours[name] == value for name, value in converted.items() if name != 'pool')


def is_converted(path: str) -> bool:
  """Whether `path` is a directory `save` wrote."""
  return os.path.isfile(os.path.join(path, 'model.json'))


def read(path: str, model_cfg) -> dict:
  """The params `save` wrote in `path`; `model_cfg` (config.model) must have the options
  they were converted for."""
  with open(os.path.join(path, 'model.json')) as f:
    converted = json.load(f)
  if not _builds(model_cfg, converted):
    raise UserError(f'{path} was converted for another model: run with '
                    f'{config_flags(converted)}')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(path, 'params'))['params']


def config_flags(model: dict) -> str:
  """The --config.model.* flags that give config.model these fields."""
  return ' '.join(f'--config.model.{name}={value}' for name, value in model.items()
                  if value is not None)


def load(path: str, model_cfg, fresh: dict, with_head: bool = False) -> tuple[dict, bool]:
  """(`fresh` classifier params with the converted checkpoint in `path` copied in, whether
  the checkpoint has a head); its head too if `with_head` (a classifier scored as released).
  `model_cfg` (config.model) must have the options it was converted for."""
  pretrained = read(path, model_cfg)
  params = vit.merge_pretrained(fresh, pretrained, source=path, with_head=with_head)
  return params, 'head' in pretrained
