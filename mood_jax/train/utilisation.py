"""How well a training step uses its device: model FLOPs utilisation (MFU) from the compiled
step's own FLOP count, and a jax.profiler trace of chosen steps.

MFU = (FLOPs of one step per device, XLA's count: `dry_run.step_flops`) / (seconds per step)
/ (the device's peak FLOP/s). The peak is the dense bfloat16 figure of the vendor's data sheet
(PEAK_FLOPS); a device not in the table has no MFU, rather than a guessed one. A float32 run is
held against the same bfloat16 peak: the figure says what the device could do, not what the
chosen dtype allows.
"""

import os

import jax

from mood_jax.errors import UserError

# (jax's device_kind, dense bf16 FLOP/s per chip, source). NVIDIA kinds name the memory too
# ('NVIDIA H100 80GB HBM3'), so they match as substrings, the more specific first; TPU kinds
# (jax/_src/mesh_utils.py) match exactly, since 'TPU v4 lite' is another chip than 'TPU v4'.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12, 'NVIDIA H100 Tensor Core GPU data sheet: H100 PCIe, BF16 dense'),
    ('H100', 989e12, 'NVIDIA H100 Tensor Core GPU data sheet: H100 SXM, BF16 dense'),
    ('H200', 989e12, 'NVIDIA H200 Tensor Core GPU data sheet: H200 SXM, BF16 dense'),
    ('A100', 312e12, 'NVIDIA A100 Tensor Core GPU data sheet: BF16 dense (SXM and PCIe)'),
    ('TPU v4', 275e12, 'cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16 per chip'),
    ('TPU v5 lite', 197e12, 'cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip'),
    ('TPU v5e', 197e12, 'cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip'),
    ('TPU v5p', 459e12, 'cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip'),
    ('TPU v6 lite', 918e12, 'cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip'),
)
PROFILE_DIR = os.path.join('tensorboard', 'profile')  # under WORKDIR


def peak_flops(device_kind: str) -> tuple[float | None, str]:
  """(dense bf16 peak FLOP/s of one device of `device_kind`, its source), or (None, why)."""
  for name, peak, source in PEAK_FLOPS:
    if name == device_kind or (not name.startswith('TPU') and name in device_kind):
      return peak, source
  return None, f'no peak FLOP/s known for {device_kind!r} (mood_jax/train/utilisation.py)'


def mfu(flops_per_step: float, images_per_s: float, batch_size: int,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation of a step of `flops_per_step` FLOPs per device (the global
  batch's share), run at `images_per_s` images of the global batch a second."""
  if peak is None:
    return None
  return flops_per_step * images_per_s / batch_size / peak


def parse_profile_steps(value: str) -> tuple[int, int] | None:
  """config.profile_steps 'START,COUNT' -> (START, COUNT); '' -> None."""
  if not value:
    return None
  try:
    start, count = (int(part) for part in value.split(','))
  except ValueError:
    start = count = 0
  if start < 1 or count < 1:
    raise UserError(f'profile_steps={value!r} is not START,COUNT with START >= 1 and '
                    'COUNT >= 1: use e.g. --config.profile_steps=10,5')
  return start, count


class Profiler:
  """Traces steps START to START + COUNT - 1 of a stage (`profile_steps`) with jax.profiler
  into WORKDIR/tensorboard/profile/, TensorBoard's profile plugin's layout (one session per
  trace, named by its time). Call `before(step)` and `after(step, outputs)` around each step."""

  def __init__(self, workdir: str, profile_steps: str):
    self._steps = parse_profile_steps(profile_steps)
    self._dir = os.path.join(workdir, PROFILE_DIR)
    self._tracing = False

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0] and jax.process_index() == 0:
      jax.profiler.start_trace(self._dir)
      self._tracing = True

  def after(self, step: int, outputs) -> None:
    if self._tracing and step == sum(self._steps) - 1:
      jax.block_until_ready(outputs)  # the traced steps' device work, not just their dispatch
      self.stop()

  def stop(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
