"""Sharded steps: the same losses, masks and eval metrics on any mesh, FSDP params split, and
a two-process run.

The multi-device cases run this file as a script in a subprocess with 8 fake CPU devices
(the pytest process has one); the script prints its results as JSON for the tests to check.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # as a script, for mood_jax

from mood_jax import parallel  # noqa: E402
from mood_jax.data import catalogue  # noqa: E402
from mood_jax.errors import UserError  # noqa: E402
from mood_jax.models import vit  # noqa: E402
from mood_jax.ood import extraction, metrics  # noqa: E402
from mood_jax.stages import finetune, pretrain  # noqa: E402
from mood_jax.train import loop as train_loop  # noqa: E402

NUM_STEPS = 5
# Sums over the batch reorder across devices: float32 rounding, compounded over 5 Adam steps.
LOSS_RTOL = 1e-4
# (name, mesh axes) on the first prod(sizes) devices, one per mesh shape: data parallel, FSDP
# (at two sizes: which dims split depends on it) and both on a 4x2 mesh. FSDP on one device
# is DP on one device, the reference. Each mesh is a compile of the step (most of the time).
MESHES = [('dp1', (('data', 1),)), ('dp8', (('data', 8),)), ('fsdp2', (('fsdp', 2),)),
          ('fsdp8', (('fsdp', 8),)), ('both8', (('data', 4), ('fsdp', 2)))]
# The 8-device subprocess trains every mesh of MESHES: minutes, so in the slow tier.
SLOW_8_DEVICES = pytest.mark.slow


def _smoke_config(data_dir=None):
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  import digits  # noqa: PLC0415
  config = digits.get_config('smoke')
  vit.VARIANTS['mu1'] = (*vit.VARIANTS['mu'][:1], 1, *vit.VARIANTS['mu'][2:])
  config.model.variant = 'mu1/8'  # one block: a fraction of the compile time
  config.pretrain.drop_path = 0.1  # dropout randomness must not depend on the sharding either
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _sub_mesh(axes) -> Mesh:
  sizes = tuple(size for _, size in axes)
  devices = np.array(jax.devices()[:int(np.prod(sizes))]).reshape(sizes)
  return Mesh(devices, tuple(name for name, _ in axes), axis_types=(AxisType.Auto,) * len(axes))


def _mim_run(mesh, config) -> dict:
  """NUM_STEPS pretrain steps on fixed batches: losses, masks, and where the params are."""
  cfg = config.pretrain
  stage = pretrain.describe(config)
  init, _, shardings = train_loop.abstract_state(stage, parallel.Placement(mesh))
  state = jax.jit(init, out_shardings=shardings)()
  step = train_loop.make_train_step(stage, shardings, mesh, with_outputs=True)
  images = np.random.default_rng(0).normal(
      size=(NUM_STEPS, cfg.batch_size, config.data.image_size, config.data.image_size, 1))
  losses, masks = [], []
  for batch in images.astype(np.float32):
    state, out = step(state, parallel.global_batch({'image': batch}, mesh))
    losses.append(float(out['loss']))
    masks.append(np.asarray(out['mask']).tolist())
  fc1 = state.params['encoder']['block0']['fc1']
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if jax.tree_util.keystr(path).endswith("['block0']['fc1']['kernel']")]
  return {'losses': losses, 'masks': masks,
          'kernel_spec': str(fc1['kernel'].sharding.spec),
          'bias_spec': str(fc1['bias'].sharding.spec),
          'moment_specs': sorted({str(m.sharding.spec) for m in moments})}


def _eval_run(mesh, config) -> dict:
  """Metrics of a feature of a random encoder as the score (its zero-init head gives constant
  logits), id_test against one OOD set."""
  model, init_params = finetune.classifier(config, drop_path=0.0)
  params = parallel.Placement(mesh).create(init_params)
  forward = extraction.make_forward(model, mesh)
  sets = {name: extraction.extract(forward, params, config.data, name, mesh,
                                 batch_size=config.evaluate.batch_size)
          for name in ('id_test', 'uniform_noise')}
  score = {name: s['features'][:, 0] for name, s in sets.items()}
  return {'count': len(sets['id_test']['label']),
          'features_sum': float(np.abs(sets['id_test']['features']).sum()),
          'metrics': {k: float(v) for k, v in metrics.ood_metrics(
              score['id_test'], score['uniform_noise']).items()}}


def _script(data_dir: str) -> None:
  """Runs in the 8-device subprocess; prints {'train'|'eval': {mesh name: results}}."""
  config = _smoke_config(data_dir)
  catalogue.source(config.data).prepare()
  results = {'train': {name: _mim_run(_sub_mesh(axes), config) for name, axes in MESHES},
             'eval': {name: _eval_run(_sub_mesh(axes), config)
                      for name, axes in (MESHES[0], MESHES[1], MESHES[-1])}}
  print('RESULTS ' + json.dumps(results))


@pytest.fixture(scope='module')
def on_8_devices(data_dir, env) -> dict:
  proc = subprocess.run([sys.executable, __file__, data_dir], cwd=REPO, timeout=600,
                        env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line, = [line for line in proc.stdout.splitlines() if line.startswith('RESULTS ')]
  return json.loads(line.removeprefix('RESULTS '))


@pytest.fixture(scope='module')
def trained(on_8_devices):
  return on_8_devices['train']


@SLOW_8_DEVICES
@pytest.mark.parametrize('name', [name for name, _ in MESHES[1:]])
def test_loss_trajectory_matches_one_device(trained, name):
  np.testing.assert_allclose(trained[name]['losses'], trained['dp1']['losses'], rtol=LOSS_RTOL)


@SLOW_8_DEVICES
def test_masks_do_not_depend_on_the_mesh(trained):
  for name, _ in MESHES[1:]:
    assert trained[name]['masks'] == trained['dp1']['masks'], name


@SLOW_8_DEVICES
def test_fsdp_splits_large_params_and_their_moments(trained):
  for name in ('fsdp2', 'fsdp8', 'both8'):
    # fc1 is (96, 384): the larger dim; its bias (384 elements) is under FSDP_MIN_SIZE.
    assert trained[name]['kernel_spec'] == str(P(None, 'fsdp')), name
    assert trained[name]['bias_spec'] == str(P()), name
    assert trained[name]['moment_specs'] == [str(P(None, 'fsdp'))], name
  for name in ('dp1', 'dp8'):
    assert trained[name]['kernel_spec'] == str(P()), name


@SLOW_8_DEVICES
def test_eval_on_8_devices_gives_the_one_device_metrics(on_8_devices):
  results = dict(on_8_devices['eval'])
  one = results.pop('dp1')
  assert one['count'] % _smoke_config().evaluate.batch_size, 'the last batch must be padded'
  for name, result in results.items():
    assert result['count'] == one['count'], name
    assert result['metrics'] == pytest.approx(one['metrics'], abs=1e-6), name
    assert result['features_sum'] == pytest.approx(one['features_sum'], rel=1e-5), name


def test_param_spec_splits_the_largest_divisible_dim():
  mesh = AbstractMesh((2, 4), ('data', 'fsdp'))
  spec = lambda shape, mesh=mesh: parallel.param_spec('encoder/block0/fc1/kernel', shape, mesh)
  assert spec((96, 384)) == P(None, 'fsdp')
  assert spec((384, 96)) == P('fsdp', None)
  assert spec((8, 8, 1, 96)) == P(None, None, None, 'fsdp')
  assert spec((4099, 3)) == P()  # no divisible dim: replicated
  assert spec((384,)) == P()  # small: replicated
  assert spec((96, 384), AbstractMesh((8,), ('data',))) == P()


def test_sharding_rules_override_the_shape_policy_for_params_and_their_moments():
  mesh = AbstractMesh((2, 4), ('data', 'fsdp'))
  rules = (('pos_embedding', ()), ('fc[12]/kernel', ('fsdp', None)),
           ('qkv/kernel', (None, ('data', 'fsdp'))))
  state = {'params': {'encoder': {'pos_embedding': jax.ShapeDtypeStruct((1, 65, 384), 'f4'),
                                  'fc1': {'kernel': jax.ShapeDtypeStruct((96, 384), 'f4')},
                                  'qkv': {'kernel': jax.ShapeDtypeStruct((96, 288), 'f4')},
                                  'proj': {'kernel': jax.ShapeDtypeStruct((96, 96), 'f4')}}}}
  state['opt_state'] = {'mu': state['params']}  # moments mirror the params
  specs = jax.tree.map(lambda s: s.spec, parallel.state_shardings(state, mesh, rules))
  for tree in (specs['params'], specs['opt_state']['mu']):
    assert tree['encoder']['pos_embedding'] == P()  # would be split by shape
    assert tree['encoder']['fc1']['kernel'] == P('fsdp', None)  # a rule, not the largest dim
    assert tree['encoder']['qkv']['kernel'] == P(None, ('data', 'fsdp'))
    assert tree['encoder']['proj']['kernel'] == P('fsdp', None)  # no rule: by shape
  # A rule matches at a '/' boundary only: 'c1/kernel' is not 'fc1/kernel'.
  assert parallel.param_spec('fc1/kernel', (96, 384), mesh, (('c1/kernel', ()),)) == P(
      None, 'fsdp')


@pytest.mark.parametrize('rule,message', [
    (('fc1/kernel', (None, 'model')), "names axes ['model'] that the mesh lacks"),
    (('fc1/kernel', (None, None, 'fsdp')), 'more entries than the param has dims'),
    (('fc1/kernel', ('fsdp', None)), 'does not divide'),
])
def test_a_sharding_rule_that_does_not_fit_is_an_error(rule, message):
  with pytest.raises(UserError, match=re.escape(message) + '.*encoder/fc1/kernel has shape '
                     r'\(90, 384\)'):
    parallel.param_spec('encoder/fc1/kernel', (90, 384), AbstractMesh((2, 4), ('data', 'fsdp')),
                        (rule,))


def test_batch_is_split_over_data_and_fsdp():
  assert parallel.batch_axes(AbstractMesh((2, 4), ('data', 'fsdp'))) == ('data', 'fsdp')
  assert parallel.batch_axes(AbstractMesh((8,), ('fsdp',))) == ('fsdp',)
  with pytest.raises(UserError, match=r'batch_size=12 does not divide over the 8 devices.*'
                                      r"'data': 2, 'fsdp': 4.*multiple of 8"):
    parallel.check_batch_size(12, AbstractMesh((2, 4), ('data', 'fsdp')), 'batch_size')


def test_unknown_mesh_axis_is_an_error():
  with pytest.raises(UserError, match='model'):
    parallel.make_mesh((('data', -1), ('model', 1)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two processes of a smoke run and the one-process reference
def test_two_processes_give_the_single_process_results(data_dir, env, tmp_path):
  """Two OS processes train and evaluate; one process evaluating the same checkpoint agrees."""
  workdir = str(tmp_path / 'workdir')
  command = [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:smoke',
             f'--workdir={workdir}', '--config.stages=pretrain,evaluate',
             '--config.evaluate.models=pretrain', '--config.evaluate.scorers=mahalanobis_mood',
             "--config.data.ood_sets=('uniform_noise',)", f'--config.data.data_dir={data_dir}']
  port = _free_port()
  procs = [subprocess.Popen(
      [*command, f'--coordinator_address=localhost:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  assert 'starting (2 devices' in outputs[0]
  assert '| pretrain |' in outputs[0] and '| pretrain |' not in outputs[1]  # process 0 reports
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    two = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [2, 4]  # written once, by process 0

  os.remove(os.path.join(workdir, 'results', 'results.json'))
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    one = json.load(f)
  assert two['rows'], 'no metrics'
  for two_row, one_row in zip(two['rows'], one['rows'], strict=True):
    assert two_row == pytest.approx(one_row, abs=1e-6)


if __name__ == '__main__':
  _script(sys.argv[1])
