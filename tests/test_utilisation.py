"""MFU in the training log from the compiled step's FLOPs and a known peak; none for an unknown
device; a jax.profiler trace of the steps `profile_steps` names."""

import glob
import os

import pytest

from configs import digits
from mood_jax import parallel
from mood_jax.run import dry_run, pipeline
from mood_jax.train import metrics_log, utilisation
from mood_jax.errors import UserError


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA A100-SXM4-40GB', 312e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12), ('TPU v6 lite', 918e12),
    ('TPU v4 lite', None), ('cpu', None), ('NVIDIA GeForce RTX 3090', None)])
def test_peak_flops_per_device_kind_or_none(kind, peak):
  value, source = utilisation.peak_flops(kind)
  assert value == peak
  assert (kind in source) == (peak is None)  # unknown: says which kind; known: its source


def test_mfu_is_achieved_over_peak_flops():
  # 1e12 FLOPs a step per device, 8 steps a second (256 images/s at batch 32): 8e12 FLOP/s.
  assert utilisation.mfu(1e12, 256.0, 32, 16e12) == pytest.approx(0.5)
  assert utilisation.mfu(1e12, 256.0, 32, None) is None


@pytest.mark.parametrize('value', ['5', '0,3', '2,0', 'a,b', '1,2,3'])
def test_bad_profile_steps_is_one_line(value):
  with pytest.raises(UserError, match=r'profile_steps=.* use e.g. --config.profile_steps=10,5'):
    utilisation.parse_profile_steps(value)


def _finetune_config(data_dir: str):
  config = digits.get_config('smoke')
  config.stages, config.finetune.init_from = 'finetune', 'scratch'
  config.data.data_dir = data_dir
  return config


def test_training_logs_mfu_with_a_known_peak_and_traces_the_chosen_steps(
    tmp_path, data_dir, monkeypatch):
  # CPU has no entry in the table: give it one, so that the MFU path runs here.
  monkeypatch.setattr(utilisation, 'PEAK_FLOPS', (('cpu', 1e12, 'test figure'),))
  config = _finetune_config(data_dir)
  config.profile_steps = '2,2'
  workdir = str(tmp_path / 'run')
  pipeline.run(config, workdir)
  rows = [row for row in metrics_log.read(workdir) if row['kind'] == 'train']
  flops = dry_run.step_flops('finetune', config, parallel.Placement.from_config(config))
  assert flops > 0 and rows
  for row in rows:
    assert row['mfu'] == pytest.approx(
        flops * row['images_per_s'] / config.finetune.batch_size / 1e12, rel=1e-6)
  traces = glob.glob(os.path.join(workdir, 'tensorboard', 'profile', 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_an_unknown_device_logs_no_mfu_and_no_trace_unless_asked(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  pipeline.run(_finetune_config(data_dir), workdir)
  rows = [row for row in metrics_log.read(workdir) if row['kind'] == 'train']
  assert rows and all('mfu' not in row and row['images_per_s'] > 0 for row in rows)
  assert not os.path.exists(os.path.join(workdir, 'tensorboard', 'profile'))
