"""Rules for config values, each failure one UserError line: the field, its value, the rule
and a valid example. The stages' own `check_config` functions and `pipeline.validate` use
them, so that every field a run reads is checked before any work starts."""

import math

import ml_collections

from mood_jax.errors import UserError


def names(spec: str) -> list[str]:
  """A comma-separated config field ('msp, energy') as its names."""
  return [name.strip() for name in spec.split(',') if name.strip()]


def fail(field: str, value, rule: str, example) -> None:
  raise UserError(f'{field}={value!r} {rule}: e.g. --config.{field}={example}')


def choice(field: str, value, valid) -> None:
  if value not in valid:
    raise UserError(f'unknown {field} {value!r}: valid choices are {", ".join(map(str, valid))}')


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(field: str, value, low, example) -> None:
  """A finite number >= low (integers stay integers: ml_collections types the field)."""
  if not (_number(value) and value >= low):
    fail(field, value, f'must be a finite number >= {low}', example)


def inside(field: str, value, low, high, example, *, closed: str = '') -> None:
  """low < value < high; `closed` names the ends that are allowed too: 'low', 'high', 'both'."""
  low_ok = value >= low if closed in ('low', 'both') else value > low
  high_ok = value <= high if closed in ('high', 'both') else value < high
  if not (_number(value) and low_ok and high_ok):
    interval = ('[' if closed in ('low', 'both') else '(') + f'{low}, {high}' + (
        ']' if closed in ('high', 'both') else ')')
    fail(field, value, f'must be inside {interval}', example)


# Fields every training stage reads (train_loop, optim), and a valid example of each.
_COUNTS = {'num_steps': 100, 'batch_size': 128, 'grad_accum_steps': 1, 'log_every': 50,
           'ckpt_every': 100, 'keep_checkpoints': 2}
_RATES = {'lr': 1e-3, 'min_lr': 1e-5, 'weight_decay': 0.05, 'grad_clip': 1.0,
          'warmup_steps': 10}


def training_stage(stage: str, cfg: ml_collections.ConfigDict) -> None:
  """The fields the training loop and the optimizer read from `config.<stage>`."""
  for name, example in _COUNTS.items():
    at_least(f'{stage}.{name}', cfg[name], 1, example)
  for name, example in _RATES.items():
    at_least(f'{stage}.{name}', cfg[name], 0, example)
  if cfg.lr == 0:
    fail(f'{stage}.lr', cfg.lr, 'trains nothing: must be > 0', _RATES['lr'])
  for name, example in (('b1', 0.9), ('b2', 0.999), ('drop_path', 0.1)):
    inside(f'{stage}.{name}', cfg[name], 0, 1, example, closed='low')
  if 'layer_decay' in cfg:
    inside(f'{stage}.layer_decay', cfg.layer_decay, 0, 1, 0.9, closed='high')
  if 'label_smoothing' in cfg:
    inside(f'{stage}.label_smoothing', cfg.label_smoothing, 0, 1, 0.1, closed='low')
  if cfg.batch_size % cfg.grad_accum_steps:
    raise UserError(f'{stage}.batch_size={cfg.batch_size} does not split into '
                    f'{stage}.grad_accum_steps={cfg.grad_accum_steps} equal micro-batches: '
                    'use a divisor of the batch size')
