"""The one flag style of the argparse commands (score, export, convert, data.prepare,
data.folder; main is absl's, whose --help gives defaults too): --flags with underscores, and
--help that shows the command's docstring as written and every flag with its default."""

import argparse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
  """The docstring's layout kept, and '(default: X)' after every optional flag's help."""

  def _get_help_string(self, action):
    if action.required:  # a required flag has no default to show
      return action.help
    return super()._get_help_string(action)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An ArgumentParser for `python -m <prog>`, its --help led by `doc`."""
  return argparse.ArgumentParser(prog=f'python -m {prog}', description=doc,
                                 formatter_class=_HelpFormatter)
