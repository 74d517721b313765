"""Writing a file so that a failure never leaves a half-written one in its place."""

import os
import tempfile


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same directory, renamed over
  `path` only once complete: a reader sees the old file or the new one, never a part."""
  directory = os.path.dirname(path)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp_')  # same filesystem
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would hide results from other users
    os.replace(tmp_path, path)
  except BaseException:
    os.remove(tmp_path)
    raise
