"""The stage registry: every stage once, in the order a run runs them. The pipeline, the dry
run, export, the run's ETA and the benchmarks read it.

A stage module has NAME, `check_config(config)` and `run(config, workdir, placement)`; a
training stage also `describe(config) -> TrainingStage` (mood_jax/train/stage.py) and
RNG_STREAMS (its random streams' numbers, unique over the stages), its `run` takes
`later_images` (the run's ETA), and it checkpoints under WORKDIR/ckpt/NAME.
"""

from mood_jax.stages import evaluate, finetune, logit_ft, pretrain

ALL = {stage.NAME: stage for stage in (pretrain, finetune, logit_ft, evaluate)}
TRAINING = {name: stage for name, stage in ALL.items() if hasattr(stage, 'describe')}

_STREAMS = [number for stage in ALL.values()
            for number in getattr(stage, 'RNG_STREAMS', {}).values()]
if len(_STREAMS) != len(set(_STREAMS)):
  raise RuntimeError(f'two random streams share a number ({sorted(_STREAMS)}): give the new '
                     "stage's RNG_STREAMS numbers no other stage uses")
