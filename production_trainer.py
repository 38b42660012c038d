"""Production trainer for the multi-head ECG digitization U-Net.

Quick debug (100 samples, 3 epochs):
    python production_trainer.py --sim_root data/simulations --csv_root data/train --batch_size 2 --num_workers 0 --debug
Full training on one device (CUDA, else MPS, else CPU):
    python production_trainer.py --sim_root ... --csv_root ... --batch_size 16 --num_workers 8 --epochs 100 --pretrained
Resume (same run folder, TensorBoard curves continue):
    python production_trainer.py --sim_root ... --csv_root ... --resume experiments/run_xxx/checkpoints/last.pth
Several GPUs on one machine, or several machines (DDP; rank 0 logs and saves):
    torchrun --standalone --nproc_per_node=4 production_trainer.py --sim_root ... --csv_root ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 production_trainer.py ...

A run writes experiments/run_YYYYmmdd_HHMMSS/{checkpoints/{best,last,epoch_N}.pth, tensorboard/,
logs/train.log, config.json}. When training ends, best.pth gets the decoding its validation pages read
best with (how strongly the time start holds to the calibration pulses' end: tune_decoding).
"""
import os

os.environ.setdefault('PYTORCH_ENABLE_MPS_FALLBACK', '1')   # must precede the torch import
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # waiting threads sleep: a shared CPU must not collapse (speed.py)

import argparse
import json
import logging
import logging.handlers
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import ecg_checkpoint
import ecg_cli
import ecg_decode
import ecg_heads
import ecg_model
import ecg_trainer
import page_image
import page_reader
import production_dataset as pdx
import speed

LOSS_NAMES = list(ecg_heads.DEFAULT_LOSS_WEIGHTS)
ARCHITECTURE_KEYS = ('encoder', 'decoder_channels', 'image_size')   # a resumed run cannot change these
RECORDED_KEYS = ('run_dir', 'device', 'world_size', 'amp_enabled', 'amp_dtype_used', 'grad_scaler',
                 'select_metric_used')   # written into config.json by a run; ignored when it is read back
# what best.pth means: every metric of ecg_trainer's registry, the validation loss, or the latest epoch
SELECT_METRICS = {**{name: max if metric.higher_is_better else min for name, metric in ecg_trainer.METRICS.items()},
                  'val_loss': min, 'latest': None}
MAX_BAD_STEPS = 20      # non-finite losses or gradients in a row before the run is stopped
DEBUG_SAMPLES = 100
DEBUG_EPOCHS = 3
WARMUP_FRACTION = 0.05
DECAY_FRACTION = 1.0   # share of the steps the learning rate decays over (the rest after warm-up: the peak)
EMA_DECAY = 0.0        # per-step decay of the weights' moving average (0: none)
TB_IMAGES = 3
DECODING_MARGIN = 0.005   # validation Pearson another pulse start weight must gain over the default's to be kept
log = logging.getLogger('production_trainer')


def build_parser():
    p = argparse.ArgumentParser(description='Train the multi-head U-Net that reads ECG images back into 12-lead signals.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--sim_root', help='folder of {id}-{k}.png + .json images (searched recursively); required '
                                      'unless --config or --resume gives it')
    p.add_argument('--csv_root', help='folder of train.csv and {id}/{id}.csv signals; required likewise')
    p.add_argument('--batch_size', type=int, default=4, help='images per step (per GPU under torchrun)')
    p.add_argument('--num_workers', type=int, default=2, help='DataLoader worker processes')
    p.add_argument('--epochs', type=int, default=100, help='passes over the training split')
    p.add_argument('--lr', type=float, default=1e-4, help='peak AdamW learning rate (warm-up, then cosine decay)')
    p.add_argument('--weight_decay', type=float, default=1e-4, help='AdamW weight decay')
    p.add_argument('--debug', action='store_true', help=f'quick check: {DEBUG_SAMPLES} samples, {DEBUG_EPOCHS} epochs')
    p.add_argument('--pretrained', action='store_true', help='ImageNet encoder weights (needs the hub or its cache)')
    p.add_argument('--pretrained_path', help='local encoder weights file to start from instead of the hub')
    p.add_argument('--init_from', help='start from the weights of a checkpoint of this toolkit (e.g. the shipped '
                                       f'{ecg_checkpoint.STARTER}); a new run, fresh optimizer and schedule')
    p.add_argument('--resume', help='checkpoint to continue from: its run folder, model and settings are reused '
                                    '(flags given here override the settings that may change)')
    p.add_argument('--force_cpu', action='store_true', help='train on the CPU even if a GPU is there')
    p.add_argument('--cache', action='store_true', help='decode every sample once into shared memory')
    for name, weight in ecg_heads.DEFAULT_LOSS_WEIGHTS.items():
        p.add_argument(f'--loss_weight_{name}', type=float, default=weight, help=f'weight of the {name} loss')
    p.add_argument('--config', help='JSON file of settings: any flag of this CLI by its name (image_size, lr, ...), '
                                    'and a "loss_weights" block; CLI > --config file > defaults')
    p.add_argument('--image_size', type=int, nargs=2, default=list(pdx.DEFAULT_IMAGE_SIZE), metavar=('H', 'W'),
                   help='network input; wide beats tall at a given pixel count (DESIGN.md)')
    p.add_argument('--encoder', default='resnet34', help='segmentation-models-pytorch encoder name')
    p.add_argument('--decoder_channels', type=int, nargs=5, default=list(ecg_model.DECODER_CHANNELS),
                   help='U-Net decoder widths, deepest first')
    p.add_argument('--val_fraction', type=float, default=0.1, help='share of record ids held out for validation')
    p.add_argument('--select_metric', choices=list(SELECT_METRICS), default=None,
                   help='what best.pth means: validation snr_db, pearson or val_loss, or simply the latest epoch '
                        '(default: snr_db with a validation split, latest without)')
    p.add_argument('--seed', type=int, default=42, help='seed for the split, initial weights, shuffling, augmentation')
    p.add_argument('--output_dir', default='experiments', help='where run folders are made')
    p.add_argument('--save_every', type=int, default=10, help='keep epoch_N.pth every N epochs')
    p.add_argument('--amp', nargs='?', const='on', default='auto', choices=['auto', 'on', 'off'],
                   help='mixed precision; auto: bf16 autocast on CPUs with AMX, fp32 on other CPUs and MPS, '
                        'bf16 (else fp16 + GradScaler) on CUDA; a bare --amp means on (speed.py)')
    p.add_argument('--no-amp', dest='amp', action='store_const', const='off', help='same as --amp off')
    p.add_argument('--threads', type=speed.threads_arg, default='auto',
                   help='CPU threads; auto: one per usable core, or OMP_NUM_THREADS where set (speed.py)')
    p.add_argument('--amp_dtype', choices=['auto', 'fp16', 'bf16'], default='auto', help='autocast dtype when --amp')
    p.add_argument('--max_samples', type=int, default=None, help='use at most this many images')
    p.add_argument('--no_augment', action='store_true', help='train without augmentation')
    p.add_argument('--photo_aug', type=float, default=0.0, metavar='P',
                   help='share of training images made to look like a phone photo of the page: uneven light, '
                        'shadows, creases, colour cast, soft focus, noise, JPEG (0: none)')
    p.add_argument('--log_every', type=int, default=10, help='steps between TensorBoard training points')
    p.add_argument('--decay_fraction', type=float, default=DECAY_FRACTION,
                   help='the last share of the steps the cosine decay takes; before it, after the warm-up, the '
                        'learning rate holds its peak (1: cosine from the end of the warm-up)')
    p.add_argument('--ema_decay', type=float, default=EMA_DECAY,
                   help='keep an exponential moving average of the weights, updated every step with this decay '
                        '(0.995: about the last 200 steps), and validate and save it as the model; 0: off')
    p.add_argument('--time_budget_min', type=float, default=None,
                   help='train for this many minutes: after each epoch the cosine schedule is laid over the '
                        'epochs that fit (at most --epochs), so the run ends annealed (benchmarks)')
    return p


def explicit_flags(argv):
    """The settings the command line itself gives, without argparse's defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def settings_file(path, known):
    """--config JSON -> {setting: value}; its "loss_weights" block becomes loss_weight_* settings."""
    try:
        with open(path) as handle:
            file_config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ecg_cli.InputError(f'{path}: --config is not a readable JSON file ({exc})') from exc
    if not isinstance(file_config, dict):
        raise ecg_cli.InputError(f'{path}: --config must hold a JSON object of settings')
    weights = file_config.pop('loss_weights', None) or {}
    unknown_weights = sorted(set(weights) - set(LOSS_NAMES))
    if unknown_weights:
        raise ecg_cli.InputError(f'{path}: unknown loss_weights {unknown_weights}; known: {LOSS_NAMES}')
    settings = {f'loss_weight_{name}': value for name, value in weights.items()}
    for key in RECORDED_KEYS + ('config', 'resume'):
        file_config.pop(key, None)
    unknown = sorted(set(file_config) - set(known))
    if unknown:
        raise ecg_cli.InputError(f'{path}: unknown settings {unknown}; every flag of production_trainer.py --help '
                             f'can be set by its name (e.g. "lr", "image_size")')
    return {**settings, **file_config}


def checkpoint_settings(checkpoint, known):
    """The settings a checkpoint's run was started with, as flag names (for --resume)."""
    config = dict(checkpoint['config'])
    settings = {f'loss_weight_{k}': v for k, v in config.pop('loss_weights', {}).items() if k in LOSS_NAMES}
    settings.update({k: v for k, v in config.items() if k in known and k not in ('resume', 'config')})
    return settings


def resume_conflicts(chosen, resumed):
    """'--flag X (checkpoint: Y)' for each architecture setting a resumed run is asked to change."""
    return [f'--{key} {chosen[key]} (checkpoint: {resumed[key]})' for key in ARCHITECTURE_KEYS
            if key in chosen and key in resumed and list(np.atleast_1d(chosen[key])) != list(np.atleast_1d(resumed[key]))]


def resolve_config(argv=None):
    """Every setting of the run, as config.json records it: CLI > --config file > the resumed checkpoint's
    settings > defaults. A resumed run keeps its model: a flag that would change it is an error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    known = set(vars(args))
    cli = explicit_flags(argv)
    from_file = settings_file(args.config, known) if args.config else {}
    config = vars(parser.parse_args([]))
    resumed = {}
    if args.resume:
        resumed = checkpoint_settings(ecg_checkpoint.load(args.resume), known)
        config.update(resumed)
    config.update(from_file)
    config.update(cli)
    conflicts = resume_conflicts({**from_file, **cli}, resumed)
    if conflicts:
        raise ecg_cli.InputError(f'--resume {args.resume}: a resumed run keeps the model it was trained with; '
                             f'drop {", ".join(conflicts)} or start a new run')
    config['changed_on_resume'] = {k: [resumed[k], config[k]] for k in resumed
                                   if k in cli or k in from_file if resumed[k] != config[k]}
    config['flags_given'] = sorted({**from_file, **cli})
    config['loss_weights'] = {name: config.pop(f'loss_weight_{name}') for name in LOSS_NAMES}
    for key in ('sim_root', 'csv_root'):
        if not config[key]:
            raise ecg_cli.InputError(f'--{key} is required (or give it in --config, or --resume a run that had it)')
    if args.debug:
        config['max_samples'] = min(config['max_samples'] or DEBUG_SAMPLES, DEBUG_SAMPLES)
        config['epochs'] = DEBUG_EPOCHS
    config['select_metric_used'] = select_metric(config)
    return config


def select_metric(config):
    """What best.pth means for this run; asking for a validation metric without a split is an error."""
    has_val = config['val_fraction'] > 0
    chosen = config['select_metric'] or ('snr_db' if has_val else 'latest')
    if chosen != 'latest' and not has_val:
        raise ecg_cli.InputError(f'--select_metric {chosen} needs a validation split; with --val_fraction 0 use '
                             f'--select_metric latest')
    return chosen


def setup_distributed():
    """(rank, world_size, local_rank); torchrun sets the environment, a plain run is rank 0 of 1."""
    if 'RANK' not in os.environ:
        return 0, 1, 0
    backend = 'nccl' if torch.cuda.is_available() and dist.is_nccl_available() else 'gloo'
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))


def pick_device(force_cpu, local_rank):
    if not force_cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    if not force_cpu and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def amp_settings(device, amp, amp_dtype):
    """speed.AmpSettings: one choice per machine (speed.amp_choice)."""
    return speed.amp_choice(device, amp, amp_dtype)


def resume_run_dir(path):
    """The run folder a checkpoint belongs to: RUN/checkpoints/NAME.pth beside RUN/config.json."""
    path = Path(path).resolve()
    run_dir = path.parent.parent
    if path.parent.name != 'checkpoints' or not (run_dir / 'config.json').is_file():
        raise ecg_cli.InputError(f'--resume {path}: cannot tell which run it belongs to (expected '
                             f'RUN/checkpoints/{path.name} with RUN/config.json); resume from a run folder\'s '
                             f'checkpoint, or start a new run with --pretrained_path for its encoder')
    return run_dir


def new_run_dir(output_dir):
    run_dir = Path(output_dir) / datetime.now().strftime('run_%Y%m%d_%H%M%S')
    suffix = 1
    while run_dir.exists():   # two runs started within one second
        run_dir = run_dir.with_name(f'{run_dir.name.split("-")[0]}-{suffix}')
        suffix += 1
    return run_dir


def make_run_folders(run_dir):
    """logs/ and checkpoints/ of the run; an unwritable place is one clear error."""
    try:
        for sub in ('logs', 'checkpoints'):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = run_dir / 'checkpoints' / '.write_test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as exc:
        raise ecg_cli.InputError(f'{run_dir}: cannot write the run folder here ({exc.strerror or exc}); '
                             f'choose another --output_dir') from exc


def setup_logging(rank):
    """Console logging now; what is logged before the run folder exists is held and written to train.log
    once the inputs are checked and the folder is made (add_log_file), so a failed start leaves no file."""
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(LOG_FORMAT)
    held = logging.handlers.MemoryHandler(capacity=10 ** 6, flushLevel=logging.CRITICAL + 1)
    for handler in (console, held):
        log.addHandler(handler)
    logging.getLogger('production_dataset').handlers = [console, held]


LOG_FORMAT = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%Y-%m-%d %H:%M:%S')


def add_log_file(run_dir):
    """train.log joins the console (appending on --resume), starting with the lines held so far."""
    handler = logging.FileHandler(run_dir / 'logs' / 'train.log')
    handler.setFormatter(LOG_FORMAT)
    for logger in (log, logging.getLogger('production_dataset')):
        for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
            held.setTarget(handler)
            held.close()   # flushes into train.log
            logger.removeHandler(held)
        logger.addHandler(handler)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(config):
    """Every sample checked (JSON, CSV values, decoded pixels) before anything is written and before the
    train/validation split, so a bad file cannot leave a split empty; bad ones are named and skipped, and a
    data set with nothing usable stops the run here."""
    refs, problems = pdx.find_samples(config['sim_root'], config['csv_root'], config['max_samples'])
    for path, message in problems:
        log.warning('skipped %s: %s', path, message)
    if not refs:
        raise ecg_cli.InputError(f'no images paired with signals under --sim_root {config["sim_root"]} / '
                             f'--csv_root {config["csv_root"]}')
    checked = pdx.check_samples(refs, progress=True)
    for path, message in checked.problems:
        log.warning('skipped %s: %s', path, message)
    train_part, val_part = checked.split(config['val_fraction'], config['seed'])
    common = dict(target_size=config['image_size'], cache=config['cache'], progress=True)
    train = pdx.ECGImageDataset(train_part, augment=not config['no_augment'], row_bands=True,
                                photo_prob=config['photo_aug'], **common)
    val = pdx.ECGImageDataset(val_part, augment=False, read_scale=True, **common)
    skipped = len(checked.problems) + len(train.problems) + len(val.problems)
    log.info('data: %d train / %d val images (%d records), %d skipped as bad', len(train), len(val),
             len({r.record_id for r in refs}), skipped)
    log.info('page layouts in training: %s', ', '.join(f'{name or "unknown"} {n}' for name, n in
                                                       sorted(train.layouts.items(), key=lambda kv: -kv[1])))
    if len(train) == 0:
        raise ecg_cli.InputError('no usable training sample; run production_dataset.py on the data to see why')
    if val_part.refs and len(val) == 0:
        raise ecg_cli.InputError('no usable validation sample (all were bad, see above); fix them or use '
                             '--val_fraction 0 --select_metric latest')
    return train, val


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which saves before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loaders(train, val, config, world_size, rank, device):
    common = dict(batch_size=config['batch_size'], num_workers=config['num_workers'],
                  pin_memory=device.type == 'cuda', persistent_workers=False, worker_init_fn=ignore_sigint)
    if world_size > 1:
        sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=config['seed'],
                                     drop_last=True)
        train_loader = DataLoader(train, sampler=sampler, drop_last=True, **common)
    else:
        generator = torch.Generator()
        train_loader = DataLoader(train, shuffle=True, generator=generator, drop_last=len(train) > config['batch_size'],
                                  **common)
    val_loader = DataLoader(val, shuffle=False, **common) if len(val) else None
    return train_loader, val_loader


def set_loader_epoch(loader, epoch, seed):
    """Shuffle order and worker seeds depend on (seed, epoch) alone, so a resumed run sees what the
    uninterrupted run would have seen."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 1000 + epoch)


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up, the peak held, then a cosine decay over the last
    `decay_fraction` of the steps to 1 % of the peak at `epochs` (decay_fraction 1: cosine right after the
    warm-up). An object rather than a closure, so the scheduler's state_dict keeps `epochs` when a time
    budget shortens the schedule, and a resumed run goes on with the shortened one."""

    def __init__(self, epochs, steps_per_epoch, decay_fraction=1.0):
        self.epochs, self.steps_per_epoch, self.decay_fraction = epochs, steps_per_epoch, decay_fraction

    def __call__(self, step):
        total = max(1, self.epochs * self.steps_per_epoch)
        warmup = max(1, int(WARMUP_FRACTION * total))
        if step < warmup:
            return (step + 1) / warmup
        decay_start = max(warmup, total - int(self.decay_fraction * total))
        progress = min(1.0, max(0, step - decay_start) / max(1, total - decay_start))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, config, steps_per_epoch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=config['lr'], weight_decay=config['weight_decay'])
    schedule = WarmupCosine(config['epochs'], steps_per_epoch, config['decay_fraction'])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def planned_epochs(scheduler):
    return scheduler.lr_lambdas[0].epochs


def epochs_in_budget(config, epochs_done, epochs_here, seconds_here):
    """The epochs --time_budget_min has room for, at the mean epoch time of this process so far
    (validation and saving included): at least the ones done, at most --epochs."""
    seconds_left = 60 * config['time_budget_min'] - seconds_here
    more = int(seconds_left // (seconds_here / epochs_here)) if seconds_left > 0 else 0
    return max(epochs_done, min(config['epochs'], epochs_done + more))


def fit_schedule_to_budget(config, scheduler, state, epochs_here, seconds_here, device):
    """Lay the rest of the cosine schedule over the epochs the time budget has room for, so a budgeted
    run ends annealed instead of being cut at a high learning rate. Every DDP rank takes rank 0's count."""
    fitted = epochs_in_budget(config, state['epoch'], epochs_here, seconds_here)
    if dist.is_initialized():
        count = torch.tensor([fitted], device=device if device.type == 'cuda' else 'cpu')
        dist.broadcast(count, 0)
        fitted = int(count.item())
    if fitted != planned_epochs(scheduler):
        log.info('time budget %.1f min: schedule laid over %d epochs (%.1f min each so far)',
                 config['time_budget_min'], fitted, seconds_here / epochs_here / 60)
        scheduler.lr_lambdas[0].epochs = fitted


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------- stopping cleanly

class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM: the step in progress is finished, last.pth is saved, the run can be resumed."""


class TrainingDiverged(Exception):
    """Too many non-finite steps in a row: the weights on disk are the last finite ones."""


def install_stop_handlers(stop):
    """SIGINT/SIGTERM set stop['signal']; the loop finishes its step and saves. A second Ctrl-C stops at once."""
    def request_stop(signum, frame):
        if stop['signal'] is not None:
            raise KeyboardInterrupt
        stop['signal'] = signal.Signals(signum).name
        log.warning('%s: finishing this step, then saving last.pth (Ctrl-C again to quit without saving)',
                    stop['signal'])
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def all_ranks_agree(flag, device, op='min'):
    """A bool every DDP rank must share (skip a step, stop): min = all true, max = any true."""
    if not dist.is_initialized():
        return bool(flag)
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN if op == 'min' else dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------- train and validate

def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(training, batch, criterion):
    """Forward, backward, update -> (losses, updated). A non-finite loss or gradient skips the update
    (as GradScaler does for fp16 overflow), so one bad step never reaches the weights."""
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    with training.amp.autocast(training.device):
        outputs = model(batch['image'], ecg_decode.true_geometry(batch))
        losses = criterion(outputs, batch)
    optimizer.zero_grad(set_to_none=True)
    if not all_ranks_agree(torch.isfinite(losses['total']).item(), training.device):
        return losses, False
    scaler.scale(losses['total']).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    if not scaler.is_enabled() and not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return losses, False
    scaler.step(optimizer)
    scaler.update()
    return losses, True


def train_one_epoch(training, loader, criterion, writer, state, config, stop, rank):
    """One pass over the loader from state['step_in_epoch'] (a resumed epoch loads the batches it already
    trained on again, so the data order and augmentation stay the uninterrupted run's, but skips them);
    the moving average training.ema (or None) follows every update."""
    model, scheduler, ema, device = training.model, training.scheduler, training.ema, training.device
    model.train()
    sums, count, skipped, start = {}, 0, 0, time.perf_counter()
    total = len(loader) if hasattr(loader, '__len__') else None   # bench_threads passes a timed generator
    bar = tqdm(islice(loader, state['step_in_epoch'], None), total=total, initial=state['step_in_epoch'],
               desc=f'epoch {state["epoch"] + 1}/{planned_epochs(scheduler)}', disable=rank != 0, leave=False,
               mininterval=ecg_cli.PROGRESS_SECONDS)
    for batch in bar:
        losses, updated = train_step(training, to_device(batch, device), criterion)
        state['global_step'] += 1
        state['step_in_epoch'] += 1
        if updated:
            scheduler.step()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            state['bad_steps'] = 0
            count += add_losses(sums, losses, len(batch['image']))
        else:
            skipped += 1
            state['bad_steps'] += 1
            log.warning('step %d skipped: non-finite loss or gradient (%d in a row)', state['global_step'],
                        state['bad_steps'])
            if state['bad_steps'] >= MAX_BAD_STEPS:
                raise TrainingDiverged(f'{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient '
                                       f'(last at step {state["global_step"]})')
        speed = (count + skipped * config['batch_size']) * dist_world() / (time.perf_counter() - start)
        bar.set_postfix(loss=f'{float(losses["total"].detach()):.3f}', img_s=f'{speed:.2f}', refresh=False)
        if writer and updated and state['global_step'] % config['log_every'] == 0:
            log_losses(writer, 'Train', {k: float(v.detach()) for k, v in losses.items()}, state['global_step'])
            writer.add_scalar('Train/lr', scheduler.get_last_lr()[0], state['global_step'])
        if all_ranks_agree(stop['signal'] is not None, device, op='max'):
            raise TrainingStopped(stop['signal'] or 'a stop on another rank')
    means = {name: total / max(count, 1) for name, total in sums.items()}
    means['images_per_s'] = (count + skipped * config['batch_size']) * dist_world() / (time.perf_counter() - start)
    means['skipped_steps'] = skipped
    return means


def add_losses(sums, losses, n):
    """Accumulate a batch's loss terms, weighted by its n images, for the epoch means; returns n."""
    for name, value in losses.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
    return n


def dist_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def log_losses(writer, split, losses, step):
    for name in ['total'] + LOSS_NAMES:
        writer.add_scalar(f'{split}/{name}_loss', losses[name], step)
    for head in ecg_heads.HEADS:   # what a head's loss is made of, to see which part stalls
        for part in head.parts:
            writer.add_scalar(f'{split}/{head.name}_parts/{part}', losses[part], step)


@torch.no_grad()
def validate(model, reader, loader, criterion, amp):
    """Val losses with the true decoding geometry (comparable with Train), metrics with the signals read as
    evaluate.py and inference.py read them (page_reader.read_signals with reader: the layout found among the
    training data's, pages of a layout with row bands among them read again in them), so best.pth is chosen by
    what inference will write. model: what runs the forward (DDP's wrapper, or the moving average)."""
    model.eval()
    sums, count, stats, theta_err, shown = {}, 0, [], [], None
    for batch in loader:
        batch = to_device(batch, reader.device)
        with amp.autocast(reader.device):
            outputs = model(batch['image'], ecg_decode.true_geometry(batch))
            losses = criterion(outputs, batch)
        maps = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
        predicted = page_reader.read_signals(reader, batch, page_reader.known_pixels(batch['png']), maps)
        stats.append(ecg_trainer.record_stats(predicted['signal'].float(), batch['signal'], batch['signal_mask']))
        valid = batch['theta_valid'] > 0
        theta_err.append((predicted['decode_theta'] - batch['theta']).abs()[valid].cpu())
        count += add_losses(sums, losses, len(batch['image']))
        if shown is None:
            shown = (batch, predicted)
    means = {name: total / max(count, 1) for name, total in sums.items()}
    means.update(ecg_trainer.summarize(ecg_trainer.concat_stats(stats)))
    errors = torch.cat(theta_err)
    means['theta_error_deg'] = float(errors.mean()) if len(errors) else float('nan')
    return means, shown


def validation_reader(model, config, device):
    """The page_reader.Reader validation reads with: the layouts of the training data (and their Cabrera twins)."""
    return page_reader.Reader(unwrap(model), tuple(config['image_size']), device,
                              ecg_checkpoint.readable_layouts(config), config['layouts'])


def log_val_images(writer, shown, step):
    """A few validation images with the predicted traces drawn where the model reads them."""
    batch, predicted = shown
    for i in range(min(TB_IMAGES, len(batch['image']))):
        picture = ecg_decode.draw_prediction(page_image.denormalize(batch['image'][i]), predicted, i)
        writer.add_image(f'Val/prediction_{i}', picture, step, dataformats='HWC')


# ---------------------------------------------------------------- checkpoints and records

def select_value(config, state, val_means):
    """The number best.pth is chosen by (None: nothing to compare, e.g. a NaN metric)."""
    name = config['select_metric_used']
    if name == 'latest':
        return float(state['epoch'])
    value = val_means['total'] if name == 'val_loss' else val_means[name]
    return value if math.isfinite(value) else None


def is_better(config, value, best):
    if value is None:
        return False
    if best is None:
        return True
    return value < best if SELECT_METRICS[config['select_metric_used']] is min else value > best


def save_checkpoints(run_dir, training, state, config, improved=False, epoch_end=True):
    """last.pth always; epoch_N.pth every --save_every epochs; best.pth when the chosen metric improved.
    With a moving average, 'model' holds it (what evaluation and inference load) and 'train_model' the weights
    the optimizer steps (what --resume goes on from). Weights that are not finite are never written: the
    previous files stay."""
    model, ema = training.model, training.ema
    checkpoint = ecg_checkpoint.training_state(weights_to_use(model, ema), training.optimizer, training.scheduler,
                                               training.scaler, state, config)
    if ema is not None:
        checkpoint['train_model'] = unwrap(model).state_dict()
        checkpoint['ema_steps'] = int(ema.n_averaged)
    checkpoint['rng'] = state['epoch_rng']
    folder = run_dir / 'checkpoints'
    names = ['last.pth']
    if epoch_end and config['save_every'] and state['epoch'] % config['save_every'] == 0:
        names.append(f'epoch_{state["epoch"]}.pth')
    if improved:
        names.append('best.pth')
    for name in names:
        ecg_checkpoint.save(folder / name, checkpoint)


# ---------------------------------------------------------------- decoding tuned on validation

@torch.no_grad()
def start_weight_scores(reader, loader, amp):
    """{weight: validation summary} of the pages read as inference reads them (page_reader.read_signals, row
    bands included) with each of ecg_decode.PULSE_START_WEIGHTS_TRIED: one forward per batch, every weight
    decoding the same maps."""
    stats = {weight: [] for weight in ecg_decode.PULSE_START_WEIGHTS_TRIED}
    for batch in loader:
        batch = to_device(batch, reader.device)
        with amp.autocast(reader.device):
            out = reader.model(batch['image'], ecg_decode.read_geometry(batch, reader.layouts))
        out = {k: v.float() for k, v in out.items() if torch.is_tensor(v)}
        pixels = page_reader.known_pixels(batch['png'])
        for weight, kept in stats.items():
            told = {'theta': out['decode_theta'], 'start_weight': weight}
            signal = page_reader.read_signals(reader, batch, pixels, out, told)['signal']
            kept.append(ecg_trainer.record_stats(signal, batch['signal'], batch['signal_mask']))
    return {weight: ecg_trainer.summarize(ecg_trainer.concat_stats(kept)) for weight, kept in stats.items()}


def tune_decoding(run_dir, val_loader, amp, device, config):
    """best.pth's pulse start weight, chosen by validation Pearson and written into it: how far a page's time
    start may stray from where its pulses end depends on how sharp this model's strip edges are (0.015
    Pearson on the starter, 0.12 on 12x1 pages of a layout-mix model). Another weight than the default must
    gain DECODING_MARGIN over it: on some 30 validation pages, 10 won by 0.0002 and then read 0.013 worse
    on the held-out pages. Returns the weight (None: no validation pages or no best.pth)."""
    path = run_dir / 'checkpoints' / 'best.pth'
    if val_loader is None or not path.is_file():
        return None
    checkpoint = ecg_checkpoint.load(path, map_location=device)
    model = ecg_checkpoint.build_model(checkpoint, path, device)
    scores = start_weight_scores(validation_reader(model, config, device), val_loader, amp)
    finite = {weight: row['pearson'] for weight, row in scores.items() if math.isfinite(row['pearson'])}
    if not finite:
        return None
    best = chosen_start_weight(finite)
    checkpoint['decoding'] = {'pulse_start_weight': float(best)}
    ecg_checkpoint.save(path, checkpoint)
    log.info('decoding: pulse start weight %g kept in best.pth (validation Pearson %s)', best,
             ', '.join(f'{w:g}: {p:.4f}' for w, p in finite.items()))
    return best


def chosen_start_weight(pearson):
    """{weight: validation Pearson} -> the default weight unless another beats it by DECODING_MARGIN."""
    best = max(pearson, key=pearson.get)
    default = ecg_decode.PULSE_START_WEIGHT
    if default in pearson and pearson[best] < pearson[default] + DECODING_MARGIN:
        return default
    return best


def append_metrics(run_dir, state, train_means, val_means, lr, seconds):
    """logs/metrics.jsonl: one JSON line per epoch with every scalar logged (NaN as null), for benchmarks."""
    record = {'epoch': state['epoch'], 'global_step': state['global_step'], 'seconds': seconds, 'lr': lr,
              'train': {k: v for k, v in train_means.items() if isinstance(v, (int, float))},
              'val': None if val_means is None else {k: v for k, v in val_means.items() if isinstance(v, (int, float))},
              'select_metric': state['select_metric'], 'best_metric': state['best_metric']}
    with open(run_dir / 'logs' / 'metrics.jsonl', 'a') as handle:
        handle.write(json.dumps(json_safe(record), allow_nan=False) + '\n')


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir):
    """The run's logs/metrics.jsonl as a list of dicts (benchmarks and tests read this, not the log text)."""
    path = Path(run_dir) / 'logs' / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def epoch_summary(epoch, epochs, train, val, seconds):
    if 'total' in train:
        loss = f'train loss {train["total"]:.4f} (signal {train["signal"]:.4f}) | {train["images_per_s"]:.2f} img/s'
    else:   # a run stopped after the epoch's last step and resumed: its losses went with the stopped process
        loss = 'train loss n/a (every step ran before the resume)'
    line = f'epoch {epoch}/{epochs} | {loss} | {seconds:.0f} s'
    if train['skipped_steps']:
        line += f' | {train["skipped_steps"]} steps skipped (non-finite)'
    if val:
        line += (f' | val loss {val["total"]:.4f} pearson {val["pearson"]:.4f} snr {val["snr_db"]:.2f} dB '
                 f'theta err {val["theta_error_deg"]:.2f} deg')
    return line


# ---------------------------------------------------------------- main

def setup(argv):
    """Settings, device and data, all checked before anything is written; then the run folder."""
    config = resolve_config(argv)
    rank, world_size, local_rank = setup_distributed()
    setup_logging(rank)
    device = pick_device(config['force_cpu'], local_rank)
    amp = amp_settings(device, config['amp'], config['amp_dtype'])
    threads = speed.set_threads(config['threads'])
    run_dir = resume_run_dir(config['resume']) if config['resume'] else new_run_dir(config['output_dir'])
    if config['pretrained_path'] and not Path(config['pretrained_path']).is_file():
        raise ecg_cli.InputError(f'--pretrained_path {config["pretrained_path"]}: file not found')
    check_ema_decay(config['ema_decay'])
    if not 0.0 <= config['photo_aug'] <= 1.0:
        raise ecg_cli.InputError(f'--photo_aug {config["photo_aug"]}: give a share in [0, 1], e.g. 0.5')
    train, val = build_datasets(config)
    config['layouts'] = sorted(name for name in train.layouts if name) or list(ecg_checkpoint.TRAINED_LAYOUTS)
    config.update(run_dir=str(run_dir), device=str(device), world_size=world_size,
                  amp_enabled=amp.enabled, amp_dtype_used=str(amp.dtype).replace('torch.', ''), grad_scaler=amp.grad_scaler,
                  amp_reason=amp.reason, threads_used=threads[0], threads_reason=threads[1])
    return config, rank, world_size, device, amp, run_dir, train, val


@dataclass
class Training:
    """What training steps change and what they run with, built once (build_training) and passed whole."""
    model: torch.nn.Module          # DistributedDataParallel's wrapper where several processes train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR   # WarmupCosine
    scaler: torch.amp.GradScaler
    ema: AveragedModel = None       # the weights' moving average (--ema_decay), or None
    amp: speed.AmpSettings = None
    device: torch.device = None


def build_training(config, device, amp, world_size, steps_per_epoch):
    """The model, optimizer, schedule, grad scaler and moving average of a new run (Training)."""
    seed_everything(config['seed'])
    try:
        model = ecg_model.build_model(config['encoder'], config['pretrained'], config['pretrained_path'],
                                      config['decoder_channels'])
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        if not (config['pretrained'] or config['pretrained_path']):
            raise
        raise ecg_cli.InputError(str(exc)) from exc
    if config['init_from']:
        init_weights(model, config['init_from'])
    model = model.to(device)
    if device.type in ('cuda', 'cpu'):
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.grad_scaler)
    return Training(model, optimizer, scheduler, scaler, build_ema(model, config['ema_decay']), amp, device)


def check_ema_decay(decay):
    """--ema_decay out of [0, 1) is an InputError, raised before any data is read."""
    if not 0 <= decay < 1:
        raise ecg_cli.InputError(f'--ema_decay {decay}: give a decay in [0, 1), e.g. 0.995, or 0 for none')


def build_ema(model, decay):
    """--ema_decay: a moving average of the weights and of the batch-norm statistics (None when 0)."""
    if not decay:
        return None
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def weights_to_use(model, ema):
    """The model validated and saved as 'model': the moving average where there is one."""
    return ema.module if ema is not None else unwrap(model)


def init_weights(model, path):
    """--init_from: the weights of another run (or the starter), for a model of the same architecture."""
    checkpoint = ecg_checkpoint.load(path)
    if checkpoint['model_args'] != model.model_args:
        raise ecg_cli.InputError(f'--init_from {path}: its model is {checkpoint["model_args"]}, this run\'s is '
                             f'{model.model_args}; pass the same --encoder and --decoder_channels')
    ecg_model.load_weights(model, checkpoint['model'], ecg_checkpoint.head_channels(checkpoint))
    log.info('weights from %s (trained at %s)', path, 'x'.join(map(str, ecg_checkpoint.input_size(checkpoint))))


def resume_from(path, training, config):
    """Weights (and their moving average), optimizer, schedule, RNG and progress of a checkpoint, into training
    (Training) -> the progress state."""
    model, optimizer, scheduler, ema = training.model, training.optimizer, training.scheduler, training.ema
    checkpoint = ecg_checkpoint.load(path, map_location=training.device)
    if not ecg_model.has_todays_heads(ecg_checkpoint.head_channels(checkpoint)):
        raise ecg_cli.InputError(f'--resume {path}: its heads {ecg_checkpoint.head_channels(checkpoint)} are not this '
                                 f'model\'s {ecg_heads.HEAD_CHANNELS}, so its optimizer state does not fit: start a new '
                                 f'run with --init_from {path}')
    unwrap(model).load_state_dict(checkpoint.get('train_model', checkpoint['model']))
    if ema is not None and 'train_model' in checkpoint:   # else the average starts from the weights resumed
        ema.module.load_state_dict(checkpoint['model'])
        ema.n_averaged.fill_(checkpoint['ema_steps'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    schedule = scheduler.lr_lambdas[0]
    built = dict(vars(schedule))   # from this run's config: the resumed settings, or the flags that override them
    scheduler.load_state_dict(checkpoint['scheduler'])
    fitted = schedule.epochs   # a budget-shortened schedule goes on shortened
    vars(schedule).update(built)
    if 'epochs' not in config['flags_given']:   # an --epochs on the resume command lays the schedule anew
        schedule.epochs = fitted
    training.scaler.load_state_dict(checkpoint['scaler'])
    ecg_checkpoint.set_rng_state(checkpoint['rng'])
    state = {key: checkpoint[key] for key in ('epoch', 'step_in_epoch', 'global_step', 'best_metric')}
    log.info('resumed from %s: epoch %d, step %d of it done (global step %d), best %s %s', path,
             state['epoch'], state['step_in_epoch'], state['global_step'], checkpoint['select_metric'],
             state['best_metric'])
    if checkpoint['select_metric'] != config['select_metric_used']:
        state['best_metric'] = None   # a best by another measure cannot be compared
    for key, (old, new) in config['changed_on_resume'].items():
        log.info('resume: %s changed from %s to %s', key, old, new)
    return state


def open_run_folder(run_dir, config, state, rank):
    """Folders, train.log, config.json and TensorBoard of the run (rank 0 only; others get None)."""
    if rank != 0:
        return None
    make_run_folders(run_dir)
    add_log_file(run_dir)
    stale = ecg_checkpoint.remove_stale_tmp(run_dir / 'checkpoints')
    if stale:
        log.info('removed unfinished saves of an interrupted run: %s', ', '.join(stale))
    with open(run_dir / 'config.json', 'w') as handle:
        json.dump(config, handle, indent=2)
    # purge_step drops points a crashed run logged after its last checkpoint (step > saved step)
    purge = state['global_step'] + 1 if state['global_step'] else None
    writer = SummaryWriter(run_dir / 'tensorboard', purge_step=purge)
    log.info('run folder %s; watch with: tensorboard --logdir %s', run_dir, run_dir / 'tensorboard')
    return writer


def end_epoch(run_dir, training, state, config, writer, train_means, val_means, seconds):
    """Rank 0 after each epoch: TensorBoard, checkpoints, metrics.jsonl and the log line."""
    if val_means is not None:
        log_losses(writer, 'Val', val_means, state['global_step'])
        for name in (*ecg_trainer.METRICS, 'theta_error_deg'):
            writer.add_scalar(f'Val/{name}', val_means[name], state['global_step'])
    value = select_value(config, state, val_means)
    improved = is_better(config, value, state['best_metric'])
    if improved:
        state['best_metric'] = value
    save_checkpoints(run_dir, training, state, config, improved)
    append_metrics(run_dir, state, train_means, val_means, training.scheduler.get_last_lr()[0], seconds)
    log.info(epoch_summary(state['epoch'], planned_epochs(training.scheduler), train_means, val_means, seconds))
    writer.flush()


def train_loop(config, training, loaders, writer, state, stop, rank, run_dir):
    """Epochs until the schedule's end: train, validate, shorten the schedule to the time budget, save."""
    train_loader, val_loader = loaders
    scheduler = training.scheduler
    criterion = ecg_trainer.CompositeLoss(config['loss_weights'])
    started, epochs_here = time.perf_counter(), 0
    while state['epoch'] < planned_epochs(scheduler):
        epoch_start = time.perf_counter()
        set_loader_epoch(train_loader, state['epoch'], config['seed'])
        state['epoch_rng'] = ecg_checkpoint.rng_state()   # saved with a mid-epoch stop: its replay starts here
        train_means = train_one_epoch(training, train_loader, criterion, writer, state, config, stop, rank)
        state['epoch'] += 1
        state['step_in_epoch'] = 0
        val_means = None
        if rank == 0 and val_loader is not None:
            validated = weights_to_use(training.model, training.ema)
            val_means, shown = validate(validated, validation_reader(validated, config, training.device), val_loader,
                                        criterion, training.amp)
            log_val_images(writer, shown, state['global_step'])
        epochs_here += 1
        if config['time_budget_min'] is not None:
            fit_schedule_to_budget(config, scheduler, state, epochs_here, time.perf_counter() - started,
                                   training.device)
        if rank == 0:
            state['epoch_rng'] = ecg_checkpoint.rng_state()
            end_epoch(run_dir, training, state, config, writer, train_means, val_means,
                      time.perf_counter() - epoch_start)


def main(argv=None):
    config, rank, world_size, device, amp, run_dir, train, val = setup(argv)
    log.info('device %s, world size %d, amp %s (%s), grad scaler %s, best.pth by %s', device, world_size, amp.enabled,
             config['amp_dtype_used'], amp.grad_scaler, config['select_metric_used'])
    log.info('precision: %s', config['amp_reason'])
    log.info('threads %d: %s; OMP_WAIT_POLICY %s', config['threads_used'], config['threads_reason'],
             os.environ.get('OMP_WAIT_POLICY', 'unset'))
    if config['debug']:
        log.info('debug mode: %d samples, %d epochs', config['max_samples'], config['epochs'])
    loaders = build_loaders(train, val, config, world_size, rank, device)
    training = build_training(config, device, amp, world_size, len(loaders[0]))
    state = {'epoch': 0, 'step_in_epoch': 0, 'global_step': 0, 'best_metric': None, 'bad_steps': 0,
             'select_metric': config['select_metric_used']}
    if config['resume']:
        state.update(resume_from(config['resume'], training, config))
    writer = open_run_folder(run_dir, config, state, rank)
    stop = {'signal': None}
    install_stop_handlers(stop)
    try:
        train_loop(config, training, loaders, writer, state, stop, rank, run_dir)
    except TrainingStopped as exc:
        if rank == 0:
            save_checkpoints(run_dir, training, state, config, epoch_end=False)
            log.warning('stopped by %s at epoch %d, step %d of it; saved %s. Resume with:\n  python '
                        'production_trainer.py --resume %s', exc, state['epoch'] + 1, state['step_in_epoch'],
                        run_dir / 'checkpoints' / 'last.pth', run_dir / 'checkpoints' / 'last.pth')
        sys.exit(130)
    except (TrainingDiverged, ecg_checkpoint.NonFiniteError) as exc:
        raise ecg_cli.InputError(f'training diverged: {exc}; {run_dir / "checkpoints"} keeps the last finite '
                             f'weights. Lower --lr (now {config["lr"]:g}) or check the data') from exc
    finally:
        if writer:
            writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        tune_decoding(run_dir, loaders[1], amp, device, config)
        log.info('done: best.pth by %s = %s; checkpoints in %s', config['select_metric_used'],
                 state['best_metric'], run_dir / 'checkpoints')
    return run_dir


if __name__ == '__main__':
    ecg_cli.run_cli(main)
