"""Where a training stage is: its step out of the config's total, the time left for the stage
and for the whole run, and at its end its wall time and device-hours.

Plain log lines, no progress bars: the logs of a multi-host run interleave.
"""

import time


def duration(seconds: float) -> str:
  """'1h02m', '3m07s' or '42s'."""
  hours, rest = divmod(int(round(seconds)), 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


class Clock:
  """Times one stage. Its speed is the mean since the first step after compilation, so the
  ETA steadies as the stage runs; the run's ETA assumes the training stages still to come
  (`later_images` images in all) go at this stage's images/s. Evaluations are left out."""

  def __init__(self, num_steps: int, batch_size: int, later_images: int):
    self.num_steps, self.batch_size, self.later_images = num_steps, batch_size, later_images
    self.wall_start = time.perf_counter()
    self._timed_from = None  # (time, step) once the first step is compiled and done

  def compiled(self, step: int) -> None:
    self._timed_from = (time.perf_counter(), step)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (e.g. an evaluation) out of the speed."""
    if self._timed_from is not None:
      self._timed_from = (self._timed_from[0] + seconds, self._timed_from[1])

  def line(self, step: int) -> str:
    """'step 400/1000 (40%), ETA 1m12s, run ETA 5m30s'."""
    text = f'step {step}/{self.num_steps} ({100 * step / self.num_steps:.0f}%)'
    if self._timed_from is None or step <= self._timed_from[1]:
      return text
    start_time, start_step = self._timed_from
    step_s = (time.perf_counter() - start_time) / (step - start_step)
    stage_left = (self.num_steps - step) * step_s
    run_left = stage_left + self.later_images * step_s / self.batch_size
    return f'{text}, ETA {duration(stage_left)}, run ETA {duration(run_left)}'

  def summary(self, steps_run: int, num_devices: int) -> str:
    """'400 steps in 3m12s, 0.43 device-hours on 8 devices'."""
    wall = time.perf_counter() - self.wall_start
    return (f'{steps_run} steps in {duration(wall)}, {wall * num_devices / 3600:.3g} '
            f'device-hours on {num_devices} devices')
