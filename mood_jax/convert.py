"""Command line: public ViT/BEiT weights as a checkpoint to fine-tune.

  python -m mood_jax.convert --src model.safetensors --variant B/16 --out DIR \\
      [--image_size 224] [--keep_head | --drop_head] [--rel_pos_per_block]

reads a timm `vit_*` / `beit_*` / `beitv2_*` state dict and writes DIR: an orbax checkpoint
of our param tree and the model options to run it with (mood_jax/models/converted.py says
how). `--config.finetune.init_from=DIR` with those options starts fine-tuning from it.
`--rel_pos_per_block` gives every block its own copy of a BEiT pretraining checkpoint's
shared relative position table, as MOOD does before fine-tuning.
"""

import argparse
import os
import sys

from mood_jax import command_line
from mood_jax.errors import UserError
from mood_jax.models import converted


def main(argv=None) -> None:
  parser = command_line.parser('mood_jax.convert', __doc__)
  parser.add_argument('--src', required=True, help='.safetensors or .pth state dict')
  parser.add_argument('--variant', required=True, help='our model variant, e.g. B/16')
  parser.add_argument('--out', required=True, help='new directory for the checkpoint')
  parser.add_argument('--image_size', type=int, default=None,
                      help='image size to resample position tables to; None: the file\'s')
  head = parser.add_mutually_exclusive_group()
  head.add_argument('--keep_head', dest='keep_head', action='store_true',
                    help='keep the classifier head (fine-tuning trains a fresh one anyway)')
  head.add_argument('--drop_head', dest='keep_head', action='store_false',
                    default=argparse.SUPPRESS, help='leave the classifier head out (the default)')
  parser.add_argument('--rel_pos_per_block', action='store_true',
                      help='copy a shared relative position table into every block (MOOD)')
  args = parser.parse_args(argv)
  try:
    state = converted.read_state_dict(args.src)
    if args.rel_pos_per_block:
      state = converted.expand_shared_rel_pos(state)
    params, options = converted.convert(state, args.variant, args.image_size, args.keep_head)
    converted.save(args.out, params, args.variant, options)
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {os.path.abspath(args.out)}; fine-tune it with '
        f'--config.finetune.init_from={os.path.abspath(args.out)} '
        f'{converted.config_flags(dict(variant=args.variant, **options))}')


if __name__ == '__main__':
  main()
