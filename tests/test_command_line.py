"""The argparse commands' one flag style: underscores, and --help giving every optional flag's
default (mood_jax/command_line.py)."""

import re

import pytest

from mood_jax import convert, export, score
from mood_jax.data import folder, prepare


@pytest.mark.parametrize('command', [score, export, convert, prepare, folder],
                         ids=lambda m: m.__name__)
def test_help_lists_every_flag_with_its_default(command, capsys):
  with pytest.raises(SystemExit) as stop:
    command.main(['--help'])
  assert stop.value.code == 0
  text = capsys.readouterr().out
  usage, options = text.split('\n\n', 1)[0], text.split('options:\n', 1)[1]
  # An entry is a flag's line and its wrapped help; an optional flag is in brackets in usage.
  entries = re.split(r'\n(?=  -)', options.strip('\n'))
  flags = [re.match(r'\s*(?:-\w, )?(--\w+)', entry).group(1) for entry in entries]
  assert flags and not [flag for flag in flags if '-' in flag[2:]], flags
  required = set(re.findall(r'--\w+', re.sub(r'\[[^\]]*\]', '', usage)))
  for flag, entry in zip(flags, entries):
    if flag not in required | {'--help'}:
      assert 'default' in entry, entry
