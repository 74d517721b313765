"""Checkpoints: exact resume after kill -9, preemption, damaged checkpoints, non-finite
losses, the pretrain -> finetune hand-off and restores across meshes and process counts."""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from mood_jax import parallel
from mood_jax.train import checkpoint, loop as train_loop
from mood_jax.data import input_pipeline
from mood_jax.errors import UserError
from mood_jax.models import mim, vit
from mood_jax.stages import finetune, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, CKPT_EVERY = 20, 5
# Checkpoints 10, 15 and 20 stay; metrics of every step are logged.
ARGS = ('--config=configs/digits.py:smoke', '--config.stages=pretrain',
        f'--config.pretrain.num_steps={NUM_STEPS}', f'--config.pretrain.ckpt_every={CKPT_EVERY}',
        '--config.pretrain.log_every=1', '--config.pretrain.keep_checkpoints=3')


def _command(workdir, data_dir, *overrides):
  # Overrides must follow --config, so data_dir goes last.
  return [sys.executable, '-m', 'mood_jax.main', *ARGS, f'--workdir={workdir}', *overrides,
          f'--config.data.data_dir={data_dir}']


def _run(workdir, data_dir, env, *overrides):
  return subprocess.run(_command(workdir, data_dir, *overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _start(workdir, data_dir, env):
  """The run in the background, its output in files (a full pipe would block it)."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'output.txt'), 'w') as out:
    return subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _logged(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:  # a line still being written is skipped
    return [json.loads(line) for line in f if line.endswith('\n')]


def _wait_until(proc, condition, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, 'the run ended before the test could interrupt it'
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.01)


def _ckpt_dir(workdir):
  return checkpoint.checkpoint_dir(workdir, pretrain.NAME)


def _steps(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(_ckpt_dir(workdir)) if name.isdigit())


def _saving(workdir, step) -> bool:
  """The async save of `step` is in flight: orbax writes into a temporary directory first."""
  path = _ckpt_dir(workdir)
  return os.path.isdir(path) and any(name.startswith(f'{step}.') and 'tmp' in name
                                     for name in os.listdir(path))


def _final_params(workdir):
  placement = parallel.Placement(parallel.make_mesh([('data', -1)]))
  return jax.tree.map(np.asarray, checkpoint.saved_params(workdir, pretrain.NAME, placement))


def _assert_same_params(workdir, reference):
  assert _steps(workdir)[-1] == NUM_STEPS
  equal = jax.tree.map(np.array_equal, _final_params(workdir), _final_params(reference))
  assert all(jax.tree.leaves(equal))


def _assert_same_losses(workdir, reference):
  """Every logged step, redone ones included, saw the same batch and params."""
  want = {m['step']: m['loss'] for m in _logged(reference)}
  assert all(m['loss'] == want[m['step']] for m in _logged(workdir))


def _copy_without_last(reference, tmp_path):
  """The reference run as if killed after its second-to-last checkpoint."""
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(_ckpt_dir(workdir), str(NUM_STEPS)))
  return workdir


def _damage(step_dir, how='truncate'):
  """A checkpoint as a full disk or a lost file leaves it."""
  if how == 'truncate':
    for path in glob.glob(os.path.join(step_dir, 'state', 'd', '*')):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    shutil.rmtree(os.path.join(step_dir, 'data'))


def _smoke_config():
  path = os.path.join(REPO, 'configs', 'digits.py')
  spec = importlib.util.spec_from_file_location('digits', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('smoke')


def _restore_latest(workdir, data_dir):
  """`checkpoint.restore_latest` of the smoke pretrain, in this process."""
  config = _smoke_config()
  config.data.data_dir = data_dir
  placement = parallel.Placement.from_config(config)
  abstract = train_loop.abstract_state(pretrain.describe(config), placement)[1]
  data = input_pipeline.train_dataset(config.data, global_batch_size=16, seed=config.seed)
  with checkpoint.manager(_ckpt_dir(workdir), config.pretrain) as mngr:
    return checkpoint.restore_latest(mngr, abstract, iter(data))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir, env):
  """An uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'workdir')
  proc = _run(workdir, data_dir, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _steps(workdir) == [10, 15, 20]
  return workdir


@pytest.mark.parametrize('kill_when', ['after_step_8', 'while_saving_step_15'])
def test_kill_and_rerun_gives_identical_params(kill_when, reference, data_dir, env, tmp_path,
                                               tensorboard_steps):
  workdir = str(tmp_path / 'workdir')
  proc = _start(workdir, data_dir, env)
  if kill_when == 'after_step_8':
    _wait_until(proc, lambda: any(m['step'] >= 8 for m in _logged(workdir)))
  else:
    _wait_until(proc, lambda: _saving(workdir, 15))
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  rerun = _run(workdir, data_dir, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _assert_same_params(workdir, reference)
  _assert_same_losses(workdir, reference)
  # The steps logged after the resumed checkpoint are logged once, not twice.
  every_step = list(range(1, NUM_STEPS + 1))
  assert [m['step'] for m in _logged(workdir)] == every_step
  assert tensorboard_steps(os.path.join(workdir, 'tensorboard', 'pretrain'))[
      'train/loss'] == every_step


@pytest.mark.parametrize('stop', [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_stop_signal_saves_and_exits_with_preempted_status(reference, data_dir, env, tmp_path,
                                                           stop):
  workdir = str(tmp_path / 'workdir')
  proc = _start(workdir, data_dir, env)
  _wait_until(proc, lambda: any(m['step'] >= 3 for m in _logged(workdir)))
  seen = max(m['step'] for m in _logged(workdir))
  proc.send_signal(stop)
  assert proc.wait(timeout=120) == train_loop.PREEMPTED_EXIT_CODE
  with open(os.path.join(workdir, 'output.txt')) as f:
    saved = int(re.search(r'preempted: saved step (\d+)', f.read()).group(1))
  assert seen <= saved < NUM_STEPS and _steps(workdir)[-1] == saved
  assert max(m['step'] for m in _logged(workdir)) == saved  # it stopped there
  if stop == signal.SIGINT:
    return  # the same save as SIGTERM's, whose rerun follows
  rerun = _run(workdir, data_dir, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resuming from step {saved}' in rerun.stderr
  _assert_same_params(workdir, reference)
  _assert_same_losses(workdir, reference)


def test_unreadable_checkpoint_is_moved_aside_and_the_previous_one_used(
    reference, data_dir, env, tmp_path):
  workdir = _copy_without_last(reference, tmp_path)
  _damage(os.path.join(_ckpt_dir(workdir), '15'))
  proc = _run(workdir, data_dir, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r'checkpoint \S+/15 cannot be read .*: moved it to \S+/15\.unreadable-',
                   proc.stderr)
  assert 'resuming from step 10' in proc.stderr
  assert glob.glob(os.path.join(_ckpt_dir(workdir), '15.unreadable-*', 'state'))
  _assert_same_params(workdir, reference)


# Orbax's reads abandoned when a damaged checkpoint fails to restore end in tensorstore's
# threads, into a closed event loop, during this test or the next (the CLI quiets them).
ABANDONED_READS = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@ABANDONED_READS
def test_no_readable_checkpoint_is_an_error_naming_the_directory(reference, data_dir, tmp_path):
  workdir = _copy_without_last(reference, tmp_path)
  _damage(os.path.join(_ckpt_dir(workdir), '10'), how='delete_item')
  _damage(os.path.join(_ckpt_dir(workdir), '15'))
  with pytest.raises(UserError, match=f'no checkpoint in {_ckpt_dir(workdir)} can be read'):
    _restore_latest(workdir, data_dir)
  assert _steps(workdir) == [10, 15]  # nothing moved when nothing can be read


@ABANDONED_READS
def test_other_process_count_is_refused(reference, data_dir, tmp_path):
  workdir = _copy_without_last(reference, tmp_path)
  path = os.path.join(_ckpt_dir(workdir), '15', 'topology', 'metadata')
  with open(path) as f:
    topology = json.load(f)
  with open(path, 'w') as f:
    json.dump({**topology, 'process_count': 2}, f)
  with pytest.raises(UserError, match='written by 2 processes, this run has 1'):
    _restore_latest(workdir, data_dir)


def test_non_finite_loss_stops_before_any_checkpoint_of_it(data_dir, env, tmp_path):
  # lr 1e30: the first update (step 2; step 1 has warmup's lr 0) makes step 3's loss NaN.
  workdir = str(tmp_path / 'workdir')
  proc = _run(workdir, data_dir, env, '--config.pretrain.lr=1e30',
              '--config.pretrain.ckpt_every=2', '--config.pretrain.log_every=4')
  assert proc.returncode == 1
  error = proc.stderr.strip().splitlines()[-1]
  bad_step = int(re.search(r'loss=nan at step (\d+)', error).group(1))
  assert error.startswith('error: pretrain:') and bad_step == 3  # found at step 4's check
  assert _steps(workdir) == [2]


def test_non_finite_state_is_never_saved():
  state = train_loop.TrainState(step=jnp.int32(5), params={'w': jnp.array([1.0, jnp.inf])},
                                opt_state=())
  with pytest.raises(UserError, match=r"non-finite values in \.params\['w'\] after step 5"):
    train_loop.check_state_finite('pretrain', 5, state)


def test_kept_steps_outlive_keep_checkpoints_and_others_are_named_missing(tmp_path):
  """finetune keeps logit_ft.init_step's checkpoint beside its latest `keep_checkpoints`;
  asking for a step that is gone is an error listing the kept ones."""
  config = ml_collections.ConfigDict({'logit_ft': {'init_step': 2}})
  cfg = ml_collections.ConfigDict({'keep_checkpoints': 1})
  init_params = lambda: {'w': jnp.zeros(3)}
  tx = optax.sgd(0.1)
  directory = checkpoint.checkpoint_dir(str(tmp_path), finetune.NAME)
  with checkpoint.manager(directory, cfg, finetune.kept_steps(config)) as mngr:
    for step in range(1, 5):
      params = {'w': jnp.full(3, float(step))}
      state = train_loop.TrainState(jnp.int32(step), params, tx.init(params))
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    mngr.wait_until_finished()
    assert list(mngr.all_steps()) == [2, 4]
  placement = parallel.Placement(parallel.make_mesh((('data', -1),)))
  restored = checkpoint.restore_params(str(tmp_path), finetune.NAME, init_params, placement,
                                       step=2)
  np.testing.assert_array_equal(restored['w'], 2.)
  with pytest.raises(UserError, match=r'no finetune checkpoint of step 3 .*kept: \[2, 4\]'):
    checkpoint.restore_params(str(tmp_path), finetune.NAME, init_params, placement, step=3)


def test_finetune_resamples_pretrain_position_embedding(reference, data_dir, env, tmp_path):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(_ckpt_dir(reference), _ckpt_dir(workdir))
  # Pretrained at 16 px with 8 px patches (2x2); fine-tuned at 24 px (3x3).
  proc = _run(workdir, data_dir, env, '--config.stages=finetune',
              '--config.data.image_size=24', '--config.finetune.num_steps=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resampled encoder/pos_embedding from 2x2 to 3x3 patches' in proc.stderr


def _init(model, size, *extra):
  return model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)), *extra)['params']


def test_hand_off_mismatch_lists_every_param_that_does_not_fit():
  small = dict(width=32, mlp_dim=64, num_heads=2)
  mim_model = mim.MaskedImageModel(vit.Encoder(**small, depth=2, patch_size=8), 'blockwise',
                                   num_channels=1)
  masks = {'mask': jnp.zeros((1, 4), bool)}
  pretrained = _init(mim_model, 16, masks)
  classifier = vit.Classifier(3, vit.Encoder(**small, depth=3, patch_size=4))
  with pytest.raises(UserError) as error:
    vit.merge_pretrained(_init(classifier, 16), pretrained)
  message = str(error.value)
  assert 'encoder/patch_embed/kernel: model (4, 4, 1, 32), checkpoint (8, 8, 1, 32)' in message
  assert 'encoder/block2/attn/qkv/kernel: not in the checkpoint' in message
  assert 'pos_embedding' not in message  # resampled from 2x2 to 4x4
  assert 'mask_token' not in message  # pretraining only: left out


def test_hand_off_resamples_and_copies_the_encoder():
  encoder = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4)
  masks = {'mask': jnp.zeros((1, 4), bool)}
  pretrained = _init(mim.MaskedImageModel(vit.Encoder(**encoder), 'blockwise', num_channels=1),
                     8, masks)
  fresh = _init(vit.Classifier(3, vit.Encoder(**encoder), pool='cls'), 12)
  merged = vit.merge_pretrained(fresh, pretrained)
  assert merged['encoder']['pos_embedding'].shape == (1, 1 + 9, 32)
  np.testing.assert_array_equal(merged['encoder']['block0']['fc1']['kernel'],
                                pretrained['encoder']['block0']['fc1']['kernel'])
  np.testing.assert_array_equal(merged['norm']['scale'], pretrained['norm']['scale'])
  np.testing.assert_array_equal(merged['head']['kernel'], fresh['head']['kernel'])


@pytest.mark.slow  # a mesh change: runs on 1 and on 8 fake devices
def test_resume_on_another_mesh(reference, data_dir, env, tmp_path):
  """A 1-device checkpoint resumed data-parallel on 8 devices; its 8-device checkpoint then
  restored onto 1 device."""
  workdir = _copy_without_last(reference, tmp_path)
  proc = _run(workdir, data_dir,
              {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "starting (8 devices, mesh {'data': 8})" in proc.stderr
  assert 'restoring a checkpoint saved on 1 devices onto 8' in proc.stderr
  params = _final_params(workdir)  # this process has 1 device
  with checkpoint.manager(_ckpt_dir(workdir)) as mngr:  # the stored values, on no mesh
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = checkpoint.restore(
        mngr, NUM_STEPS, checkpoint.saved_abstract_state(mngr, NUM_STEPS, one_device))['params']
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, stored)))
  # 8-way data parallelism sums gradients in another order: equal up to rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params,
               _final_params(reference))


# Restores the pretrain checkpoint in argv[1] onto a 4x2 FSDP mesh and saves its params to
# argv[2] (flattened, '/'-joined names) with the sharding of one FSDP-split kernel.
_RESTORE_ON_FSDP_MESH = '''
import sys
import numpy as np
from flax import traverse_util
from mood_jax import parallel
from mood_jax.train import checkpoint
from mood_jax.stages import pretrain
sys.path.insert(0, 'configs')
import digits
init_params = pretrain.describe(digits.get_config('smoke')).init_params
placement = parallel.Placement(parallel.make_mesh((('data', 4), ('fsdp', 2))))
params = checkpoint.restore_params(sys.argv[1], pretrain.NAME, init_params, placement)
np.savez(sys.argv[2], spec=str(params['encoder']['block0']['fc1']['kernel'].sharding.spec),
         **traverse_util.flatten_dict(params, sep='/'))
'''


@pytest.mark.slow  # a mesh change: a restore on 8 fake devices
def test_dp_checkpoint_restores_onto_an_fsdp_mesh(reference, data_dir, env, tmp_path):
  """A checkpoint written data-parallel on 8 devices, read back FSDP-split on a 4x2 mesh."""
  eight_devices = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  workdir = _copy_without_last(reference, tmp_path)
  proc = _run(workdir, data_dir, eight_devices)  # its last step saved on 8 devices
  assert proc.returncode == 0, proc.stderr[-3000:]
  restored = str(tmp_path / 'restored.npz')
  proc = subprocess.run([sys.executable, '-c', _RESTORE_ON_FSDP_MESH, workdir, restored],
                        cwd=REPO, env=eight_devices, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(restored) as fsdp:
    assert str(fsdp['spec']) == str(jax.sharding.PartitionSpec(None, 'fsdp'))
    saved = traverse_util.flatten_dict(_final_params(workdir), sep='/')
    assert sorted(saved) == sorted(k for k in fsdp.files if k != 'spec')
    for name, value in saved.items():
      np.testing.assert_array_equal(fsdp[name], value, err_msg=name)
