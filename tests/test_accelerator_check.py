"""benchmarks/accelerator_check.py: its CPU rehearsal runs every part, and the digits job's
results are held against a CPU reference, metric by metric."""

import copy
import json
import os
import subprocess
import sys

import pytest

from benchmarks import accelerator_check
from mood_jax.data import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_FLAGS = accelerator_check.SIZES['smoke']['digits_flags']
# The default rehearsal's parts; the attention and input pipeline parts run in a slow test.
MAIN_PARTS = ('train_step', 'scoring', 'digits')


def _check(*args, env):
  return subprocess.run([sys.executable, '-m', 'benchmarks.accelerator_check', *args], cwd=REPO,
                        env=env, capture_output=True, text=True)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, data_dir, env):
  """(out dir, report) of one --smoke run, its digits workdir kept in OUT/digits."""
  out = tmp_path_factory.mktemp('check')
  run = _check('--smoke', f'--parts={",".join(MAIN_PARTS)}', f'--out={out}/check.json',
               f'--data_dir={data_dir}',
               f'--digits_workdir={out}/digits', f'--reference={out}/no_reference.json', env=env)
  assert run.returncode == 0, run.stdout + run.stderr
  with open(out / 'check.json') as f:
    return out, json.load(f)


@pytest.mark.slow  # the rehearsal: minutes of runs
def test_the_rehearsal_runs_every_part(smoke):
  out, report = smoke
  assert report['errors'] == {} and set(report['parts']) == set(MAIN_PARTS)
  train = report['parts']['train_step']
  for step in accelerator_check.STEPS:
    row = train[step]
    assert row['compute'] == {'dtype': 'float32', 'attention': 'einsum'}  # 'auto' on CPU
    assert row['ours']['images_per_s'] > 0 and row['ratio_ours_to_torch'] > 0
    assert 0 < row['mfu_dry_run'] < 1
    # XLA's count and the analytic one describe the same step.
    assert 0.5 < row['flops_per_step_dry_run'] / row['flops_per_step_analytic'] < 2
    assert row['memory']['dry_run_estimate_gib'] > 0
    assert row['memory']['measured_peak_gib'] is None  # the CPU backend has no memory stats
    assert row['data_parallel']['devices'] == accelerator_check.SMOKE_DEVICES
  for row in report['parts']['scoring']['device']['results'].values():
    assert row['median_s'] > 0 and row['max_abs_diff_to_cpu'] < 1e-4
  digits = report['parts']['digits']
  assert list(digits['stage_s']) == ['finetune', 'evaluate']
  assert all(seconds > 0 for seconds in digits['stage_s'].values())
  assert not digits['comparison']['compared'] and 'no reference' in digits['comparison']['why']
  assert digits['compute'] == {'backend': 'cpu', 'dtype': 'float32', 'attention': 'einsum'}
  assert digits['mfu_from_log'] == {'finetune': None}  # no peak FLOP/s known for a CPU
  summary = (out / 'check.md').read_text()
  assert '## Train step' in summary and 'Not compared: no reference' in summary


@pytest.mark.slow
def test_the_rehearsal_times_both_attentions_and_the_input_pipeline(tmp_path, env):
  run = _check('--smoke', '--parts=attention,input_pipeline', f'--out={tmp_path}/check.json',
               env=env)
  assert run.returncode == 0, run.stdout + run.stderr
  report = json.loads((tmp_path / 'check.json').read_text())
  assert report['errors'] == {}
  for step in accelerator_check.STEPS:
    row = report['parts']['attention'][step]
    assert row['einsum']['median_step_ms'] > 0 and row['fused']['median_step_ms'] > 0
    assert row['fused_implementation'] == 'xla'  # cuDNN's only on a GPU
    assert row['einsum_over_fused_step_time'] == pytest.approx(
        row['einsum']['median_step_ms'] / row['fused']['median_step_ms'])
  assert report['parts']['attention']['finetune']['options']['rel_pos_bias'] == 'block'
  pipeline = report['parts']['input_pipeline']
  assert set(pipeline['per_core']) >= {'PIL', 'simplejpeg'}
  assert all(row['train'] > 0 and row['pixels_vs_pil']['max_abs'] <= transforms.DECODER_TOLERANCE
             for row in pipeline['per_core'].values())
  assert set(pipeline['grain_train']) == {'0', '1'}  # JSON keys
  for chip in ('H100 SXM', 'TPU v4'):
    feed = pipeline['feed_at_50pct_mfu'][chip]
    assert feed['cores'] == pytest.approx(
        feed['images_per_s'] / pipeline['per_core'][pipeline['default_decoder']]['train'])
  summary = (tmp_path / 'check.md').read_text()
  assert '## Attention: einsum against fused' in summary and '## Input pipeline' in summary


@pytest.mark.slow  # the rehearsal: minutes of runs
def test_a_reference_from_a_cpu_run_flags_exactly_what_differs(smoke, env, tmp_path):
  out, report = smoke
  path = tmp_path / 'reference.json'
  run = _check('--smoke', f'--write_reference={out}/digits', f'--reference={path}', env=env)
  assert run.returncode == 0, run.stderr
  with open(out / 'digits' / 'results' / 'results.json') as f:
    results = json.load(f)
  reference = json.loads(path.read_text())
  assert reference['rows'] == results['rows'] and reference['flags'] == SMOKE_FLAGS

  same = accelerator_check._against_reference(str(path), SMOKE_FLAGS, results)
  assert same['compared'] and same['same_code'] and same['within_tolerance']
  assert same['by_metric']['auroc']['compared'] == len(results['rows'])

  changed = copy.deepcopy(reference)
  changed['rows'][0]['auroc'] += 0.1                      # beyond AUROC's tolerance
  model = next(iter(changed['id_accuracy']))
  changed['id_accuracy'][model] -= 0.01                   # within ID accuracy's
  for row in changed['rows']:                             # a metric renamed (issue 17 does)
    row['aupr_old'] = row.pop('aupr_in')
  comparison = accelerator_check.compare(changed, results)
  first = results['rows'][0]
  assert [(b['model'], b['scorer'], b['ood_set'], b['metric']) for b in comparison['beyond']] == [
      (first['model'], first['scorer'], first['ood_set'], 'auroc')]
  assert not comparison['within_tolerance']
  assert comparison['metrics_only_in_reference'] == ['aupr_old']
  assert comparison['metrics_only_in_this_run'] == ['aupr_in']

  shown = copy.deepcopy(report)
  shown['parts']['digits']['comparison'] = {**comparison, 'compared': True, 'reference': 'r.json',
                                            'reference_commit': 'abc'}
  summary = accelerator_check.markdown(shown)
  assert f'| {first["model"]} | {first["scorer"]} | {first["ood_set"]} | auroc |' in summary
  assert '1 values beyond tolerance' in summary and 'not compared: aupr_old' in summary

  other = accelerator_check._against_reference(str(path), '--config=configs/digits.py', results)
  assert not other['compared'] and SMOKE_FLAGS in other['why']


@pytest.mark.parametrize('args, message', [
    (['--write_reference=WORKDIR'], 'error: no WORKDIR/results/results.json: run the main job'),
    (['--smoke', '--parts=train_step,gpu'], 'error: --parts=train_step,gpu: name one or more of'),
])
def test_bad_input_is_one_line(args, message, tmp_path, env):
  args = [arg.replace('WORKDIR', str(tmp_path / 'run')) for arg in args]
  message = message.replace('WORKDIR', str(tmp_path / 'run'))
  run = _check(*args, f'--out={tmp_path}/check.json', f'--reference={tmp_path}/ref.json', env=env)
  assert run.returncode != 0 and run.stderr.strip().startswith(message), run.stderr
  assert len(run.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'ref.json').exists()
