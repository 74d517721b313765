"""The stage registry: every stage once, in the order a run runs them. The pipeline, the dry
run, export, the run's ETA and the benchmarks read it.

A stage module has NAME, `check_config(config)` and `run(config, workdir, placement)`; a
training stage also `describe(config) -> TrainingStage` (mood_jax/train/stage.py), its `run`
takes `later_images` (the run's ETA), and it checkpoints under WORKDIR/ckpt/NAME.
"""

from mood_jax.stages import evaluate, finetune, logit_ft, pretrain

ALL = {stage.NAME: stage for stage in (pretrain, finetune, logit_ft, evaluate)}
TRAINING = {name: stage for name, stage in ALL.items() if hasattr(stage, 'describe')}
