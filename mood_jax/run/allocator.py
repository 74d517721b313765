"""Which malloc the process runs on, because XLA:CPU's training steps depend on it.

XLA:CPU allocates a step's temporaries afresh every time the step runs. The C library's
malloc hands out blocks that large as new memory maps and returns them on free, so each step
faults every page of its activations in again: the Ti/4 fine-tune step of
benchmarks/train_step.py took 586k page faults and 0.79 s of system CPU per step on 2 cores,
PyTorch's 17k and 0.08 s. tcmalloc keeps freed memory for reuse: no faults, and that step
ran 1.22x faster (pretraining 1.25x). JAX has no setting for its CPU allocator, so the fix
is to preload one (docs/precision.md).
"""

import os


def caching_malloc(maps: str = '/proc/self/maps') -> str | None:
  """The file name of the tcmalloc or jemalloc mapped into this process, or None (the C
  library's malloc, or not Linux)."""
  try:
    with open(maps) as f:
      paths = {line.split()[-1] for line in f if '.so' in line}
  except OSError:
    return None
  return next((os.path.basename(path) for path in sorted(paths)
               if 'tcmalloc' in path or 'jemalloc' in path), None)
