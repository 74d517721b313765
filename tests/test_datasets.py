"""Real datasets under TFDS mock data: the paper configs end to end, protocols, transforms, errors.

`tfds.testing.mock_data` serves random examples through `tfds.data_source`, but it encodes the
images that our reader asks for undecoded with TensorFlow's encoder; `_mock_tfds` swaps in PIL's.
It also marks every dataset prepared, as `prepare` checks that and mock data has no files.
"""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.features import image_feature

from mood_jax import convert
from mood_jax.ood import detector_format
from mood_jax.run import pipeline
from mood_jax.data import catalogue, data_config, input_pipeline, randaugment, transforms
from mood_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 40


def _pil_encode(self, image):
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format=self.encoding_format)
  return buffer.getvalue()


@contextlib.contextmanager
def _mock_tfds():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES), \
      mock.patch.object(image_feature._ImageEncoder, '_encode_image', _pil_encode), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
    yield


def _config(name, arg='smoke'):
  return runpy.run_path(os.path.join(ROOT, 'configs', f'{name}.py'))['get_config'](arg)


def _public_beit(path, release: str) -> None:
  """A random BEiT of the smoke size (mu/8 at 16 px), saved as BEiT's release saves its .pth
  ({'model': state dict}) under the public checkpoints' exact parameter names: pt22k with one
  shared relative position table, a final norm, the MIM mask token and visual-token head;
  pt22k_ft1k with per-block tables, fc_norm and the 1000-class head."""
  import torch
  import test_convert  # timm, behind its torchvision stand-in
  torch.manual_seed(0)
  pretraining = release.endswith('_pt22k')
  beit = test_convert.Beit(
      img_size=16, patch_size=8, embed_dim=96, depth=6, num_heads=3, init_values=0.1,
      use_abs_pos_emb=False, use_shared_rel_pos_bias=pretraining,
      use_rel_pos_bias=not pretraining, global_pool='token' if pretraining else 'avg',
      num_classes=0 if pretraining else 1000)
  state = dict(beit.state_dict())
  if pretraining:
    state.update(mask_token=torch.zeros(1, 1, 96), **{'lm_head.weight': torch.zeros(64, 96),
                                                      'lm_head.bias': torch.zeros(64)})
  torch.save({'model': state}, path)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """release -> its converted dir, made by the command that the missing-checkpoint error
  names (with --src pointing at the random stand-in)."""
  root = tmp_path_factory.mktemp('weights')
  dirs = {}
  for config_name in ('cifar10', 'imagenet'):
    config = _config(config_name)
    config.finetune.init_from = str(root / os.path.basename(config.finetune.init_from))
    with pytest.raises(UserError) as error, _mock_tfds():
      pipeline.validate(config, str(root / 'unused'))
    command = str(error.value).split('`')[1].split()
    src = command[command.index('--src') + 1]
    _public_beit(root / src, src.removesuffix('.pth'))
    command[command.index('--src') + 1] = str(root / src)
    assert command[:3] == ['python', '-m', 'mood_jax.convert'], command
    convert.main(command[3:])
    dirs[src.removesuffix('.pth')] = config.finetune.init_from
  return dirs


def _from_converted(config, converted):
  config.finetune.init_from = converted[os.path.basename(config.finetune.init_from)]
  return config


def test_missing_converted_checkpoint_names_it_where_it_is_and_the_command(tmp_path):
  config = _config('cifar10', '')
  config.finetune.init_from = str(tmp_path / 'pt22k')
  with pytest.raises(UserError) as error, _mock_tfds():
    pipeline.validate(config, str(tmp_path / 'work'))
  url = 'https://github.com/addf400/files/releases/download/v1.0/beit_large_patch16_224_pt22k.pth'
  assert str(error.value) == (
      f'no converted checkpoint at {tmp_path / "pt22k"}: download beit_large_patch16_224_pt22k.pth '
      f'from {url} and convert it with `python -m mood_jax.convert --src '
      'beit_large_patch16_224_pt22k.pth --variant L/16 --image_size 224 --rel_pos_per_block '
      f'--out {tmp_path / "pt22k"}`')
  assert not (tmp_path / 'work').exists()


# Each paper config's default: MOOD's stages from BEiT's public weights, converted. CIFAR-100
# and ImageNet-30 run CIFAR-10's stages (test_other_configs_validate_and_read_every_set).
@pytest.mark.parametrize('name,arg,models,scorers', [
    ('cifar10', 'smoke', {'finetune'}, {'mahalanobis_mood', 'msp'}),
    ('imagenet', 'smoke', {'converted'}, {'mahalanobis_mood', 'msp'}),  # its released head
    ('cifar10_oneclass', 'class=3,smoke', {'converted'}, {'mahalanobis_mood'}),
])
def test_paper_config_default_runs_moods_stages(name, arg, models, scorers, converted, tmp_path):
  config = _from_converted(_config(name, arg), converted)
  with _mock_tfds():
    pipeline.run(config, str(tmp_path))
  with open(tmp_path / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {r['model'] for r in results['rows']} == models
  assert {r['scorer'] for r in results['rows']} == scorers
  assert {r['ood_set'] for r in results['rows']} >= set(config.data.ood_sets)
  assert not (tmp_path / 'ckpt' / 'pretrain').exists()


def test_one_class_fine_tune_keeps_the_datasets_head(converted, tmp_path):
  """MOOD's one-class fine-tune: the one class keeps its label among CIFAR-10's ten logits,
  so the cross-entropy is not identically zero (a one-way head's is)."""
  config = _from_converted(_config('cifar10_oneclass', 'class=3,finetune,smoke'), converted)
  assert config.stages == 'finetune,evaluate' and config.evaluate.models == 'finetune'
  config.stages = 'finetune'  # scoring a fine-tuned model: the cifar10 test above
  with _mock_tfds():
    assert catalogue.source(config.data).num_classes() == 10
    labels = next(iter(input_pipeline.train_dataset(config.data, global_batch_size=8, seed=0)))
    assert set(labels['label']) == {3}
    pipeline.run(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    losses = [row['loss'] for row in map(json.loads, f) if row.get('stage') == 'finetune']
  assert losses and all(loss > 0.1 for loss in losses)


def test_from_scratch_preset_pretrains_then_fine_tunes(tmp_path):
  """Our pixel-target MIM instead of the public weights; cifar10_um adds UM's logit_ft (SGD),
  so one run covers both."""
  config = _config('cifar10_um', 'from_scratch,smoke')
  assert config.stages == 'pretrain,finetune,logit_ft,evaluate'
  assert config.finetune.init_from == 'pretrain'
  with _mock_tfds():
    pipeline.run(config, str(tmp_path))
  with open(tmp_path / 'results' / 'results.json') as f:
    rows = json.load(f)['rows']
  assert {r['ood_set'] for r in rows} >= set(config.data.ood_sets)
  assert {r['model'] for r in rows} == {'finetune', 'logit_ft'}


# Stanford Dogs and Oxford Pets are left out: mock data draws their boxes with min > max.
@pytest.mark.parametrize('name,arg,skip', [
    ('cifar100', 'smoke', ()),
    ('cifar10_oneclass', 'class=3,smoke', ()),
    ('cifar10_oneclass', 'superclass=4,smoke', ()),
    ('imagenet30', 'smoke', ('stanford_dogs', 'oxford_iiit_pet')),
])
def test_other_configs_validate_and_read_every_set(name, arg, skip, converted, tmp_path):
  config = _from_converted(_config(name, arg), converted)
  data = config.data
  with _mock_tfds():
    stages = pipeline.validate(config, str(tmp_path))
    catalogue.source(data).prepare()
    for which in ('id_train', 'id_test', *(s for s in data.ood_sets if s not in skip)):
      batches, count = input_pipeline.eval_dataset(data, which, global_batch_size=16)
      batch = next(iter(batches))
      assert batch['image'].shape == (16, data.image_size, data.image_size, 3), which
      assert count > 0
    train = next(iter(input_pipeline.train_dataset(data, global_batch_size=8, seed=0)))
  assert train['image'].shape == (8, data.image_size, data.image_size, 3)
  assert set(train['label']) <= set(range(catalogue.source(data).num_classes()))
  assert catalogue.source(data).channels == 3
  if name == 'imagenet30':  # the 30 synsets, named by TFDS label name, become indices
    assert catalogue.source(data).num_classes() == 30
  assert stages == (['evaluate'] if name == 'cifar10_oneclass' else ['finetune', 'evaluate'])


def _labels(name, split, key):
  source = tfds.data_source(name, split=split, download=False)
  return np.array([int(source[i][key]) for i in range(len(source))])


@pytest.mark.parametrize('arg,name,key', [('class=3', 'cifar10', 'label'),
                                          ('superclass=3', 'cifar100', 'coarse_label')])
def test_one_class_protocol_counts(arg, name, key):
  data = _config('cifar10_oneclass', f'{arg},smoke').data
  heldout = f'{name}_heldout'
  with _mock_tfds():
    train, test = _labels(name, 'train', key), _labels(name, 'test', key)
    counts = {which: input_pipeline.eval_dataset(data, which, global_batch_size=8)[1]
              for which in ('id_train', 'id_test', heldout)}
    batches = input_pipeline.eval_dataset(data, heldout, global_batch_size=8)[0]
    heldout_labels = np.concatenate([b['label'][b['valid']] for b in batches])
    id_labels = next(iter(input_pipeline.train_dataset(data, global_batch_size=8, seed=0)))['label']
  assert (test == 3).any() and (test != 3).any()  # the mock data has both
  assert counts == {'id_train': (train == 3).sum(), 'id_test': (test == 3).sum(),
                    heldout: (test != 3).sum()}
  assert np.all(heldout_labels == -1) and np.all(id_labels == 0)


def _batches(data, seed, count=2, state=None):
  iterator = iter(input_pipeline.train_dataset(data, global_batch_size=8, seed=seed))
  if state is not None:
    iterator.set_state(state)
  return [next(iterator)['image'] for _ in range(count)], iterator.get_state()


def test_train_transforms_are_deterministic_per_seed_step_and_index():
  data = _config('cifar10').data
  data.image_size, data.random_erasing = 32, 0.5
  with _mock_tfds():
    first, _ = _batches(data, seed=1)
    again, _ = _batches(data, seed=1)
    other, _ = _batches(data, seed=2)
    _, state = _batches(data, seed=1, count=1)
    resumed, _ = _batches(data, seed=1, count=1, state=state)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(first[0], other[0])
  np.testing.assert_array_equal(resumed[0], first[1])  # step 1 after resuming at step 1
  assert not np.array_equal(first[0], first[1])


def test_random_resized_crop_and_eval_crop():
  rows, cols = np.mgrid[:60, :40]
  image = np.stack([2 * rows + 2 * cols, 2 * rows, 2 * cols], axis=-1).astype(np.uint8)
  crop = transforms.RandomResizedCrop(16, flip=1.0)
  out = crop.random_map({'image': image}, np.random.default_rng(0))['image']
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  same = crop.random_map({'image': image}, np.random.default_rng(0))['image']
  np.testing.assert_array_equal(out, same)
  # Whole-image box, flipped: the flip of the plain resize.
  whole = transforms.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(40 / 60, 40 / 60), flip=1.0)
  flipped = whole.random_map({'image': image[:, :40]}, np.random.default_rng(0))['image']
  plain = np.asarray(PIL.Image.fromarray(image).resize((16, 16), PIL.Image.BICUBIC))
  np.testing.assert_array_equal(flipped, plain[:, ::-1])
  center = transforms.ResizeCenterCrop(16, crop_fraction=1.0).map({'image': image})['image']
  expected = np.asarray(PIL.Image.fromarray(image[10:50]).resize((16, 16), PIL.Image.BICUBIC))
  # One resize of the central box: resize-then-crop up to the filter's reach past the box.
  assert np.abs(center.astype(int) - expected).max() <= 2


def test_decode_names_the_bad_example():
  with pytest.raises(ValueError, match=r'^svhn \(test\): example 7 does not decode'):
    transforms.Decode('svhn (test)').map_with_index(7, {'image': b'not an image'})


def _encoded(pixels: np.ndarray, mode: str | None = None, **save) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels, mode).save(buffer, **save)
  return buffer.getvalue()


@pytest.mark.parametrize('how', ['jpeg_420', 'jpeg_444', 'progressive', 'gray_jpeg', 'cmyk_jpeg',
                                 'png', 'one_channel'])
def test_decode_gives_pils_pixels_within_the_decoder_tolerance(how):
  """JPEGs decode through simplejpeg (faster), the rest through PIL: the same pixels within
  transforms.DECODER_TOLERANCE either way."""
  rng = np.random.default_rng(0)
  rows, cols = np.mgrid[:61, :83]
  photo = np.clip(np.stack([rows * 3, cols * 2, rows + cols], -1) + rng.normal(0, 20, (61, 83, 3)),
                  0, 255).astype(np.uint8)
  data, channels = {
      'jpeg_420': (_encoded(photo, format='JPEG', quality=90), 3),
      'jpeg_444': (_encoded(photo, format='JPEG', quality=95, subsampling=0), 3),
      'progressive': (_encoded(photo, format='JPEG', progressive=True), 3),
      'gray_jpeg': (_encoded(photo[..., 0], format='JPEG'), 3),
      'cmyk_jpeg': (_encoded(np.concatenate([photo, photo[..., :1]], -1), 'CMYK',
                             format='JPEG'), 3),
      'png': (_encoded(photo, format='PNG'), 3),
      'one_channel': (_encoded(photo, format='JPEG'), 1)}[how]
  decoded = transforms.Decode('test', channels).map_with_index(0, {'image': data})['image']
  with PIL.Image.open(io.BytesIO(data)) as image:
    expected = transforms.converted(image, channels)
  assert decoded.shape == expected.shape == (61, 83, channels) and decoded.dtype == np.uint8
  assert np.abs(decoded.astype(int) - expected).max() <= transforms.DECODER_TOLERANCE
  # simplejpeg takes exactly the 3-channel YCbCr and grayscale JPEGs; PIL the rest.
  used_simplejpeg = transforms.decode_jpeg(data, channels) is not None
  assert used_simplejpeg == (how in ('jpeg_420', 'jpeg_444', 'progressive', 'gray_jpeg'))


def test_a_damaged_jpeg_is_reported_by_pil():
  data = _encoded(np.zeros((16, 16, 3), np.uint8), format='JPEG')[:40]
  with pytest.raises(UserError, match=r'cifar \(test\): example 3 does not decode'):
    transforms.Decode('cifar (test)').map_with_index(3, {'image': data})


def test_missing_dataset_names_dataset_dir_and_command(tmp_path):
  data = _config('cifar10').data
  data.data_dir = str(tmp_path)
  with pytest.raises(UserError) as error:
    catalogue.source(data).prepare()
  message = str(error.value)
  assert '\n' not in message
  assert message == (f'cifar10 is not prepared in {tmp_path}: run '
                     f'`python -m mood_jax.data.prepare cifar10 --data_dir={tmp_path}`')
  data.ood_sets = data.validation_ood_sets = ('openood:cifar10/val_tin',)
  with mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared',
                         lambda self: self.name != 'mood_folder'):
    with pytest.raises(UserError, match=r'^openood:cifar10/val_tin is not prepared in .*: run '
                                        r'`python -m mood_jax.data.prepare openood:cifar10/val_tin '
                                        r".*--manual_dir=DIR` \(DIR: OpenOOD's data/ folder\)$"):
      catalogue.source(data).prepare()
  data.validation_ood_sets = ()
  data.ood_sets = ('folder:ninco',)
  with mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared',
                         lambda self: self.name != 'mood_folder'):
    with pytest.raises(UserError, match=r'^folder:ninco is not prepared in .*mood_jax.data.folder '
                                        r'--name=ninco'):
      catalogue.source(data).prepare()


def test_missing_dataset_through_the_cli(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'mood_jax.main', '--config=configs/imagenet.py:from_scratch,smoke',
       f'--workdir={tmp_path / "work"}', f'--config.data.data_dir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'error: imagenet2012 is not prepared in {tmp_path}: run `python -m mood_jax.data.prepare '
      f'imagenet2012 --data_dir={tmp_path} --manual_dir=DIR`')


@pytest.mark.parametrize('overrides,message', [
    (dict(ood_sets=('kmnist',)), r"unknown OOD set 'kmnist' for data.name='cifar10': valid: "
                                 r"\['cifar10_heldout', 'cifar10_heldout_val', 'cifar100'"),
    (dict(ood_sets=('svhn_cropped',), validation_ood_sets=('dtd',)),
     r"validation_ood_sets \['dtd'\] are not in data.ood_sets"),
    (dict(id_classes=(3, 'n0000')), r"id_classes \['n0000'\] are not among the classes of "
                                     r'cifar10 \(0..9, or their TFDS label names\)'),
    (dict(label_key='coarse_label'), r"data.label_key='coarse_label' is not a class label of "
                                     r"cifar10: valid: \['label'\]"),
])
def test_bad_real_data_settings(overrides, message, tmp_path):
  config = _config('cifar10')
  config.data.update(overrides)
  with pytest.raises(UserError, match=message):
    pipeline.validate(config, str(tmp_path))


def test_ood_groups_follow_openood_and_validation_sets():
  data = _config('cifar10').data
  data.ood_sets = ('cifar100', 'folder:tin', 'svhn_cropped', 'folder:tin_val')
  data.validation_ood_sets = ('folder:tin_val',)
  assert catalogue.source(data).ood_groups() == {
      'cifar100': 'near', 'folder:tin': 'near', 'svhn_cropped': 'far',
      'folder:tin_val': 'validation'}


def test_the_embedded_digits_score_a_tfds_dataset_too():
  """Shared OOD sets are read by every source: here grayscale at the digits' size, and a
  validation set when data.validation_ood_sets names it."""
  data = data_config.default_data_config()
  data.ood_sets = data.validation_ood_sets = ('svhn_cropped',)
  with _mock_tfds():
    assert catalogue.source(data).ood_groups() == {'svhn_cropped': 'validation'}
    batches, count = input_pipeline.eval_dataset(data, 'svhn_cropped', global_batch_size=16)
    batch = next(iter(batches))
  assert count == MOCK_EXAMPLES and batch['image'].shape == (16, 24, 24, 1)
  assert np.all(batch['label'][batch['valid']] == -1)


@pytest.mark.parametrize('name', randaugment.OPS)
def test_randaugment_operations_keep_shape_and_dtype(name):
  image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
  for magnitude in (0.0, 5.0, 10.0):
    out = np.asarray(randaugment._OPS[name](image, magnitude, np.random.default_rng(1)))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8, (name, magnitude)


def test_randaugment_is_a_function_of_its_rng():
  image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  augment = randaugment.RandAugment(num_ops=3, magnitude=9.0)
  outs = [augment.random_map({'image': image}, np.random.default_rng(seed))['image']
          for seed in (5, 5, 6, 7, 8)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert any(not np.array_equal(outs[0], out) for out in outs[2:])


def test_id_train_bank_with_training_transforms():
  """MOOD's ID-train bank: each example once, in order, through one seeded training draw."""
  data = _config('cifar10').data
  with _mock_tfds():
    def bank(**kwargs):
      batches, count = input_pipeline.eval_dataset(data, 'id_train', global_batch_size=8,
                                                   **kwargs)
      batches = list(batches)
      return (np.concatenate([b['image'][b['valid']] for b in batches]),
              np.concatenate([b['label'][b['valid']] for b in batches]), count)
    plain, augmented, again, other = (bank(), bank(augment=True, seed=0),
                                      bank(augment=True, seed=0), bank(augment=True, seed=1))
  assert plain[2] == augmented[2] == len(augmented[0])
  np.testing.assert_array_equal(plain[1], augmented[1])
  np.testing.assert_array_equal(augmented[0], again[0])
  assert not np.array_equal(plain[0], augmented[0])
  assert not np.array_equal(augmented[0], other[0])


def test_color_jitter_scales_brightness_contrast_saturation_within_its_strength():
  photo = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.ColorJitter(0.0).random_map(
      {'image': photo}, np.random.default_rng(0))['image'], photo)
  jitter = transforms.ColorJitter(0.4)
  out = jitter.random_map({'image': photo}, np.random.default_rng(1))['image']
  again = jitter.random_map({'image': photo}, np.random.default_rng(1))['image']
  assert out.shape == photo.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, photo)
  # A uniform gray image keeps its contrast and saturation: only brightness moves it, by a
  # factor in [0.6, 1.4], and over many draws across most of that range.
  gray = np.full((4, 4, 3), 100, np.uint8)
  values = [jitter.random_map({'image': gray}, np.random.default_rng(i))['image']
            for i in range(200)]
  assert all((v == v[0, 0, 0]).all() for v in values)
  factors = np.array([v[0, 0, 0] for v in values]) / 100
  assert factors.min() >= 0.59 and factors.max() <= 1.41
  assert factors.min() < 0.7 and factors.max() > 1.3


def test_augment_choices():
  data = _config('cifar10').data
  with _mock_tfds():
    crop_only = next(iter(input_pipeline.train_dataset(data, global_batch_size=4, seed=0,
                                                       augment='crop')))
  assert crop_only['image'].shape == (4, data.image_size, data.image_size, 3)
  crop_ops = [type(op) for op in input_pipeline.train_transforms(data, 'crop')]
  assert crop_ops[:2] == [transforms.ColorJitter, transforms.RandomResizedCrop]  # BEiT's order
  assert transforms.ColorJitter not in map(type, input_pipeline.train_transforms(data, True))


def test_cifar_benchmarks_bring_every_image_to_the_id_size_first():
  """OpenOOD's CIFAR benchmarks: every image, ID and OOD, at 32 px before the network's
  resize (its preprocessor.py), so an OOD set of larger images is not sharper than CIFAR."""
  data = _config('cifar10').data
  assert data.native_size == 32
  assert detector_format.preprocessing(data, 3)['native_size'] == 32
  assert '32 px' in detector_format.preprocessing(data, 3)['rule']
  ood_set = 'openood:cifar10/test_tin'
  with _mock_tfds():
    source = catalogue.source(data)
    source.prepare()
    location = source.locate(ood_set)
    with PIL.Image.open(io.BytesIO(location.read(source.data_dir, ood_set)[0]['image'])) as f:
      raw = np.asarray(f.convert('RGB'))
    batches, _ = input_pipeline.eval_dataset(data, ood_set, global_batch_size=8)
    image = next(iter(batches))['image'][0]
  assert raw.shape[:2] != (32, 32)
  def through(*ops):
    example = {'image': raw}
    for op in (*ops, transforms.ResizeCenterCrop(data.image_size, data.eval_crop_fraction),
               transforms.Normalize(data.mean, data.std)):
      example = op.map(example)
    return example['image']
  np.testing.assert_array_equal(image, through(transforms.ToNativeSize(32)))
  assert not np.array_equal(image, through())
