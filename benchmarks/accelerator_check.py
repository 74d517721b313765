"""One command for a short accelerator window: what this project has never measured on a GPU.

  python -m benchmarks.accelerator_check [--out=benchmarks/results/accelerator_check.json]
      [--parts=train_step,scoring,digits] [--reference=benchmarks/results/digits_cpu_reference.json]
  python -m benchmarks.accelerator_check --smoke --out=/tmp/check.json      # CPU rehearsal
  python -m benchmarks.accelerator_check --write_reference=WORKDIR          # see "Reference"

Each measurement runs in a process of its own (this one never starts a JAX backend, so it
holds no device memory), and the JSON and its Markdown summary (OUT with .md) are rewritten
after each part, so a window that closes early keeps what was measured. Parts, in order:

  train_step  MAE pretraining (75% masked) and fine-tuning, B/16 at 224 px, model.dtype='auto'
              (bfloat16 on an accelerator) and model.attention='auto' (fused there), batch
              128, on one device: benchmarks/train_step.py's steps, ours and timm/PyTorch's
              alternating. Images/s; MFU from the dry run's FLOP count (mood_jax/run/dry_run.py:
              XLA's count of the step, the figure `--config.dry_run=True` prints) and from
              train_step.py's analytic count, over the device's dense bf16 peak (its source
              in the JSON); our step's peak device memory (the allocator's peak_bytes_in_use)
              against the dry run's estimate for the same config, compiled for the host CPU
              as the dry run is, and against XLA's plan for the device itself. With more than
              one device, the step again data-parallel over all of them (the batch per device
              unchanged) and its scaling efficiency.
  attention   our two steps again with the einsum and the fused attention
              (jax.nn.dot_product_attention: cuDNN's kernel on a GPU in bfloat16), alternating;
              the fine-tune step with BEiT's relative position bias per block, its bias.
  input_pipeline  benchmarks/input_pipeline.py on the device host's cores: the decoders x
              ImageNet transforms per core, grain with 0..16 workers, and the cores that feed
              one H100 or TPU v4 chip at 50% MFU at the measured rate.
  scoring     knn and MOOD's Mahalanobis, fit + score (benchmarks/ood_scoring.py's runs), on
              a 50,000 x 768 bank and 10,000 queries, on the device and on the host CPU.
  digits      the main job on configs/digits.py as a user runs it (data-parallel over every
              visible device), its wall time per stage, the MFU its log lines report (median
              per stage; none where the device's peak is unknown), and its results against
              the CPU reference of the same code: ID accuracy and every metric the rows carry.

--smoke runs every part at tiny sizes on CPU, with 2 fake devices for data parallelism (the
digits job: its smoke config, finetune and evaluate only): tests/test_accelerator_check.py
runs it, so that the script works when a GPU appears.

Reference. A GPU run's results differ from a CPU run's by float rounding (TF32 matmuls,
other reduction orders), which 1,200 training steps amplify much as a change of seed does;
TOLERANCES is what we accept as that, not a derived bound, and every value beyond it is
listed. The reference is a CPU run of the same code, written from its results.json:

  python -m mood_jax.main --config=configs/digits.py --workdir=/tmp/digits_cpu
  python -m benchmarks.accelerator_check --write_reference=/tmp/digits_cpu

It records the job's config flags and a digest of the code (mood_jax/, configs/): a reference
of other flags is not compared, one of other code is compared under a warning.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from mood_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('train_step', 'attention', 'input_pipeline', 'scoring', 'digits')
STEPS = ('pretrain', 'finetune')
SIZES = {
    'gpu': dict(train=dict(variant='B/16', image_size=224, batch_size=128, data='imagenet2012',
                           dtype='auto'),  # bfloat16 on an accelerator
                steps=20, warmup=3, bank=50_000, queries=10_000, dim=768, repeats=5,
                jpegs=64, grain_workers=(0, 1, 2, 4, 8, 16),
                digits_flags='--config=configs/digits.py'),
    # 'auto' is float32 on CPU: XLA:CPU compiles the bfloat16 step ~1.5x slower, and the code
    # path is the same
    'smoke': dict(train=dict(variant='mu/8', image_size=16, batch_size=8, data='cifar10',
                             dtype='auto'),
                  steps=2, warmup=1, bank=512, queries=128, dim=32, repeats=1,
                  jpegs=8, grain_workers=(0, 1),
                  # two stages: the job's plumbing, not its every stage, is rehearsed
                  digits_flags='--config=configs/digits.py:smoke --config.stages=finetune,'
                               'evaluate --config.finetune.init_from=scratch'),
}
SMOKE_DEVICES = 2
# Largest |GPU - CPU| accepted per metric (values in [0, 1]); any AUROC-named metric takes
# 'auroc''s, any other metric the rows carry 'other'.
TOLERANCES = {'id_accuracy': 0.02, 'auroc': 0.03, 'other': 0.05}
KEY_FIELDS = ('model', 'scorer', 'ood_set')
# The targets, reported as measured, never asserted.
TARGETS = {'finetune MFU (dry-run FLOPs)': '>= 0.45', 'pretrain / finetune images/s': '>= 2.5',
           'einsum / fused attention step time': '>= 1.0',
           'ours / torch images/s': '>= 1.0', 'measured peak / dry-run estimate': '0.9 to 1.1'}
# pipeline.run's line as a stage starts (logit_ft's "starting from ..." is not one).
STAGE_START = re.compile(r'\] \[(\w+)\] starting(?! from)')
DEFAULT_REFERENCE = os.path.join('benchmarks', 'results', 'digits_cpu_reference.json')


# --- Children: each measurement in its own process. ---

def _train_child(step: str, sizes: dict) -> dict:
  """One training step on one device, ours and torch's; its memory against the dry run's
  estimate; then data-parallel over every device when there are several."""
  import jax  # noqa: PLC0415 (children only: the parent holds no device)

  from benchmarks import train_step  # noqa: PLC0415
  from mood_jax import parallel  # noqa: PLC0415
  from mood_jax.models import vit  # noqa: PLC0415
  from mood_jax.run import dry_run  # noqa: PLC0415

  setting, devices = sizes['train'], jax.devices()
  gpu = jax.default_backend() == 'gpu'
  config, one_device = train_step.config_for(setting), _mesh_of(devices[:1])
  peak, peak_how = train_step.peak_flops()
  # The dry run as a user runs it, compiled for the host CPU; and XLA's plan for the device.
  estimate, = dry_run.compile_steps(config, [step],
                                    parallel.Placement(_mesh_of(jax.devices('cpu')[:1])))
  device_plan, = dry_run.compile_steps(config, [step], parallel.Placement(one_device))
  images, labels = _random_batch(config, setting['batch_size'])
  impls, notes = {'ours': train_step.ours_step(step, config, one_device, images, labels)}, []
  try:
    impls['torch'] = train_step.torch_step(step, config, gpu, images, labels)
  except ImportError as e:
    notes.append(f'torch/timm not importable ({e}): ours only; docs/benchmarks.md '
                 'has the install line')
  timing = train_step.time_steps(impls, sizes['warmup'], sizes['steps'])
  measured = (devices[0].memory_stats() or {}).get('peak_bytes_in_use')
  flops = train_step.train_flops_per_image(config, step)
  result = {name: train_step.summary(row, setting['batch_size'], flops, peak)
            for name, row in timing.items()}
  ours = result['ours']
  result.update(
      setting=setting, compute=vit.compute_settings(config.model),
      backend=jax.default_backend(), device=devices[0].device_kind,
      peak_flops=peak, peak_flops_how=peak_how, notes=notes,
      flops_per_step_dry_run=estimate['flops_per_device'],
      flops_per_step_analytic=flops * setting['batch_size'],
      mfu_dry_run=(estimate['flops_per_device'] / (ours['median_step_ms'] / 1e3) / peak
                   if peak else None),
      memory={'measured_peak_gib': measured / 2**30 if measured is not None else None,
              'measured_how': 'memory_stats()["peak_bytes_in_use"] of the device after the '
                              'timed steps' if measured is not None else
                              f'{jax.default_backend()} reports no memory stats',
              'dry_run_estimate_gib': _live_gib(estimate),
              'device_plan_gib': _live_gib(device_plan),
              'dry_run': estimate, 'device_plan': device_plan})
  if 'torch' in impls:
    result['ratio_ours_to_torch'] = ours['images_per_s'] / result['torch']['images_per_s']
    if gpu:
      import torch  # noqa: PLC0415
      result['memory']['torch_peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
  if len(devices) > 1:
    many = dict(setting, batch_size=setting['batch_size'] * len(devices))
    config = train_step.config_for(many)
    run_step = train_step.ours_step(step, config, _mesh_of(devices),
                                    *_random_batch(config, many['batch_size']))
    timing = train_step.time_steps({'ours': run_step}, sizes['warmup'], sizes['steps'])
    row = train_step.summary(timing['ours'], many['batch_size'], flops, peak)
    result['data_parallel'] = {
        'devices': len(devices), 'batch_size': many['batch_size'], **row,
        'scaling_efficiency': row['images_per_s'] / (len(devices) * ours['images_per_s'])}
  return result


def _mesh_of(devices):
  import jax  # noqa: PLC0415
  from jax.sharding import AxisType  # noqa: PLC0415
  return jax.make_mesh((len(devices),), ('data',), (AxisType.Auto,), devices=devices)


def _random_batch(config, size: int):
  from mood_jax.data import catalogue  # noqa: PLC0415
  rng = np.random.default_rng(0)
  side, channels = config.data.image_size, catalogue.source(config.data).channels
  return (rng.standard_normal((size, side, side, channels), np.float32),
          rng.integers(0, catalogue.source(config.data).num_classes(), size, dtype=np.int32))


# The fine-tune step as the paper configs run it (BEiT: relative position bias per block, q/v
# biases), where fused attention takes the bias; pretraining is MAE's, without one.
BEIT_OPTIONS = dict(posemb='none', rel_pos_bias='block', qkv_bias='qv', layer_scale=0.1)


def _attention_child(step: str, sizes: dict) -> dict:
  """Our step with the einsum and the fused attention, alternating, on one device."""
  import jax  # noqa: PLC0415

  from benchmarks import train_step  # noqa: PLC0415
  from mood_jax.models import vit  # noqa: PLC0415

  setting, mesh = sizes['train'], _mesh_of(jax.devices()[:1])
  config = train_step.config_for(setting)
  options = BEIT_OPTIONS if step == 'finetune' else {}
  result = train_step.attention_comparison(step, setting, mesh,
                                           *_random_batch(config, setting['batch_size']),
                                           sizes['warmup'], sizes['steps'], options)
  settings = vit.compute_settings(dict(config.model, attention='fused'))
  spec = vit.parse_variant(setting['variant'])
  implementation = vit.fused_implementation(jax.default_backend(), vit.DTYPES[settings['dtype']],
                                            spec['width'] // spec['num_heads'])
  result.update(setting=setting, options=options, compute=settings,
                backend=jax.default_backend(), fused_implementation=implementation or 'xla')
  return result


def _input_child(sizes: dict) -> dict:
  """benchmarks/input_pipeline.py on this host's cores."""
  from benchmarks import input_pipeline  # noqa: PLC0415
  workers = [w for w in sizes['grain_workers'] if w <= (os.cpu_count() or 1)]
  return input_pipeline.measure(sizes['jpegs'], sizes['repeats'], workers,
                                batch=max(1, sizes['jpegs'] // 8))


def _live_gib(report: dict) -> float:
  """The memory a step holds per device by XLA's analysis: its inputs, its temporaries, and
  those outputs that do not reuse a donated input's buffer."""
  return (report['params_and_inputs_gib'] + report['outputs_gib'] - report['aliased_gib']
          + report['temporaries_gib'])


def _scoring_child(sizes: dict, scores_path: str) -> dict:
  import jax  # noqa: PLC0415

  from benchmarks import ood_scoring  # noqa: PLC0415
  data = ood_scoring.data(sizes['bank'], sizes['queries'], sizes['dim'], classes=1,
                          with_head=False)
  results, scores = {}, {}
  for method in ('knn/ours', 'mahalanobis_mood/ours'):
    results[method], scores[method] = ood_scoring.time_run(
        ood_scoring.METHODS[method](), data, sizes['repeats'])
  np.savez(scores_path, **{name.replace('/', '_'): s for name, s in scores.items()})
  return {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
          'results': results}


def _probe_child() -> dict:
  import jax  # noqa: PLC0415
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__}


def _run_child(args: list[str], env: dict, log: str) -> dict:
  """The JSON a child prints last; its output goes to `log`. A failure raises ChildFailed."""
  command = [sys.executable, '-m', 'benchmarks.accelerator_check', *args]
  with open(log, 'a') as f:
    f.write(f'$ {" ".join(command)}\n')
    f.flush()
    child = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f,
                           text=True)
  if child.returncode:
    with open(log) as f:
      tail = f.read().strip().splitlines()[-1:]
    raise ChildFailed(f'{" ".join(args)} exited {child.returncode}: {tail[0] if tail else ""} '
                      f'(log: {log})')
  return json.loads(child.stdout.strip().splitlines()[-1])


class ChildFailed(Exception):
  pass


# --- Parts, run by the parent. ---

def _child_env(smoke: bool, fake_devices: bool = False, **extra) -> dict:
  """os.environ with `extra`; with `smoke`, on CPU, and with `fake_devices` on several CPU
  devices, so that the data-parallel path runs too."""
  env = {**os.environ, **extra}
  if smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  if smoke and fake_devices:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={SMOKE_DEVICES}').strip()
  return env


def _train_part(smoke: bool, scratch: str, log: str) -> dict:
  # A compilation cache of its own: the step the dry run compiles for the device is the one
  # the timing compiles again. No preallocation, so that torch has room beside JAX.
  env = _child_env(smoke, fake_devices=True,
                   JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, 'jax_cache'),
                   XLA_PYTHON_CLIENT_PREALLOCATE='false')
  part = {step: _run_child(['--child=train_step', f'--step={step}', *_smoke_flag(smoke)], env, log)
          for step in STEPS}
  part['pretrain_over_finetune_images_per_s'] = (part['pretrain']['ours']['images_per_s']
                                                 / part['finetune']['ours']['images_per_s'])
  for step in STEPS:
    memory = part[step]['memory']
    if memory['measured_peak_gib'] is not None:
      memory['measured_over_estimate'] = (memory['measured_peak_gib']
                                          / memory['dry_run_estimate_gib'])
  return part


def _attention_part(smoke: bool, scratch: str, log: str) -> dict:
  env = _child_env(smoke, JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, 'jax_cache'))
  return {step: _run_child(['--child=attention', f'--step={step}', *_smoke_flag(smoke)], env, log)
          for step in STEPS}


def _input_part(smoke: bool, log: str) -> dict:
  return _run_child(['--child=input_pipeline', *_smoke_flag(smoke)], _child_env(smoke), log)


def _mfu_from_log(workdir: str) -> dict:
  """{stage: median MFU of its training log rows}, None where the rows have none (a device
  without a known peak)."""
  from mood_jax.train import metrics_log  # noqa: PLC0415 (imports JAX: the parent uses no device)
  by_stage = {}
  for row in metrics_log.read(workdir):
    if row.get('kind', 'train') == 'train':
      by_stage.setdefault(row['stage'], []).append(row.get('mfu'))
  return {stage: float(np.median(values)) if None not in values else None
          for stage, values in by_stage.items()}


def _scoring_part(smoke: bool, scratch: str, log: str) -> dict:
  part, scores = {}, {}
  for where, platforms in (('device', {}), ('cpu', {'JAX_PLATFORMS': 'cpu'})):
    path = os.path.join(scratch, f'scores_{where}.npz')
    part[where] = _run_child(['--child=scoring', f'--scores={path}', *_smoke_flag(smoke)],
                             _child_env(smoke, **platforms), log)
    scores[where] = np.load(path)
  for method, row in part['device']['results'].items():
    cpu = part['cpu']['results'][method]
    key = method.replace('/', '_')
    row['cpu_over_device_time'] = cpu['median_s'] / row['median_s']
    row['max_abs_diff_to_cpu'] = float(np.max(np.abs(scores['device'][key] - scores['cpu'][key])))
  return part


def _digits_part(sizes: dict, args, workdir: str, log: str) -> dict:
  """The main job as a user runs it, timed per stage from its log's stage-start lines as
  they arrive, then its results against the reference."""
  command = [sys.executable, '-m', 'mood_jax.main', *sizes['digits_flags'].split(),
             f'--workdir={workdir}']
  if args.data_dir:
    command.append(f'--config.data.data_dir={args.data_dir}')
  starts, start = {}, time.perf_counter()
  with open(log, 'a') as f, subprocess.Popen(command, cwd=REPO, env=_child_env(args.smoke),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True) as job:
    f.write(f'$ {" ".join(command)}\n')
    for line in job.stdout:
      f.write(line)
      match = STAGE_START.search(line)
      if match:
        starts[match.group(1)] = time.perf_counter() - start
  total = time.perf_counter() - start
  if job.returncode:
    raise ChildFailed(f'the digits job exited {job.returncode} (log: {log})')
  marks = sorted(starts.items(), key=lambda item: item[1])
  stage_s = {name: (marks[i + 1][1] if i + 1 < len(marks) else total) - at
             for i, (name, at) in enumerate(marks)}
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    results = json.load(f)
  part = {'command': ' '.join(command[1:]), 'workdir': workdir, 'total_s': total,
          'before_first_stage_s': marks[0][1] if marks else None, 'stage_s': stage_s,
          'id_accuracy': results['id_accuracy'], 'rows': results['rows'],
          'compute': results.get('compute', {}), 'mfu_from_log': _mfu_from_log(workdir)}
  if not marks:
    part['note'] = 'no stage-start lines in the log: per-stage times unknown'
  part['comparison'] = _against_reference(args.reference, sizes['digits_flags'], results)
  return part


def _against_reference(path: str, flags: str, results: dict) -> dict:
  if not os.path.exists(path):
    return {'compared': False, 'why': f'no reference at {path}: write one from a CPU run with '
                                      '--write_reference (see the module docstring)'}
  with open(path) as f:
    reference = json.load(f)
  if reference['flags'] != flags:
    return {'compared': False, 'why': f'the reference at {path} is of `{reference["flags"]}`, '
                                      f'this run of `{flags}`'}
  comparison = compare(reference, results)
  digest = code_digest()
  comparison.update(compared=True, reference=path, reference_commit=reference.get('commit'),
                    same_code=reference.get('code_digest') == digest)
  if not comparison['same_code']:
    comparison['warning'] = ('the reference was made from other code (mood_jax/, configs/): '
                             'differences may come from the code, not the device')
  return comparison


# --- The comparison and the reference. ---

def tolerance(metric: str) -> float:
  if metric in TOLERANCES:
    return TOLERANCES[metric]
  return TOLERANCES['auroc'] if 'auroc' in metric else TOLERANCES['other']


def _values(results: dict) -> dict:
  """{(model, scorer, ood_set, metric): value} of every numeric field of every row, with
  ID accuracy as (model, '', '', 'id_accuracy')."""
  values = {(model, '', '', 'id_accuracy'): float(value)
            for model, value in results['id_accuracy'].items()}
  for row in results['rows']:
    for metric, value in row.items():
      numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
      if metric not in KEY_FIELDS and numeric:
        values[(*(row[k] for k in KEY_FIELDS), metric)] = float(value)
  return values


def compare(reference: dict, results: dict) -> dict:
  """Every value both carry, against its metric's tolerance (a NaN is never within); the
  metrics only one of them carries are named, not compared."""
  ref, ours = _values(reference), _values(results)
  shared = sorted(ref.keys() & ours.keys())
  by_metric, beyond = {}, []
  for key in shared:
    diff = ours[key] - ref[key]
    stats = by_metric.setdefault(key[3], {'tolerance': tolerance(key[3]), 'compared': 0,
                                          'beyond': 0, 'max_abs_diff': 0.0})
    stats['compared'] += 1
    if diff == diff:  # NaNs are counted beyond tolerance below
      stats['max_abs_diff'] = max(stats['max_abs_diff'], abs(diff))
    if not abs(diff) <= stats['tolerance']:
      stats['beyond'] += 1
      beyond.append(dict(zip((*KEY_FIELDS, 'metric'), key), reference=ref[key], this_run=ours[key],
                         diff=diff))
  return {'tolerances': TOLERANCES, 'by_metric': by_metric, 'beyond': beyond,
          'within_tolerance': bool(shared) and not beyond,
          'metrics_only_in_reference': sorted(_metrics(ref) - _metrics(ours)),
          'metrics_only_in_this_run': sorted(_metrics(ours) - _metrics(ref)),
          'values_only_in_reference': len(ref.keys() - ours.keys()),
          'values_only_in_this_run': len(ours.keys() - ref.keys())}


def _metrics(values: dict) -> set[str]:
  return {key[3] for key in values}


def code_digest() -> str:
  """sha256 of the code that makes the results (mood_jax/ and configs/, .py files): the
  reference's identity, which needs no git (a device machine may get a copy of the tree)."""
  digest = hashlib.sha256()
  for top in ('mood_jax', 'configs'):
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs.sort()
      for name in sorted(f for f in files if f.endswith('.py')):
        path = os.path.join(root, name)
        digest.update(os.path.relpath(path, REPO).encode() + b'\0')
        with open(path, 'rb') as f:
          digest.update(f.read())
  return digest.hexdigest()


def _commit() -> str | None:
  git = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO, capture_output=True,
                       text=True)
  return git.stdout.strip() or None


def write_reference(workdir: str, flags: str, path: str) -> dict:
  results_path = os.path.join(workdir, 'results', 'results.json')
  if not os.path.exists(results_path):
    raise UserError(f'no {results_path}: run the main job on CPU into {workdir} first '
                    f'(python -m mood_jax.main {flags} --workdir={workdir})')
  with open(results_path) as f:
    results = json.load(f)
  reference = {'flags': flags, 'code_digest': code_digest(), 'commit': _commit(),
               'written': datetime.datetime.now(datetime.timezone.utc).isoformat('T', 'seconds'),
               'from': results_path, 'id_accuracy': results['id_accuracy'], 'rows': results['rows']}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(reference, f, indent=1)
  return reference


# --- The summary. ---

def _pct(value) -> str:
  return f'{100 * value:.1f}%' if value is not None else 'n/a'


def _num(value, digits: int = 2) -> str:
  return f'{value:.{digits}f}' if value is not None else 'n/a'


def _train_lines(train: dict) -> list[str]:
  setting = train['pretrain']['setting']
  lines = ['## Train step', '',
           f'{setting["variant"]} at {setting["image_size"]} px, '
           f'{train["pretrain"]["compute"]["dtype"]} (model.dtype={setting["dtype"]}), '
           f'{train["pretrain"]["compute"]["attention"]} attention, batch '
           f'{setting["batch_size"]}, one device; peak {train["pretrain"]["peak_flops_how"]}.', '',
           '| step | ours images/s | torch images/s | ours/torch | MFU (dry-run FLOPs) | '
           'MFU (analytic) | peak GiB | dry-run estimate GiB | measured/estimate | '
           'device plan GiB |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for step in STEPS:
    row, memory = train[step], train[step]['memory']
    lines.append(
        f'| {step} | {row["ours"]["images_per_s"]:.1f} | '
        f'{_num(row.get("torch", {}).get("images_per_s"), 1)} | '
        f'{_num(row.get("ratio_ours_to_torch"))} | {_pct(row["mfu_dry_run"])} | '
        f'{_pct(row["ours"]["mfu"])} | {_num(memory["measured_peak_gib"])} | '
        f'{memory["dry_run_estimate_gib"]:.2f} | {_num(memory.get("measured_over_estimate"))} '
        f'| {memory["device_plan_gib"]:.2f} |')
  lines += ['', 'Pretrain / finetune images/s: '
            f'{train["pretrain_over_finetune_images_per_s"]:.2f}.']
  for step in STEPS:
    lines += [f'{step}: {note}' for note in train[step]['notes']]
    if 'data_parallel' in train[step]:
      dp = train[step]['data_parallel']
      lines.append(f'{step}, data parallel over {dp["devices"]} devices (batch '
                   f'{dp["batch_size"]}): {dp["images_per_s"]:.1f} images/s, scaling '
                   f'efficiency {_pct(dp["scaling_efficiency"])}.')
  return lines


def _attention_lines(attention: dict) -> list[str]:
  lines = ['## Attention: einsum against fused', '',
           '| step | compute | fused implementation | einsum ms | fused ms | einsum/fused |',
           '|---|---|---|---:|---:|---:|']
  for step in STEPS:
    row = attention[step]
    lines.append(f'| {step} | {row["compute"]["dtype"]} | '
                 f'{row["fused_implementation"]} | {row["einsum"]["median_step_ms"]:.1f} | '
                 f'{row["fused"]["median_step_ms"]:.1f} | '
                 f'{row["einsum_over_fused_step_time"]:.2f} |')
  return lines


def _input_lines(report: dict) -> list[str]:
  from benchmarks import input_pipeline  # noqa: PLC0415
  return ['## Input pipeline (this host)', '', input_pipeline.markdown(report)]


def _scoring_lines(scoring: dict) -> list[str]:
  lines = ['## Scoring (fit + score)', '',
           f'Device {scoring["device"]["device"]} against the host CPU.', '',
           '| method | device s | CPU s | CPU/device | max abs score diff |',
           '|---|---:|---:|---:|---:|']
  for method, row in scoring['device']['results'].items():
    cpu = scoring['cpu']['results'][method]
    lines.append(f'| {method} | {row["median_s"]:.3f} | {cpu["median_s"]:.3f} | '
                 f'{row["cpu_over_device_time"]:.2f} | {row["max_abs_diff_to_cpu"]:.2e} |')
  return lines


def _digits_lines(digits: dict) -> list[str]:
  stages = ', '.join(f'{name} {s:.1f} s' for name, s in digits['stage_s'].items())
  mfu = ', '.join(f'{stage} {_pct(value)}' for stage, value in digits['mfu_from_log'].items())
  lines = ['## Digits main job', '', f'`{digits["command"]}`: {digits["total_s"]:.1f} s in '
           f'all; before the first stage {_num(digits["before_first_stage_s"], 1)} s; {stages}.',
           f'Compute {digits["compute"]}; MFU from the log (median per stage): {mfu}.', '']
  comparison = digits['comparison']
  if not comparison['compared']:
    return [*lines, f'Not compared: {comparison["why"]}.']
  verdict = 'all within tolerance' if comparison['within_tolerance'] else (
      f'{len(comparison["beyond"])} values beyond tolerance')
  lines.append(f'Against the CPU reference ({comparison["reference"]}, commit '
               f'{comparison["reference_commit"]}): {verdict}.')
  if 'warning' in comparison:
    lines.append(f'Warning: {comparison["warning"]}.')
  lines += ['', '| metric | tolerance | compared | beyond | max abs diff |',
            '|---|---:|---:|---:|---:|']
  lines += [f'| {metric} | {s["tolerance"]} | {s["compared"]} | {s["beyond"]} | '
            f'{s["max_abs_diff"]:.4f} |' for metric, s in comparison['by_metric'].items()]
  for side in ('reference', 'this_run'):
    if comparison[f'metrics_only_in_{side}']:
      lines.append(f'Only in {side.replace("_", " ")}, not compared: '
                   f'{", ".join(comparison[f"metrics_only_in_{side}"])}.')
  if comparison['beyond']:
    lines += ['', '| model | scorer | OOD set | metric | CPU | this run | diff |',
              '|---|---|---|---|---:|---:|---:|']
    lines += [f'| {b["model"]} | {b["scorer"]} | {b["ood_set"]} | {b["metric"]} | '
              f'{b["reference"]:.4f} | {b["this_run"]:.4f} | {b["diff"]:+.4f} |'
              for b in comparison['beyond']]
  return lines


def markdown(report: dict) -> str:
  """The summary, made from the report alone."""
  device = report.get('device', {})
  lines = [f'# Accelerator check{" (smoke: CPU rehearsal)" if report["smoke"] else ""}', '',
           f'{device.get("device_count", "?")} x {device.get("device_kind", "?")} '
           f'({device.get("backend", "?")}), jax {device.get("jax", "?")}; commit '
           f'{report["commit"]}; `{report["command"]}`', '']
  sections = {'train_step': _train_lines, 'attention': _attention_lines,
              'input_pipeline': _input_lines, 'scoring': _scoring_lines,
              'digits': _digits_lines}
  for part, section in sections.items():
    if part in report['parts']:
      lines += [*section(report['parts'][part]), '']
  lines += ['## Targets (reported, not asserted)', '']
  lines += [f'- {name} {target}: {_target_value(report, name)}' for name, target in TARGETS.items()]
  if report['errors']:
    lines += ['', '## Failed parts', '']
    lines += [f'- {part}: {error}' for part, error in report['errors'].items()]
  return '\n'.join(lines) + '\n'


def _target_value(report: dict, name: str) -> str:
  if name == 'einsum / fused attention step time':
    attention = report['parts'].get('attention')
    return ', '.join(f'{step} {_num(attention[step]["einsum_over_fused_step_time"])}'
                     for step in STEPS) if attention else 'not measured'
  train = report['parts'].get('train_step')
  if not train:
    return 'not measured'
  values = {
      'finetune MFU (dry-run FLOPs)': _pct(train['finetune']['mfu_dry_run']),
      'pretrain / finetune images/s': _num(train['pretrain_over_finetune_images_per_s']),
      'ours / torch images/s': ', '.join(
          f'{step} {_num(train[step].get("ratio_ours_to_torch"))}' for step in STEPS),
      'measured peak / dry-run estimate': ', '.join(
          f'{step} {_num(train[step]["memory"].get("measured_over_estimate"))}' for step in STEPS)}
  return values[name]


# --- The command. ---

def _smoke_flag(smoke: bool) -> list[str]:
  return ['--smoke'] if smoke else []


def _write(report: dict, out: str) -> None:
  with open(out, 'w') as f:
    json.dump(report, f, indent=1)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(markdown(report))


def check(args) -> dict:
  parts = [p.strip() for p in args.parts.split(',') if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown or not parts:
    raise UserError(f'--parts={args.parts}: name one or more of {",".join(PARTS)}')
  workdir = args.digits_workdir
  if workdir and os.path.exists(workdir) and os.listdir(workdir):
    raise UserError(f'--digits_workdir {args.digits_workdir} is not empty: its finished stages '
                    'would be skipped, not timed; pass a new directory')
  sizes = SIZES['smoke' if args.smoke else 'gpu']
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  log = os.path.splitext(args.out)[0] + '.log'
  open(log, 'w').close()
  device = _run_child(['--child=probe'], _child_env(args.smoke), log)
  if device['backend'] == 'cpu' and not args.smoke:
    raise UserError('JAX sees no accelerator (backend cpu): install jax for your GPU '
                    '(docs/benchmarks.md), or run --smoke for the CPU rehearsal')
  scratch = tempfile.mkdtemp(prefix='accelerator_check_')
  report = {'command': ' '.join(['python -m benchmarks.accelerator_check', *sys.argv[1:]]),
            'smoke': args.smoke, 'commit': _commit(), 'code_digest': code_digest(),
            'device': device, 'sizes': sizes, 'targets': TARGETS, 'parts': {}, 'part_s': {},
            'errors': {}, 'log': log}
  runs = {'train_step': lambda: _train_part(args.smoke, scratch, log),
          'attention': lambda: _attention_part(args.smoke, scratch, log),
          'input_pipeline': lambda: _input_part(args.smoke, log),
          'scoring': lambda: _scoring_part(args.smoke, scratch, log),
          'digits': lambda: _digits_part(sizes, args, args.digits_workdir
                                         or os.path.join(scratch, 'digits'), log)}
  for part in PARTS:
    if part not in parts:
      continue
    start = time.perf_counter()
    print(f'{part}: running', flush=True)
    try:
      report['parts'][part] = runs[part]()
    except ChildFailed as e:  # the other parts may still work: a short window is not wasted
      report['errors'][part] = str(e)
    except Exception as e:  # noqa: BLE001 (likewise; the traceback goes to the log)
      with open(log, 'a') as f:
        traceback.print_exc(file=f)
      report['errors'][part] = f'{type(e).__name__}: {e} (traceback in {log})'
    report['part_s'][part] = time.perf_counter() - start
    print(f'{part}: {"failed: " + report["errors"][part] if part in report["errors"] else "done"}'
          f' in {report["part_s"][part]:.0f} s', flush=True)
    _write(report, args.out)
  # Kept when a part failed, to look into; the digits workdir only where asked for.
  if not report['errors']:
    shutil.rmtree(scratch)
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=None, help='JSON report; the summary goes beside it '
                      '(.md), the children\'s output too (.log). Default: '
                      'benchmarks/results/accelerator_check.json (_smoke with --smoke).')
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'Comma-separated, of {", ".join(PARTS)}.')
  parser.add_argument('--smoke', action='store_true', help='Every part at tiny sizes on CPU.')
  parser.add_argument('--reference', default=DEFAULT_REFERENCE,
                      help='The CPU reference of the digits job.')
  parser.add_argument('--data_dir', default=None, help='The digits job\'s data dir (default: '
                      'the config\'s).')
  parser.add_argument('--digits_workdir', default=None,
                      help='A new directory for the digits job (default: a temporary one).')
  parser.add_argument('--write_reference', metavar='WORKDIR', default=None,
                      help='Write --reference from WORKDIR/results/results.json, a CPU run of '
                      '--digits_flags, and stop.')
  parser.add_argument('--digits_flags', default=None,
                      help='With --write_reference: the config flags WORKDIR ran with '
                      '(default: the check\'s own, with or without --smoke).')
  parser.add_argument('--child', choices=('probe', 'train_step', 'attention', 'input_pipeline',
                                          'scoring'), help=argparse.SUPPRESS)
  parser.add_argument('--step', choices=STEPS, help=argparse.SUPPRESS)
  parser.add_argument('--scores', help=argparse.SUPPRESS)
  args = parser.parse_args()
  sizes = SIZES['smoke' if args.smoke else 'gpu']
  if args.child:
    result = {'probe': _probe_child,
              'train_step': lambda: _train_child(args.step, sizes),
              'attention': lambda: _attention_child(args.step, sizes),
              'input_pipeline': lambda: _input_child(sizes),
              'scoring': lambda: _scoring_child(sizes, args.scores)}[args.child]()
    print(json.dumps(result))
    return
  try:
    if args.write_reference:
      write_reference(args.write_reference, args.digits_flags or sizes['digits_flags'],
                      args.reference)
      print(f'wrote {args.reference}')
      return
    args.out = args.out or os.path.join(
        'benchmarks', 'results', f'accelerator_check{"_smoke" if args.smoke else ""}.json')
    report = check(args)
  except (UserError, ChildFailed) as e:
    sys.exit(f'error: {e}')
  print(markdown(report))
  print(f'wrote {args.out} and its .md')
  if report['errors']:
    sys.exit(1)


if __name__ == '__main__':
  main()
