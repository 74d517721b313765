"""Train-step throughput: our MIM pretrain and fine-tune steps against a timm/PyTorch reference.

  pip install -r requirements.txt -r requirements-test.txt -e . && pip install --no-deps timm==1.0.29
  python -m benchmarks.train_step [--steps=20 --warmup=3 --batch_size=128 --variant=Ti/4
                                   --image_size=32 --out=benchmarks/results/train_step.json
                                   --gpu --peak_flops=FLOPS --scan --remat
                                   --attention=auto|einsum|fused --compare_attention]

Two steps, each in two implementations, on one fixed random batch (no input pipeline):

  pretrain  MAE-style masked image modeling, 75% of the patches masked: encoder on the
            visible 25%, light decoder, MSE on the masked patches (norm_pix)
  finetune  classification with mean pooling + fc_norm, drop-path, label smoothing,
            AdamW with layer-wise lr decay

  ours      the stage's own description (`describe`: model, optimizer, loss) in
            `train_loop.make_train_step`, the state from `train_loop.abstract_state`
  torch     timm's VisionTransformer of the same shape and AdamW with the same param groups;
            the MAE masking, decoder and loss for pretraining are written below, as the
            public MAE code does it

The other settings (optimizer, decoder size, drop-path, label smoothing) are those of
configs/digits.py. Each step is timed on its own (until its results are ready) after
`--warmup` untimed ones; ours and torch alternate step by step, so that load from other
processes falls on both alike. Reported: the median step time, images/s = batch / median,
and MFU = analytic model FLOPs per image (matmuls and attention, backward = 2x forward)
x images/s / peak FLOP/s of the device; and the median minor page faults and system CPU
seconds per step, the kernel's share of the step: XLA:CPU allocates a step's temporaries
afresh each run, and glibc serves blocks that large with new pages, each faulted in on first
touch, where PyTorch's per-tensor allocations are reused. The JSON file holds every step's.

Settings (flags override any of them):
  CPU (default)      Ti/4 at 32 px (CIFAR-10's 3 channels, 10 classes), batch 128, float32;
                     torch uses as many threads as there are cores
  GPU (--gpu, or     B/16 at 224 px (ImageNet's 1000 classes), batch 128, bfloat16 compute
  a GPU backend)     with float32 params and optimizer state (ours: config.model.dtype;
                     torch: autocast), torch.compile on the torch side. Needs jax[cuda12]
                     and a CUDA build of torch (requirements-test.txt pins a CPU one).
                     UNTESTED: written without a GPU to run it on.

No input pipeline, checkpoints or logging are timed: the step functions only. The dataset
named in the config gives only the channels and classes: nothing is read from disk.
"""

import json
import os
import platform
import resource
import statistics
import time

import flax
import jax
import jaxlib
import numpy as np
from absl import app, flags

from configs import digits
from mood_jax import parallel
from mood_jax.run import allocator
from mood_jax.train import loop as train_loop, utilisation
from mood_jax.data import catalogue
from mood_jax.models import vit
from mood_jax.stages import finetune, pretrain

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per implementation and step.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps first (compilation, caches).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Default: the setting\'s (128).')
_VARIANT = flags.DEFINE_string('variant', None, '<size>/<patch> of mood_jax/models/vit.py; '
                               'default: the setting\'s (Ti/4 on CPU, B/16 on GPU).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Default: 32 on CPU, 224 on GPU.')
_GPU = flags.DEFINE_bool('gpu', False, 'The GPU setting; the default when JAX runs on a GPU.')
_PEAK_FLOPS = flags.DEFINE_float('peak_flops', None, 'Peak FLOP/s of the device for MFU; '
                                 'default: mood_jax/train/utilisation.py\'s table, an estimate for CPUs.')
_SCAN = flags.DEFINE_bool('scan', False, 'Ours: config.model.scan (lax.scan over the blocks).')
_REMAT = flags.DEFINE_bool('remat', False, 'Ours: config.model.remat.')
_ATTENTION = flags.DEFINE_enum('attention', 'auto', vit.ATTENTIONS,
                               'Ours: config.model.attention.')
_COMPARE_ATTENTION = flags.DEFINE_bool(
    'compare_attention', False, 'Instead of ours against torch: ours with the einsum and with '
    'the fused attention, alternating (what model.attention=auto picks on CPU rests on).')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/train_step.json', 'JSON results file.')

SETTINGS = {
    'cpu': dict(variant='Ti/4', image_size=32, batch_size=128, data='cifar10', dtype='float32'),
    'gpu': dict(variant='B/16', image_size=224, batch_size=128, data='imagenet2012',
                dtype='bfloat16'),
}
# Embeddings, not weights: no weight decay in either implementation (optim.decay_mask).
TORCH_EMBEDDINGS = ('cls_token', 'pos_embed', 'mask_token')


def torch_and_timm():
  """torch and timm, with tests/test_convert.py's inert torchvision when none is installed:
  timm imports torchvision for data transforms only, and PyPI's builds of it are CUDA ones
  that do not load beside the CPU torch (see docs/public_weights.md)."""
  import torch  # noqa: PLC0415 (after the flags: JAX is set up first)
  from tests import test_convert  # noqa: PLC0415
  test_convert._stand_in_for_torchvision()  # idempotent; importing it already did
  import timm  # noqa: PLC0415
  return torch, timm


# --- Settings and FLOPs. ---

def setting_from_flags(gpu: bool) -> dict:
  setting = dict(SETTINGS['gpu' if gpu else 'cpu'])
  for key, flag in (('variant', _VARIANT), ('image_size', _IMAGE_SIZE),
                    ('batch_size', _BATCH_SIZE)):
    if flag.value is not None:
      setting[key] = flag.value
  return {**setting, 'scan': _SCAN.value, 'remat': _REMAT.value,
          'attention': vit.resolve_auto('attention', _ATTENTION.value)}


def config_for(setting: dict):
  """configs/digits.py with the setting's model, image size, batch size and dataset (for
  its channels and classes; nothing is read from it)."""
  config = digits.get_config()
  config.model.variant = setting['variant']
  config.data.name, config.data.id_classes = setting['data'], ()
  config.data.image_size = setting['image_size']
  config.pretrain.batch_size = config.finetune.batch_size = setting['batch_size']
  config.model.dtype = setting['dtype']  # compute dtype; params stay float32
  config.model.scan, config.model.remat = setting.get('scan', False), setting.get('remat', False)
  config.model.attention = setting.get('attention', 'auto')
  return config


def _encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` blocks on `tokens` tokens: qkv, proj, MLP, QK^T and AV."""
  per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens ** 2 * width
  return depth * per_block


def train_flops_per_image(config, step: str) -> float:
  """Analytic training FLOPs per image, 3x the forward's (backward = 2x forward)."""
  spec = vit.parse_variant(config.model.variant)
  width, patch = spec['width'], spec['patch_size']
  patches = (config.data.image_size // patch) ** 2
  patch_dim = patch * patch * catalogue.source(config.data).channels
  embed = 2 * patches * patch_dim * width  # both implementations embed every patch
  if step == 'finetune':
    forward = (embed + _encoder_flops(patches + 1, width, spec['depth'], spec['mlp_dim'])
               + 2 * width * catalogue.source(config.data).num_classes())
  else:
    cfg = config.pretrain
    visible = patches - round(patches * cfg.mask_ratio)
    forward = (embed + _encoder_flops(visible + 1, width, spec['depth'], spec['mlp_dim'])
               + 2 * (visible + 1) * width * cfg.decoder_width
               + _encoder_flops(patches + 1, cfg.decoder_width, cfg.decoder_depth,
                                4 * cfg.decoder_width)
               + 2 * patches * cfg.decoder_width * patch_dim)
  return 3 * forward


def _cpu_peak() -> tuple[float, str]:
  """cores x base clock x fp32 FLOPs per cycle of 2 FMA units at the widest vector width."""
  with open('/proc/cpuinfo') as f:
    info = f.read()
  mhz = float(next(line.split(':')[1] for line in info.splitlines() if line.startswith('cpu MHz')))
  lanes = 16 if 'avx512f' in info else 8 if ' avx2' in info else 4
  cores = os.cpu_count()
  return (cores * mhz * 1e6 * 2 * 2 * lanes,
          f'CPU estimate: {cores} cores x {mhz:.0f} MHz (/proc/cpuinfo) x {4 * lanes} fp32 '
          f'FLOPs/cycle (assumed 2 FMA units x {lanes} lanes); an upper bound, pass '
          '--peak_flops for a measured one')


def peak_flops(override: float | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s of the default device, where the figure comes from)."""
  if override:
    return override, 'from --peak_flops'
  if jax.default_backend() == 'cpu':
    return _cpu_peak()
  kind = jax.devices()[0].device_kind
  peak, source = utilisation.peak_flops(kind)
  return peak, (f'dense bf16 data-sheet peak of {kind} ({source})' if peak else
                f'{source}: pass --peak_flops (MFU left out)')


# --- Ours: the stages' own steps. ---

def _stage_step(step: str, config, mesh):
  """(train state, jitted step) of a stage, built as `train_loop.train` builds them."""
  stage = {'pretrain': pretrain, 'finetune': finetune}[step].describe(config)
  init, _, shardings = train_loop.abstract_state(stage, parallel.Placement(mesh))
  return jax.jit(init, out_shardings=shardings)(), train_loop.make_train_step(stage, shardings,
                                                                              mesh)


def ours_step(step_name: str, config, mesh, images, labels):
  state, step = _stage_step(step_name, config, mesh)
  batch = parallel.global_batch({'image': images, 'label': labels}, mesh)

  def run_step():
    nonlocal state
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  return run_step


# --- The PyTorch reference. ---

def _param_groups(model, cfg, depth: int) -> list[dict]:
  """AdamW groups as BEiT/MAE make them: no decay on 1-D params and embeddings; with layer
  decay, the lr of layer i (0: embeddings, i: block i - 1, depth + 1: the rest) scaled by
  layer_decay ** (depth + 1 - i)."""
  layer_decay = cfg.get('layer_decay', 1.0)
  groups = {}
  for name, param in model.named_parameters():
    decay = param.ndim > 1 and name.split('.')[-1] not in TORCH_EMBEDDINGS
    layer = 0
    if layer_decay != 1.0 and name.startswith('blocks.'):
      layer = int(name.split('.')[1]) + 1
    elif layer_decay != 1.0 and not name.startswith(('patch_embed', *TORCH_EMBEDDINGS)):
      layer = depth + 1
    group = groups.setdefault((layer, decay), {
        'params': [], 'weight_decay': cfg.weight_decay if decay else 0.0,
        'lr': cfg.lr * layer_decay ** (depth + 1 - layer)})
    group['params'].append(param)
  return list(groups.values())


def _timm_vit(timm, config, drop_path: float, **kwargs):
  spec = vit.parse_variant(config.model.variant)
  return timm.models.vision_transformer.VisionTransformer(
      img_size=config.data.image_size, patch_size=spec['patch_size'],
      in_chans=catalogue.source(config.data).channels, embed_dim=spec['width'],
      depth=spec['depth'], num_heads=spec['num_heads'],
      mlp_ratio=spec['mlp_dim'] / spec['width'], qkv_bias=True, drop_path_rate=drop_path,
      **kwargs)


def _torch_mae(torch, timm, config):
  """MAE on a timm encoder: per-example random shuffle, encode the kept 25%, decoder on
  visible tokens + mask tokens restored to patch order, MSE on the masked patches."""
  cfg = config.pretrain
  nn = torch.nn
  encoder = _timm_vit(timm, config, cfg.drop_path, num_classes=0, global_pool='token')
  patch, channels = encoder.patch_embed.patch_size[0], catalogue.source(config.data).channels
  grid = config.data.image_size // patch
  patches, width, dec = grid * grid, encoder.embed_dim, cfg.decoder_width
  num_keep = patches - round(patches * cfg.mask_ratio)

  class Mae(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = encoder
      self.decoder_embed = nn.Linear(width, dec)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
      self.register_buffer('decoder_pos', torch.from_numpy(vit.sincos_posemb_2d(grid, dec)))
      self.decoder_blocks = nn.Sequential(*[
          timm.models.vision_transformer.Block(dec, cfg.decoder_heads, qkv_bias=True)
          for _ in range(cfg.decoder_depth)])
      self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
      self.decoder_pred = nn.Linear(dec, patch * patch * channels)

    def forward(self, images):
      enc, batch = self.encoder, images.shape[0]
      x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
      shuffle = torch.rand(batch, patches, device=images.device).argsort(dim=1)
      restore = shuffle.argsort(dim=1)
      x = torch.gather(x, 1, shuffle[:, :num_keep, None].expand(-1, -1, width))
      cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(batch, -1, -1)
      x = self.decoder_embed(enc.norm(enc.blocks(torch.cat([cls, x], dim=1))))
      tokens = torch.cat([x[:, 1:], self.mask_token.expand(batch, patches - num_keep, -1)], 1)
      tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, dec)) + self.decoder_pos
      x = self.decoder_norm(self.decoder_blocks(torch.cat([x[:, :1], tokens], dim=1)))
      pred = self.decoder_pred(x[:, 1:])
      target = images.reshape(batch, channels, grid, patch, grid, patch)
      target = target.permute(0, 2, 4, 3, 5, 1).reshape(batch, patches, -1)
      if cfg.norm_pix:
        var, mean = torch.var_mean(target, dim=-1, unbiased=False, keepdim=True)
        target = (target - mean) / torch.sqrt(var + 1e-6)
      mask = (restore >= num_keep).to(pred.dtype)
      return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()

  return Mae()


def torch_step(step: str, config, gpu: bool, images, labels):
  torch, timm = torch_and_timm()
  device = 'cuda' if gpu else 'cpu'
  cfg = getattr(config, step)
  if step == 'pretrain':
    model = _torch_mae(torch, timm, config)
  else:
    model = _timm_vit(timm, config, cfg.drop_path,
                      num_classes=catalogue.source(config.data).num_classes(),
                      global_pool='avg')  # + fc_norm, as our pool='mean'
  model.to(device).train()
  depth = vit.parse_variant(config.model.variant)['depth']
  # A constant lr: ours follows a schedule, which costs nothing measurable in the step.
  optimizer = torch.optim.AdamW(_param_groups(model, cfg, depth), lr=cfg.lr,
                                betas=(cfg.b1, cfg.b2))
  forward = torch.compile(model) if gpu else model
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.get('label_smoothing', 0.0))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(labels).long().to(device)

  def run_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
      loss = forward(x) if step == 'pretrain' else criterion(forward(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if gpu:
      torch.cuda.synchronize()
  return run_step


def attention_comparison(step: str, setting: dict, mesh, images, labels, warmup: int,
                         steps: int, model_options: dict | None = None) -> dict:
  """Our `step` with model.attention einsum and fused (and `model_options`), timed
  alternating: {'einsum': summary, 'fused': summary, 'einsum_over_fused_step_time': ...}."""
  runs = {}
  for attention in ('einsum', 'fused'):
    config = config_for(dict(setting, attention=attention))
    config.model.update(model_options or {})
    runs[attention] = ours_step(step, config, mesh, images, labels)
  timing = time_steps(runs, warmup, steps)
  result = {name: summary(row, setting['batch_size'], 1.0, None) for name, row in timing.items()}
  result['einsum_over_fused_step_time'] = (result['einsum']['median_step_ms']
                                           / result['fused']['median_step_ms'])
  return result


# --- Timing and the report. ---

def time_steps(run_steps: dict, warmup: int, steps: int) -> dict:
  """Seconds, minor page faults and system CPU seconds of each timed step per implementation;
  they alternate step by step. A step runs until its results are ready and nothing else runs
  between steps, so the process's resource usage over a step is that step's."""
  first = {}
  for name, run_step in run_steps.items():
    start = time.perf_counter()
    run_step()
    first[name] = time.perf_counter() - start
    for _ in range(warmup - 1):  # the first step was one
      run_step()
  timed = {name: {'first_step_s': first[name], 'step_s': [], 'page_faults': [],
                  'system_cpu_s': []} for name in run_steps}
  for _ in range(steps):
    for name, run_step in run_steps.items():
      usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      run_step()
      seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
      timed[name]['step_s'].append(seconds)
      timed[name]['page_faults'].append(after.ru_minflt - usage.ru_minflt)
      timed[name]['system_cpu_s'].append(after.ru_stime - usage.ru_stime)
  return timed


def summary(timing: dict, batch_size: int, flops_per_image: float, peak: float | None) -> dict:
  median = statistics.median(timing['step_s'])
  images_per_s = batch_size / median
  # The fastest step: what the step costs with the least interference from other load.
  return {'median_step_ms': median * 1e3, 'fastest_step_ms': min(timing['step_s']) * 1e3,
          'images_per_s': images_per_s,
          'median_page_faults': statistics.median(timing['page_faults']),
          'median_system_cpu_s': statistics.median(timing['system_cpu_s']),
          'mfu': flops_per_image * images_per_s / peak if peak else None, **timing}


def _environment(allocator: str) -> dict:
  torch, timm = torch_and_timm()
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
               platform.processor())
  return {'device': f'{jax.devices()[0].device_kind} ({jax.default_backend()})', 'cpu': cpu,
          'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
          'allocator': allocator,
          'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                       'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
                       'torch': torch.__version__, 'timm': timm.__version__}}


def _print_table(results: dict, notes: list[str]) -> None:
  print(f'{"step":9s} {"impl":6s} {"step ms":>9s} {"images/s":>9s} {"MFU":>7s} {"fastest ms":>10s} '
        f'{"faults":>8s} {"sys s":>6s}')
  for step, rows in results.items():
    for name in ('ours', 'torch'):
      row = rows[name]
      mfu = f'{100 * row["mfu"]:6.2f}%' if row['mfu'] is not None else '    n/a'
      print(f'{step:9s} {name:6s} {row["median_step_ms"]:9.1f} {row["images_per_s"]:9.1f} {mfu} '
            f'{row["fastest_step_ms"]:10.1f} {row["median_page_faults"]:8.0f} '
            f'{row["median_system_cpu_s"]:6.2f}')
    print(f'{step:9s} ours/torch images/s: {rows["ratio_ours_to_torch"]:.3f}')
  for note in notes:
    print(f'note: {note}')


def main(argv) -> None:
  del argv
  gpu = _GPU.value or jax.default_backend() == 'gpu'
  setting = setting_from_flags(gpu)
  config = config_for(setting)
  torch, _ = torch_and_timm()
  if not gpu:  # its default may be below the core count; JAX's CPU client uses every core
    torch.set_num_threads(os.cpu_count())
  peak, peak_how = peak_flops(_PEAK_FLOPS.value)
  malloc = allocator.caching_malloc() or 'libc malloc'
  notes = [f'peak FLOP/s {peak_how}',
           f'medians of {_STEPS.value} timed steps after {_WARMUP.value} warm-up ones, ours '
           'and torch alternating; other processes on the machine load both alike',
           f'allocator: {malloc}, for both '
           'implementations (see mood_jax/run/allocator.py)']
  if gpu:
    notes.append('GPU setting: UNTESTED, written without a GPU')
  mesh = parallel.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  size, channels = setting['image_size'], catalogue.source(config.data).channels
  images = rng.standard_normal((setting['batch_size'], size, size, channels), np.float32)
  labels = rng.integers(0, catalogue.source(config.data).num_classes(), setting['batch_size'],
                        dtype=np.int32)
  load_before = os.getloadavg()
  if _COMPARE_ATTENTION.value:
    _compare_attention(setting, mesh, images, labels, load_before)
    return
  results = {}
  for step in ('pretrain', 'finetune'):
    timing = time_steps({'ours': ours_step(step, config, mesh, images, labels),
                         'torch': torch_step(step, config, gpu, images, labels)},
                        _WARMUP.value, _STEPS.value)
    flops = train_flops_per_image(config, step)
    results[step] = {name: summary(row, setting['batch_size'], flops, peak)
                     for name, row in timing.items()}
    results[step]['flops_per_image'] = flops
    results[step]['ratio_ours_to_torch'] = (results[step]['ours']['images_per_s']
                                            / results[step]['torch']['images_per_s'])
  load_after = os.getloadavg()
  notes.append(f'1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, '
               f'on {os.cpu_count()} cores')
  report = {'setting': {**setting, 'gpu': gpu, 'steps': _STEPS.value, 'warmup': _WARMUP.value,
                        'mask_ratio': config.pretrain.mask_ratio},
            'peak_flops': peak, 'peak_flops_how': peak_how, 'notes': notes,
            'environment': {**_environment(malloc), 'load_average_before': load_before,
                            'load_average_after': load_after},
            'results': results}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)
  _print_table(results, notes)
  print(f'wrote {_OUT.value}')


def _compare_attention(setting: dict, mesh, images, labels, load_before) -> None:
  results = {step: attention_comparison(step, setting, mesh, images, labels, _WARMUP.value,
                                        _STEPS.value) for step in ('pretrain', 'finetune')}
  load_after = os.getloadavg()
  for step, row in results.items():
    print(f'{step:9s} einsum {row["einsum"]["median_step_ms"]:9.1f} ms, fused '
          f'{row["fused"]["median_step_ms"]:9.1f} ms: einsum/fused step time '
          f'{row["einsum_over_fused_step_time"]:.3f}')
  print(f'note: medians of {_STEPS.value} timed steps after {_WARMUP.value} warm-up ones, '
        f'alternating; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} '
        f'after, on {os.cpu_count()} cores')
  with open(_OUT.value, 'w') as f:
    json.dump({'setting': setting, 'load_average': [load_before, load_after],
               'results': results}, f, indent=2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
