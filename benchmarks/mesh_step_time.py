"""Pretrain step time, data parallel vs FSDP, on 8 CPU devices with the tiny config.

  python benchmarks/mesh_step_time.py [--steps=60] [--log_every=5]

Runs the pretrain stage of configs/digits.py:smoke once per mesh (8 fake CPU devices, one
after the other, on the same machine) and reads the images/s the training loop logs for each
window of `log_every` steps, compilation excluded. Step time = batch size / images/s; it
prints the median over the windows and the FSDP / DP ratio.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

_STEPS = flags.DEFINE_integer('steps', 60, 'Pretrain steps per mesh.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 5, 'Steps per timed window.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {'dp (data=8)': "(('data', 8),)",
          'fsdp (fsdp=8)': "(('fsdp', 8),)",
          'dp+fsdp (data=4, fsdp=2)': "(('data', 4), ('fsdp', 2))"}
BATCH_SIZE = 16  # the smoke config's


def step_times(mesh: str, workdir: str) -> list[float]:
  """Seconds per step of each logged window but the one with the first step's compilation."""
  subprocess.run(
      [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:smoke',
       f'--workdir={workdir}', '--config.stages=pretrain', f'--config.mesh={mesh}',
       f'--config.pretrain.num_steps={_STEPS.value}',
       f'--config.pretrain.log_every={_LOG_EVERY.value}',
       f'--config.pretrain.ckpt_every={_STEPS.value}',
       f'--config.data.data_dir={os.path.join(os.path.dirname(workdir), "tfds")}'],
      cwd=REPO, check=True, capture_output=True,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [BATCH_SIZE / row['images_per_s'] for row in rows[1:]]


def main(argv) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    medians = {name: statistics.median(step_times(mesh, os.path.join(tmp, str(i))))
               for i, (name, mesh) in enumerate(MESHES.items())}
  dp = medians['dp (data=8)']
  for name, seconds in medians.items():
    print(f'{name:26s} {seconds * 1e3:7.2f} ms/step  ({seconds / dp:.2f}x dp)')


if __name__ == '__main__':
  app.run(main)
