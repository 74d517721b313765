"""timm/HF weight import: parity of converted random timm models with timm's own forward,
clear errors, and the CLI round trip into the finetune stage."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mood_jax.models import converted
from mood_jax.errors import UserError
from mood_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stand_in_for_torchvision():
  """timm imports torchvision at import time for data transforms and BatchNorm freezing,
  none of which a ViT/BEiT forward runs; PyPI's torchvision wheels are CUDA builds that
  cannot load beside the CPU torch the tests install. So, when there is no torchvision,
  every `torchvision.*` module is an empty one whose every name is an inert class, as is
  every name of those classes (each its own: timm keys a dict by them)."""
  if importlib.util.find_spec('torchvision') is not None:
    return

  def inert(owner, name):
    if name.startswith('__'):
      raise AttributeError(name)
    setattr(owner, name, Inert(name, (), {}))
    return getattr(owner, name)

  class Inert(type):
    __getattr__ = inert

  class Module(types.ModuleType):
    __getattr__ = inert

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name.partition('.')[0] == 'torchvision':
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      return Module(spec.name)

    def exec_module(self, module):
      pass

  sys.meta_path.append(Finder())


_stand_in_for_torchvision()
from timm.models.beit import Beit  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
TIMM_MODELS = {
    'vit_cls': lambda size: VisionTransformer(img_size=size, global_pool='token', **SMALL),
    'vit_mean': lambda size: VisionTransformer(img_size=size, global_pool='avg', **SMALL),
    'vit_layerscale': lambda size: VisionTransformer(img_size=size, init_values=0.1, **SMALL),
    'beit_relpos_block': lambda size: Beit(img_size=size, use_abs_pos_emb=False,
                                           use_rel_pos_bias=True, init_values=0.1, **SMALL),
    'beit_relpos_shared': lambda size: Beit(img_size=size, use_shared_rel_pos_bias=True,
                                            init_values=0.1, **SMALL),
}


@pytest.fixture(autouse=True)
def small_variant(monkeypatch):
  """'t': the timm test models' size, (width, depth, mlp_dim, heads)."""
  monkeypatch.setitem(vit.VARIANTS, 't', (64, 2, 256, 4))


def _random_timm(name: str, size: int):
  """A timm model in eval mode with every param perturbed: timm initialises q/v biases,
  relative position tables and LayerScale to constants that would hide a wrong mapping."""
  torch.manual_seed(0)
  model = TIMM_MODELS[name](size)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model.eval()


def _state(model) -> dict:
  return {name: value.numpy() for name, value in model.state_dict().items()}


def _ours(params, options, variant, images):
  encoder = vit.Encoder(**vit.parse_variant(variant), posemb=options['posemb'],
                        **{name: options[name] for name in vit.ENCODER_OPTIONS})
  model = vit.Classifier(10, encoder, pool=options['pool'])
  logits, aux = model.apply({'params': params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
  return np.asarray(logits), np.asarray(aux['features'])


@pytest.mark.parametrize('size', [32, 48])
@pytest.mark.parametrize('name', sorted(TIMM_MODELS))
def test_converted_forward_equals_timm(name, size):
  model = _random_timm(name, size)
  params, options = converted.convert(_state(model), 't/8', keep_head=True)
  images = torch.randn(3, 3, size, size)
  with torch.no_grad():
    timm_features = model.forward_head(model.forward_features(images), pre_logits=True)
    timm_logits = model(images)
  logits, features = _ours(params, options, 't/8', images.numpy())
  np.testing.assert_allclose(features, timm_features.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, timm_logits.numpy(), atol=1e-4, rtol=0)


def test_shared_table_expanded_per_block_equals_timm():
  """MOOD's fine-tuning start from a pt22k checkpoint: each block its own copy of the
  shared relative position table, the same forward as timm's shared-table model."""
  model = _random_timm('beit_relpos_shared', 32)
  state = converted.expand_shared_rel_pos(_state(model))
  params, options = converted.convert(state, 't/8', keep_head=True)
  assert options['rel_pos_bias'] == 'block' and 'rel_pos_bias' not in params['encoder']
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    timm_features = model.forward_head(model.forward_features(images), pre_logits=True)
  _, features = _ours(params, options, 't/8', images.numpy())
  np.testing.assert_allclose(features, timm_features.numpy(), atol=1e-4, rtol=0)


def test_pth_and_safetensors_files_read_the_same(tmp_path):
  from safetensors.torch import save_file
  model = _random_timm('vit_mean', 32)
  save_file(model.state_dict(), tmp_path / 'm.safetensors')
  torch.save({'model': model.state_dict()}, tmp_path / 'm.pth')  # nested, as training saves
  from_pth = converted.read_state_dict(str(tmp_path / 'm.pth'))
  from_safetensors = converted.read_state_dict(str(tmp_path / 'm.safetensors'))
  assert from_pth.keys() == from_safetensors.keys() == model.state_dict().keys()
  for name, value in from_pth.items():
    np.testing.assert_array_equal(value, from_safetensors[name])


def test_beit_release_files_load_safely(tmp_path):
  """BEiT's save_model: the weights (DDP-prefixed) under 'model', beside the optimizer state
  and its argparse Namespace. That Namespace is allowed; any other class stays refused."""
  import argparse
  model = _random_timm('vit_mean', 32)
  ddp = {f'module.{name}': value for name, value in model.state_dict().items()}
  torch.save({'model': ddp, 'epoch': 3, 'args': argparse.Namespace(lr=5e-4, model='beit')},
             tmp_path / 'release.pth')
  read = converted.read_state_dict(str(tmp_path / 'release.pth'))
  assert read.keys() == model.state_dict().keys()
  torch.save({'model': model.state_dict(), 'args': _NotAllowed()}, tmp_path / 'code.pth')
  with pytest.raises(UserError, match='cannot read .*code.pth as a PyTorch state dict'):
    converted.read_state_dict(str(tmp_path / 'code.pth'))


class _NotAllowed:
  """A class that a pickle would have to import to load."""


def test_options_are_read_off_the_names():
  assert converted.model_options(_state(_random_timm('beit_relpos_block', 32))) == dict(
      posemb='none', qkv_bias='qv', layer_scale=1.0, rel_pos_bias='block', pool='mean')
  assert converted.model_options(_state(_random_timm('vit_cls', 32))) == dict(
      posemb='learn', qkv_bias='qkv', layer_scale=None, rel_pos_bias='none', pool='cls')


def test_position_tables_are_resampled_to_the_image_size():
  state = _state(_random_timm('beit_relpos_shared', 32))  # absolute and relative
  params, options = converted.convert(state, 't/8', image_size=48)
  assert 'head' not in params  # dropped by default
  encoder = params['encoder']
  assert encoder['pos_embedding'].shape == (1, 1 + 6 * 6, 64)
  assert encoder['rel_pos_bias']['relative_position_bias_table'].shape == (11 * 11 + 3, 4)
  params['head'] = {'kernel': np.zeros((64, 10), np.float32), 'bias': np.zeros(10, np.float32)}
  _, features = _ours(params, options, 't/8', np.ones((2, 3, 48, 48), np.float32))
  assert np.isfinite(features).all()


def test_resampling_to_the_same_grid_is_the_identity():
  table = np.random.default_rng(0).normal(size=(7 * 7 + 3, 2)).astype(np.float32)
  np.testing.assert_allclose(vit.resample_relpos_table(table, 4), table, atol=1e-5)


def test_relative_position_index_matches_timm():
  from timm.models.beit import gen_relative_position_index
  np.testing.assert_array_equal(vit.relative_position_index(3),
                                gen_relative_position_index((3, 3)).numpy())


def test_a_misfit_lists_unmatched_missing_and_conflicting_params():
  state = _state(_random_timm('vit_cls', 32))
  state['dist_token'] = np.zeros((1, 1, 64), np.float32)
  del state['blocks.1.mlp.fc2.bias']
  state['blocks.0.mlp.fc1.weight'] = np.zeros((128, 64), np.float32)
  with pytest.raises(UserError) as error:
    converted.convert(state, 't/8')
  message = str(error.value)
  assert 'Unmatched names in the file: dist_token.' in message
  assert 'Missing params: encoder/block1/fc2/bias.' in message
  assert ('Shape conflicts: blocks.0.mlp.fc1.weight (128, 64) -> encoder/block0/fc1/kernel '
          '(64, 256)') in message


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'mood_jax.convert', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
  proc = _cli('--src', str(tmp_path / 'missing.safetensors'), '--variant', 'mu/8',
              '--out', str(tmp_path / 'out'))
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      f"error: --src '{tmp_path / 'missing.safetensors'}' is not a file"]
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'not a safetensors file')
  proc = _cli('--src', str(bad), '--variant', 'mu/8', '--out', str(tmp_path / 'out'))
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error: cannot read')


def test_round_trip_through_the_cli_into_finetune(tmp_path):
  """A BEiT of our smoke size (mu/8 at 16 px, 1 channel) as .safetensors, converted by the
  CLI, fine-tuned and evaluated from config.finetune.init_from."""
  from safetensors.numpy import save_file
  torch.manual_seed(0)
  beit = Beit(img_size=16, patch_size=8, in_chans=1, embed_dim=96, depth=6, num_heads=3,
              num_classes=1000, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
  src, out = str(tmp_path / 'beit.safetensors'), str(tmp_path / 'converted')
  save_file({name: np.ascontiguousarray(value) for name, value in _state(beit).items()}, src)
  proc = _cli('--src', src, '--variant', 'mu/8', '--out', out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flags = proc.stdout.split('fine-tune it with ')[1].split()
  assert flags[0] == f'--config.finetune.init_from={out}'
  assert '--config.model.qkv_bias=qv' in flags and '--config.model.rel_pos_bias=block' in flags

  def main(workdir, *flags):
    return subprocess.run(
        [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:smoke',
         f'--workdir={tmp_path / workdir}', '--config.stages=finetune,evaluate', *flags,
         f'--config.data.data_dir={tmp_path / "tfds"}'],
        cwd=REPO, capture_output=True, text=True, timeout=600)

  proc = main('workdir', *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'encoder initialised from the {out} checkpoint' in proc.stderr
  assert os.path.exists(tmp_path / 'workdir' / 'results' / 'results.json')
  # Without the BEiT options the model does not fit: the error says which flags to add.
  proc = main('plain_vit', flags[0])
  assert proc.returncode != 0 and '--config.model.qkv_bias=qv' in proc.stderr
