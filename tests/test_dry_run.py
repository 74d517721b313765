"""The dry run compiles every stage's step for a mesh of fake devices from abstract inputs,
without touching data or disk, and reports memory and FLOPs per device."""

import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper-size configs (BEiT-L/16 at 224): about 2 minutes each on 2 CPU cores, so they run
# with `python -m pytest -m slow tests`, not in the default suite. From scratch, so that
# pretraining compiles too.
PAPER_CONFIGS = ('cifar10.py', 'cifar10_um.py', 'cifar100.py', 'cifar10_oneclass.py',
                 'imagenet30.py', 'imagenet.py')


def _dry_run(tmp_path, config: str, *overrides: str) -> tuple[str, dict]:
  """(stdout, {stage: [batch/device, params+inputs, outputs, temporaries, GFLOPs]})."""
  workdir, data_dir = tmp_path / 'workdir', tmp_path / 'tfds'
  proc = subprocess.run(
      [sys.executable, '-m', 'mood_jax.main', f'--config=configs/{config}',
       f'--workdir={workdir}', '--config.dry_run=True', '--config.dry_run_devices=8',
       f'--config.data.data_dir={data_dir}', *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not workdir.exists() and not data_dir.exists()  # no data read, nothing written
  rows = {line.split('|')[1].strip(): [float(v) for v in line.split('|')[2:-1]]
          for line in proc.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| step')}
  for values in rows.values():
    assert values[1] > 0 and values[4] > 0  # memory and FLOPs were counted
  return proc.stdout, rows


def test_dry_run_compiles_every_stage_on_8_fake_devices_and_writes_nothing(tmp_path):
  stdout, rows = _dry_run(
      tmp_path, 'digits.py', "--config.mesh=(('data', 4), ('fsdp', 2))",
      '--config.finetune.grad_accum_steps=2', '--config.model.remat=True',
      '--config.model.scan=True', "--config.sharding_rules=(('fc1/kernel', ('fsdp', None)),)")
  assert "Dry run on 8 cpu devices, mesh {'data': 4, 'fsdp': 2}" in stdout
  # digits sets float32; its attention 'auto' is the accelerator's, whose pod this stands for.
  assert "Compute: float32, fused attention ('auto' resolved for accelerator)" in stdout
  assert set(rows) == {'pretrain', 'finetune', 'logit_ft', 'evaluate'}
  assert rows['finetune'][0] == 128 // 8 and rows['evaluate'][0] == 256 // 8
  # A training step is ~3x a forward (4x with remat), here on half evaluate's batch: its
  # FLOPs count every block and micro-batch, not a scan's or accumulation loop's body once.
  assert 1.5 < rows['finetune'][4] / rows['evaluate'][4] < 2.5


def test_a_paper_config_runs_bfloat16_and_fused_attention_on_an_accelerator(tmp_path):
  # The smoke sizes, with a batch and images large enough for the table's GFLOPs to show.
  stdout, rows = _dry_run(tmp_path, 'cifar10.py:smoke', '--config.stages=finetune',
                          '--config.finetune.batch_size=128', '--config.data.image_size=32')
  assert "Compute: bfloat16, fused attention ('auto' resolved for accelerator)" in stdout
  assert set(rows) == {'finetune'}


@pytest.mark.slow
@pytest.mark.parametrize('config', PAPER_CONFIGS)
def test_every_paper_config_compiles_at_full_size_on_8_fake_devices(tmp_path, config):
  shipped = runpy.run_path(os.path.join(REPO, 'configs', config))['get_config']('from_scratch')
  _, rows = _dry_run(tmp_path, f'{config}:from_scratch')
  assert set(rows) == set(shipped.stages.split(','))
  assert rows['pretrain'][0] == shipped.pretrain.batch_size // 8
