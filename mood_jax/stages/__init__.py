"""The pipeline's stages, in the order they run. A stage module has NAME and
`run(config, workdir, placement)`; a training stage also `describe(config)`
(mood_jax/train/stage.py) and checkpoints under WORKDIR/ckpt/NAME."""

from mood_jax.train import loop as train_loop
from mood_jax.stages import evaluate, finetune, logit_ft, pretrain

ALL = {stage.NAME: stage for stage in (pretrain, finetune, logit_ft, evaluate)}
TRAINING = {name: ALL[name] for name in train_loop.TRAINING_STAGES}
