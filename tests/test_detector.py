"""A trained detector on new image files: evaluate's detector/, export, the score CLI and the
Detector API give evaluate's own scores of the same images, and bad input is one line."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from configs import digits
from mood_jax import export, score
from mood_jax.data import input_pipeline
from mood_jax.detector import Detector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, SCORERS, OOD_SET, PER_SET = 'finetune', ('mahalanobis_mood', 'msp'), 'textures', 24


def _run(module, *args, env):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env)


@pytest.fixture(scope='module')
def trained(smoke_run):
  """The shared smoke run (conftest.py), read-only: its detector keeps the fine-tuned model
  with two scorers and two thresholds."""
  return smoke_run.workdir


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'detector')
  export.main([f'--workdir={trained}', f'--out={out}', '--model=finetune',
               f'--scorers={",".join(SCORERS)}', '--tprs=0.95,0.8'])
  return out


def _error(main, argv) -> str:
  """The one-line message a CLI `main` exits with."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  message = str(exit_info.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  return message


def _uint8_images(data_dir, which):
  """The first PER_SET images of `which` as evaluate reads them, back to uint8."""
  config = digits.get_config('split,smoke')  # the smoke run's config
  config.data.data_dir = data_dir
  batches, _ = input_pipeline.eval_dataset(config.data, which, global_batch_size=PER_SET)
  batch = next(iter(batches))
  return np.round((batch['image'] * config.data.std + config.data.mean) * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def pngs(smoke_run, tmp_path_factory):
  """{set: (uint8 images, PNG paths)}: ID test and OOD test images written as files."""
  root = tmp_path_factory.mktemp('pngs')
  written = {}
  for which, folder in (('id_test', 'id'), (OOD_SET, 'ood')):
    images = _uint8_images(smoke_run.data_dir, which)
    os.makedirs(root / folder)
    paths = [str(root / folder / f'{i:03d}.png') for i in range(len(images))]
    for image, path in zip(images, paths):
      PIL.Image.fromarray(image[..., 0]).save(path)
    written[which] = (images, paths)
  return root, written


def _evaluate_scores(workdir):
  """{(set, scorer): evaluate's scores of that set's first PER_SET images}."""
  with np.load(os.path.join(workdir, 'results', 'scores.npz')) as npz:
    return {(which, scorer): npz[f'{MODEL}/{scorer}/{key}'][:PER_SET]
            for which, key in (('id_test', 'id'), (OOD_SET, OOD_SET)) for scorer in SCORERS}


def test_export_writes_what_evaluate_wrote(trained, exported):
  with open(os.path.join(trained, 'detector', 'detector.json')) as f:
    from_evaluate = json.load(f)
  with open(os.path.join(exported, 'detector.json')) as f:
    from_export = json.load(f)
  assert from_export['model']['name'] == MODEL and list(from_export['scorers']) == list(SCORERS)
  assert from_export['thresholds_set_on']['split'] == 'id_test'
  for scorer in SCORERS:
    assert set(from_export['thresholds'][scorer]) == {'tpr95', 'tpr80'}
    for tpr, value in from_evaluate['thresholds'][scorer].items():
      np.testing.assert_allclose(from_export['thresholds'][scorer][tpr], value, rtol=1e-6)


def test_scores_npz_carries_each_examples_split_index(trained):
  with np.load(os.path.join(trained, 'results', 'scores.npz')) as npz:
    for which in ('id', OOD_SET):
      ids = npz[f'ids/{which}']
      assert ids.dtype.kind == 'i' and len(ids) == len(npz[f'{MODEL}/msp/{which}'])
    # Every texture is OOD: all kept, in order. ID is digits 0-4 of the test split: some kept.
    np.testing.assert_array_equal(npz[f'ids/{OOD_SET}'], np.arange(len(npz[f'ids/{OOD_SET}'])))
    assert (np.diff(npz['ids/id']) > 0).all() and npz['ids/id'][-1] >= len(npz['ids/id'])


def test_thresholds_accept_their_true_positive_rate_of_id_test(trained):
  detector = Detector.load(os.path.join(trained, 'detector'))
  with np.load(os.path.join(trained, 'results', 'scores.npz')) as npz:
    scores = {scorer: npz[f'{MODEL}/{scorer}/id'] for scorer in SCORERS}
  for column, flagged in detector.decisions(scores).items():
    tpr = float(column.rsplit('_tpr', 1)[1]) / 100
    accepted = 1 - np.mean(flagged)
    assert tpr <= accepted < tpr + 0.02, (column, accepted)  # ties and rounding only


def test_score_cli_gives_evaluates_scores_and_decisions(trained, exported, pngs, env, tmp_path):
  root, written = pngs
  out = tmp_path / 'scores.csv'
  proc = _run('mood_jax.score', f'--detector={exported}', f'--out={out}', str(root), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    rows = {row['path']: row for row in csv.DictReader(f)}
  assert len(rows) == 2 * PER_SET
  thresholds = Detector.load(exported).meta['thresholds']
  for (which, scorer), expected in _evaluate_scores(trained).items():
    got = np.array([float(rows[path][scorer]) for path in written[which][1]])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-6)
    for tpr, value in thresholds[scorer].items():
      decided = [rows[path][f'ood_{scorer}_{tpr}'] for path in written[which][1]]
      assert decided == [str(s < value).lower() for s in got]
  assert f'ood_msp_tpr95: ' in proc.stdout  # the summary counts flagged images


def test_api_on_paths_and_arrays_gives_evaluates_scores(trained, exported, pngs):
  _, written = pngs
  detector = Detector.load(exported)
  for (which, scorer), expected in _evaluate_scores(trained).items():
    images, paths = written[which]
    for result in (detector.score(paths), detector.score(images)):
      np.testing.assert_allclose(result.scores[scorer], expected, atol=1e-5, rtol=1e-6)
      for column, flagged in detector.decisions(result.scores).items():
        np.testing.assert_array_equal(result.ood[column], flagged)


def test_other_sizes_and_channels_follow_the_stated_rule(exported, pngs):
  """RGB copies of grayscale images score as the grayscale ones; a larger image is resized."""
  _, written = pngs
  detector = Detector.load(exported)
  images = written['id_test'][0][:4]
  gray = detector.score(images).scores
  rgb = detector.score(np.repeat(images, 3, axis=-1)).scores
  for scorer in SCORERS:
    np.testing.assert_allclose(rgb[scorer], gray[scorer], atol=1e-5, rtol=1e-6)
  large = [np.asarray(PIL.Image.fromarray(image[..., 0]).resize((40, 32)))[..., None]
           for image in images]
  assert all(np.isfinite(s).all() for s in detector.score(large).scores.values())
  assert 'central 16 px square' in detector.meta['preprocessing']['rule']


def test_score_cli_skips_broken_files_and_writes_jsonl(exported, pngs, tmp_path, capsys):
  _, written = pngs
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not an image')
  listed = tmp_path / 'list.txt'
  listed.write_text(f'{written["id_test"][1][0]}\nmissing.png\n')
  out = tmp_path / 'scores.jsonl'
  score.main([f'--detector={exported}', f'--out={out}', str(broken), str(listed),
              str(tmp_path / 'nothing*.png')])
  stderr = capsys.readouterr().err
  assert f'unreadable: {broken}:' in stderr
  assert f'unreadable: {tmp_path / "missing.png"}:' in stderr
  assert 'skipped: ' in stderr and 'no file matches it as a glob' in stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row['path'] for row in rows] == [written['id_test'][1][0]]
  assert isinstance(rows[0]['ood_msp_tpr95'], bool)


def test_long_inputs_show_progress_with_rate_and_eta(exported, pngs, monkeypatch):
  _, written = pngs
  monkeypatch.setattr(score, '_BATCHES_PER_STEP', 1)  # a step of one batch: 64 images
  monkeypatch.setattr(score, '_PROGRESS_EVERY_S', 0.)
  lines = []
  rows, _ = score.score_files(Detector.load(exported), written['id_test'][1] * 6,
                              log=lines.append)
  assert len(rows) == 144
  assert [line.split(' images,')[0] for line in lines] == ['64/144', '128/144']
  assert all(re.fullmatch(r'\d+/144 images, [\d.]+ images/s, ETA \d+ s', line) for line in lines)


@pytest.mark.parametrize('case', ['empty_folder', 'only_broken', 'not_a_detector'])
def test_score_cli_bad_input_is_one_line_and_nonzero(exported, tmp_path, case):
  folder = tmp_path / 'images'
  folder.mkdir()
  detector = exported
  if case != 'empty_folder':
    (folder / 'a.png').write_bytes(b'broken')
  if case == 'not_a_detector':
    detector = str(tmp_path)
  out = tmp_path / 'out.csv'
  message = _error(score.main, [f'--detector={detector}', f'--out={out}', str(folder)])
  assert {'empty_folder': 'no image files', 'only_broken': 'could be read as an image',
          'not_a_detector': 'is not a detector directory'}[case] in message
  assert not out.exists()


def test_export_never_overwrites(trained, exported):
  before = sorted(os.listdir(exported))
  assert 'already exists' in _error(export.main, [f'--workdir={trained}', f'--out={exported}'])
  assert sorted(os.listdir(exported)) == before


def test_export_needs_a_finished_run(tmp_path):
  assert 'no finished training stage' in _error(
      export.main, [f'--workdir={tmp_path}', f'--out={tmp_path / "detector"}'])


def test_user_scorer_and_a_layer_scorer_work_through_the_detector_and_score(
    trained, pngs, tmp_path, monkeypatch):
  """The registry docstring's example, registered from this (user) code, and a layer scorer
  (gram, its own forward pass) go into a detector, which scores image files through the
  `score` command's entry point and arrays through the API, as evaluate's fit scores them."""
  import jax.numpy as jnp  # noqa: PLC0415
  from mood_jax import parallel  # noqa: PLC0415
  from mood_jax.ood import detector_format, extraction, scorers  # noqa: PLC0415
  monkeypatch.setattr(scorers.base, '_REGISTRY', dict(scorers.base._REGISTRY))  # others kept
  scorers.register(scorers.Scorer(  # the module docstring's example, verbatim
      name='feature_norm',
      fit=lambda features, logits, labels, head: {},
      score=lambda stats, features, logits: jnp.linalg.norm(features, axis=-1),
      needs_logits=False))
  config = export.saved_config(trained)
  config.evaluate.detector = dict(write=True, model=MODEL, scorers='feature_norm,gram',
                                  tprs=(0.95,))
  mesh = parallel.make_mesh((('data', -1),))
  hparams = {'feature_norm': {}, 'gram': dict(scorers.get('gram').hparams)}
  params, fitted, id_scores = export.fit_chosen(config, trained, parallel.Placement(mesh),
                                                MODEL, hparams)
  meta = detector_format.metadata(config, model=MODEL,
                                  num_classes=params['head']['bias'].shape[0], channels=1,
                                  scorers=[s for s, _ in fitted.values()], id_scores=id_scores,
                                  chosen_by='named by the test')
  out = str(tmp_path / 'detector')
  detector_format.save(out, meta, params, {n: stats for n, (_, stats) in fitted.items()},
                       replace=False)

  images, paths = pngs[1]['id_test']
  loaded = Detector.load(out)
  from_arrays = loaded.score(images).scores
  # feature_norm is the norm of the model's pooled feature; gram scores as the fit did.
  features, _ = extraction.make_forward(loaded.model, mesh)(loaded.params, loaded.normalize(images))
  np.testing.assert_allclose(from_arrays['feature_norm'], np.linalg.norm(features, axis=-1),
                             rtol=1e-5)
  np.testing.assert_allclose(from_arrays['gram'], id_scores['gram'][:PER_SET], rtol=1e-4,
                             atol=1e-5)
  csv_path = tmp_path / 'scores.csv'
  score.main([f'--detector={out}', f'--out={csv_path}', *paths])
  with open(csv_path) as f:
    rows = {row['path']: row for row in csv.DictReader(f)}
  for name in ('feature_norm', 'gram'):
    np.testing.assert_allclose([float(rows[p][name]) for p in paths], from_arrays[name],
                               rtol=1e-5, atol=1e-5, err_msg=name)
