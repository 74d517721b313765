"""The one exception for problems the user fixes: `main` prints its message, no traceback."""


class UserError(ValueError):
  """Bad config, flags or workdir; the message names the problem and the fix."""
