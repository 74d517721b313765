"""The one exception for problems the user fixes: `main` prints its message, no traceback."""


class UserError(ValueError):
  """Bad config, flags or workdir; the message names the problem and the fix."""


def error_line(error: Exception, max_chars: int = 300) -> str:
  """The exception's type and the start of its first line: tensorstore's run to pages."""
  line = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {line[:max_chars]}{"..." if len(line) > max_chars else ""}'
