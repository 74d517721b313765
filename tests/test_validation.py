"""Every config field a run reads is checked before any work: one line naming the field, the
value, the rule and a valid example. In-process (no data, no compile); test_cli.py runs two
through the command line for the exit status and the single line."""

import pytest

from configs import digits
from mood_jax.run import pipeline
from mood_jax.errors import UserError


@pytest.mark.parametrize('overrides,message', [
    # Accepted on main and silently wrong: all or no patches masked, pixels dropped.
    ({'pretrain.mask_ratio': 1.5}, 'pretrain.mask_ratio=1.5 must be inside (0, 1): e.g. '
                                   '--config.pretrain.mask_ratio=0.75'),
    ({'pretrain.mask_ratio': 0.0}, 'pretrain.mask_ratio=0.0 must be inside (0, 1)'),
    ({'pretrain.mask_ratio': 0.01}, 'masks 0 of the 4 patches'),  # 16 px / 8 px patches
    ({'pretrain.scheme': 'blockwise', 'pretrain.min_block_patches': 9},
     'pretrain.min_block_patches=9 must be inside [1, 3]'),
    ({'model.variant': 'mu/5'}, "model.variant='mu/5' has a patch size that does not divide "
                                'data.image_size=16'),
    ({'model.variant': 'mu/0'}, "model.variant='mu/0' has a patch size"),
    ({'finetune.num_steps': -5}, 'finetune.num_steps=-5 must be a finite number >= 1'),
    ({'finetune.num_steps': 0}, 'finetune.num_steps=0 must be a finite number >= 1'),
    ({'finetune.lr': float('nan')}, 'finetune.lr=nan must be a finite number >= 0'),
    ({'logit_ft.lr': 0.0}, 'logit_ft.lr=0.0 trains nothing'),
    ({'pretrain.batch_size': 0}, 'pretrain.batch_size=0 must be'),
    ({'pretrain.ckpt_every': 0}, 'pretrain.ckpt_every=0'),
    ({'finetune.keep_checkpoints': 0}, 'finetune.keep_checkpoints=0'),
    ({'finetune.warmup_steps': -1}, 'finetune.warmup_steps=-1'),
    ({'finetune.b2': 1.0}, 'finetune.b2=1.0 must be inside [0, 1)'),
    ({'finetune.drop_path': -0.1}, 'finetune.drop_path=-0.1'),
    ({'finetune.layer_decay': 0.0}, 'finetune.layer_decay=0.0 must be inside (0, 1]'),
    ({'logit_ft.label_smoothing': 1.0}, 'logit_ft.label_smoothing=1.0 must be inside [0, 1)'),
    ({'finetune.grad_accum_steps': 0}, 'finetune.grad_accum_steps=0'),
    ({'stages': ''}, "stages='' selects no stage"),
    ({'stages': ' , '}, 'selects no stage'),
    ({'data.image_size': 0}, 'data.image_size=0'),
    ({'data.std': 0.0}, 'data.std=0.0 must be inside (0, inf)'),
    ({'data.test_fraction': 1.0}, 'data.test_fraction=1.0'),
    ({'data.hflip': 2.0}, 'data.hflip=2.0 must be inside [0, 1]'),
    ({'data.id_val_fraction': 1.0}, 'data.id_val_fraction=1.0 must be inside [0, 1)'),
    ({'data.crop_scale': (0.5, 0.1)}, 'data.crop_scale=(0.5, 0.1) must be (low, high)'),
    ({'evaluate.batch_size': 0}, 'evaluate.batch_size=0'),
    ({'model.layer_scale': -1.0}, 'model.layer_scale=-1.0'),
    ({'mesh': (('model', 2),)}, 'name each of the axes'),
    ({'stages': 'pretrain,tune'}, "unknown stage 'tune': valid choices are pretrain"),
    ({'model.variant': 'XL/16'}, 'unknown model variant'),
    ({'evaluate.scorers': 'msp,nope'}, "unknown scorer 'nope'"),
    ({'data.ood_sets': ('moon', 'photos')}, 'moon'),
    ({'stages': 'finetune', 'data.id_classes': (3,)}, 'one-class'),
    ({'logit_ft.loss': 'flood'}, "unknown logit_ft.loss 'flood'"),
    ({'logit_ft.weight_keep_ratio': 1.5}, 'weight_keep_ratio=1.5 is outside'),
    ({'logit_ft.init_step': 3}, 'logit_ft.init_step=3 is not a step finetune saves'),
    ({'model.rel_pos_bias': 'shared'}, 'use --config.pretrain.scheme=blockwise'),
    ({'model.qkv_bias': 'kv'}, "unknown model.qkv_bias 'kv'"),
    ({'finetune.grad_accum_steps': 3},
     'finetune.batch_size=16 does not split into finetune.grad_accum_steps=3'),
    ({'evaluate.scorers': 'knn', 'data.ood_sets': ('photos',)},
     'needs an OOD validation set: add one to data.ood_sets (digits: letters'),
    ({'evaluate.scorers': 'knn', 'evaluate.sweep': 'react'},
     "names 'react', which evaluate.scorers does not select"),
    ({'evaluate.scorers': 'odin', 'evaluate.sweep': 'odin'}, 'odin is not swept'),
    ({'evaluate.scorers': 'msp', 'evaluate.fit_on_id_validation': 'react'},
     "fit_on_id_validation names 'react', which evaluate.scorers does not select"),
    ({'evaluate.scorers': 'knn', 'evaluate.sweep_metric': 'accuracy'},
     "unknown evaluate.sweep_metric 'accuracy'"),
    ({'evaluate.scorers': 'knn', 'evaluate.sweep_grids.knn.k': ()},
     'evaluate.sweep_grids.knn has an empty list'),
    ({'finetune.eval_every': 2, 'finetune.eval_scorer': 'nope'},
     "finetune.eval_scorer: unknown scorer 'nope'"),
    ({'logit_ft.eval_every': 2, 'logit_ft.eval_scorer': 'odin'},
     'logit_ft.eval_scorer=odin needs its own forward pass'),
])
def test_bad_value_names_field_value_rule_and_example(overrides, message, tmp_path):
  config = digits.get_config('smoke')
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(UserError) as error:
    pipeline.validate(config, str(tmp_path / 'workdir'))
  assert message in str(error.value) and '\n' not in str(error.value)
  assert not (tmp_path / 'workdir').exists()


@pytest.mark.parametrize('arg', ['', 'split,smoke', 'oneclass=3,smoke',
                                 'split,idval,nearval=9,smoke'])
def test_shipped_digits_configs_pass(arg, tmp_path):
  assert pipeline.validate(digits.get_config(arg), str(tmp_path))
