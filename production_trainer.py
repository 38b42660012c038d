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
logs/train.log, config.json}.
"""
import os

os.environ.setdefault('PYTORCH_ENABLE_MPS_FALLBACK', '1')   # must precede the torch import
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # waiting threads sleep: a shared CPU must not collapse (speed.py)

import argparse
import json
import logging
import math
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import ecg_model
import ecg_trainer
import production_dataset as pdx
import speed

LOSS_NAMES = ['seg', 'grid', 'baseline', 'theta', 'signal']
DEBUG_SAMPLES = 100
DEBUG_EPOCHS = 3
WARMUP_FRACTION = 0.05
TB_IMAGES = 3
log = logging.getLogger('production_trainer')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train the multi-head U-Net that reads ECG images back into 12-lead signals.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--sim_root', required=True, help='folder of {id}-{k}.png + .json images (searched recursively)')
    p.add_argument('--csv_root', required=True, help='folder of train.csv and {id}/{id}.csv signals')
    p.add_argument('--batch_size', type=int, default=4, help='images per step (per GPU under torchrun)')
    p.add_argument('--num_workers', type=int, default=2, help='DataLoader worker processes')
    p.add_argument('--epochs', type=int, default=100, help='passes over the training split')
    p.add_argument('--lr', type=float, default=1e-4, help='peak AdamW learning rate (warm-up, then cosine decay)')
    p.add_argument('--weight_decay', type=float, default=1e-4, help='AdamW weight decay')
    p.add_argument('--debug', action='store_true', help=f'quick check: {DEBUG_SAMPLES} samples, {DEBUG_EPOCHS} epochs')
    p.add_argument('--pretrained', action='store_true', help='ImageNet encoder weights (needs the hub or its cache)')
    p.add_argument('--pretrained_path', help='local encoder weights file to start from instead of the hub')
    p.add_argument('--resume', help='checkpoint to continue from (its run folder is reused)')
    p.add_argument('--force_cpu', action='store_true', help='train on the CPU even if a GPU is there')
    p.add_argument('--cache', action='store_true', help='decode every sample once into shared memory')
    for name, weight in ecg_trainer.DEFAULT_LOSS_WEIGHTS.items():
        p.add_argument(f'--loss_weight_{name}', type=float, default=None, help=f'weight of the {name} loss (default {weight})')
    p.add_argument('--config', help='JSON file of settings; a "loss_weights" block sets the loss weights')
    p.add_argument('--image_size', type=int, nargs=2, default=list(pdx.DEFAULT_IMAGE_SIZE), metavar=('H', 'W'),
                   help='network input; wide beats tall at a given pixel count (DESIGN.md)')
    p.add_argument('--encoder', default='resnet34', help='segmentation-models-pytorch encoder name')
    p.add_argument('--decoder_channels', type=int, nargs=5, default=list(ecg_model.DECODER_CHANNELS),
                   help='U-Net decoder widths, deepest first')
    p.add_argument('--val_fraction', type=float, default=0.1, help='share of record ids held out for validation')
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
    p.add_argument('--log_every', type=int, default=10, help='steps between TensorBoard training points')
    p.add_argument('--time_budget_min', type=float, default=None,
                   help='stop after the epoch that crosses this many minutes (benchmarks)')
    return p.parse_args(argv)


# ---------------------------------------------------------------- setup

def resolve_config(args):
    """Every setting of the run, as config.json records it: CLI > --config file > defaults."""
    config = vars(args).copy()
    file_config = {}
    if args.config:
        with open(args.config) as handle:
            file_config = json.load(handle)
    weights = dict(ecg_trainer.DEFAULT_LOSS_WEIGHTS)
    weights.update(file_config.get('loss_weights', {}))
    for name in LOSS_NAMES:
        cli = config.pop(f'loss_weight_{name}')
        if cli is not None:
            weights[name] = cli
    unknown = set(file_config.get('loss_weights', {})) - set(LOSS_NAMES)
    if unknown:
        raise SystemExit(f'{args.config}: unknown loss_weights {sorted(unknown)}; known: {LOSS_NAMES}')
    config['loss_weights'] = weights
    if args.debug:
        config['max_samples'] = min(config['max_samples'] or DEBUG_SAMPLES, DEBUG_SAMPLES)
        config['epochs'] = DEBUG_EPOCHS
    return config


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
    """(enabled, dtype, use GradScaler, reason): speed.amp_choice, one choice per machine."""
    return speed.amp_choice(device, amp, amp_dtype)


def make_run_dir(output_dir, resume):
    if resume:
        return Path(resume).resolve().parent.parent
    run_dir = Path(output_dir) / datetime.now().strftime('run_%Y%m%d_%H%M%S')
    suffix = 1
    while run_dir.exists():   # two runs started within one second
        run_dir = run_dir.with_name(f'{run_dir.name.split("-")[0]}-{suffix}')
        suffix += 1
    return run_dir


def setup_logging(run_dir, rank):
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    formatter = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%Y-%m-%d %H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        (run_dir / 'logs').mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / 'logs' / 'train.log'))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    logging.getLogger('production_dataset').handlers = handlers


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(config):
    refs, problems = pdx.find_samples(config['sim_root'], config['csv_root'], config['max_samples'])
    for path, message in problems:
        log.warning('skipped %s: %s', path, message)
    if not refs:
        raise SystemExit(f'no images paired with signals under {config["sim_root"]} / {config["csv_root"]}')
    train_refs, val_refs = pdx.split_by_record(refs, config['val_fraction'], config['seed'])
    common = dict(target_size=config['image_size'], cache=config['cache'], progress=True)
    train = pdx.ECGImageDataset(refs=train_refs, augment=not config['no_augment'], **common)
    val = pdx.ECGImageDataset(refs=val_refs, augment=False, **common)
    skipped = len(train.problems) + len(val.problems)
    log.info('data: %d train / %d val images (%d records), %d skipped as bad', len(train), len(val),
             len({r.record_id for r in refs}), skipped)
    if len(train) == 0:
        raise SystemExit('no usable training sample; run production_dataset.py on the data to see why')
    return train, val


def build_loaders(train, val, config, world_size, rank, device):
    common = dict(batch_size=config['batch_size'], num_workers=config['num_workers'],
                  pin_memory=device.type == 'cuda', persistent_workers=False)
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


def build_optimizer(model, config, steps_per_epoch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=config['lr'], weight_decay=config['weight_decay'])
    total = max(1, config['epochs'] * steps_per_epoch)
    warmup = max(1, int(WARMUP_FRACTION * total))

    def lr_factor(step):   # linear warm-up, then cosine decay to 1 % of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------- checkpoints

def rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write never corrupts the checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + '.tmp')
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_state(model, optimizer, scheduler, scaler, epoch, global_step, best_metric, config):
    return {'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch,
            'global_step': global_step, 'best_metric': best_metric, 'config': config, 'rng': rng_state(),
            'model_args': unwrap(model).model_args}


def load_model(path, device='cpu'):
    """A trained model and its checkpoint dict, for evaluate / inference / visualize."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    model = ecg_model.ECGDigitizer(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), checkpoint


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------- train and validate

def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, amp, device, writer, state, config, rank):
    model.train()
    sums, count, start = {}, 0, time.perf_counter()
    bar = tqdm(loader, desc=f'epoch {state["epoch"] + 1}/{config["epochs"]}', disable=rank != 0, leave=False)
    for batch in bar:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
            outputs = model(batch['image'], ecg_model.true_geometry(batch))
            losses = criterion(outputs, batch)
        if not torch.isfinite(losses['total']):
            raise FloatingPointError(f'non-finite loss at step {state["global_step"]}: '
                                     f'{ {k: float(v) for k, v in losses.items()} }')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses['total']).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state['global_step'] += 1
        count += add_losses(sums, losses, len(batch['image']))
        speed = count * dist_world() / (time.perf_counter() - start)
        bar.set_postfix(loss=f'{float(losses["total"].detach()):.3f}', img_s=f'{speed:.2f}')
        if writer and state['global_step'] % config['log_every'] == 0:
            log_losses(writer, 'Train', {k: float(v.detach()) for k, v in losses.items()}, state['global_step'])
            writer.add_scalar('Train/lr', scheduler.get_last_lr()[0], state['global_step'])
    means = {name: total / max(count, 1) for name, total in sums.items()}
    means['images_per_s'] = count * dist_world() / (time.perf_counter() - start)
    return means


def add_losses(sums, losses, n):
    """Accumulate a batch's loss terms, weighted by its n images, for the epoch means; returns n."""
    for name, value in losses.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
    return n


def dist_world():
    return dist.get_world_size() if dist.is_initialized() else 1


SIGNAL_PARTS = ['trace_ce', 'zero_ce', 'presence_bce', 'signal_l1', 'signal_snr_db']


def log_losses(writer, split, losses, step):
    for name in ['total'] + LOSS_NAMES:
        writer.add_scalar(f'{split}/{name}_loss', losses[name], step)
    for name in SIGNAL_PARTS:   # what the signal loss is made of, to see which part stalls
        writer.add_scalar(f'{split}/signal_parts/{name}', losses[name], step)


@torch.no_grad()
def validate(model, loader, criterion, amp, device):
    """Val losses with the true decoding geometry (comparable with Train), metrics with the geometry
    read from the image, as evaluate.py and inference.py will see it."""
    model.eval()
    sums, count, stats, theta_err, shown = {}, 0, [], [], None
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
            outputs = model(batch['image'], ecg_model.true_geometry(batch))
            losses = criterion(outputs, batch)
        predicted = ecg_model.decode_outputs({k: v.float() for k, v in outputs.items() if torch.is_tensor(v)},
                                             {'page_aspect': batch['page_aspect']})
        stats.append(ecg_trainer.record_stats(predicted['signal'], batch['signal'], batch['signal_mask']))
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


def log_val_images(writer, shown, step):
    """A few validation images with the predicted traces drawn where the model reads them."""
    batch, predicted = shown
    for i in range(min(TB_IMAGES, len(batch['image']))):
        picture = ecg_model.draw_prediction(pdx.denormalize(batch['image'][i]), predicted, i)
        writer.add_image(f'Val/prediction_{i}', picture, step, dataformats='HWC')


# ---------------------------------------------------------------- main

def setup(args):
    config = resolve_config(args)
    rank, world_size, local_rank = setup_distributed()
    device = pick_device(config['force_cpu'], local_rank)
    amp = amp_settings(device, config['amp'], config['amp_dtype'])
    threads = speed.set_threads(config['threads'])
    run_dir = make_run_dir(config['output_dir'], config['resume'])
    setup_logging(run_dir, rank)
    config.update(run_dir=str(run_dir), device=str(device), world_size=world_size,
                  amp_enabled=amp[0], amp_dtype_used=str(amp[1]).replace('torch.', ''), grad_scaler=amp[2],
                  amp_reason=amp[3], threads_used=threads[0], threads_reason=threads[1])
    return config, rank, world_size, device, amp, run_dir


def build_training(config, device, amp, world_size, steps_per_epoch):
    seed_everything(config['seed'])
    model = ecg_model.build_model(config['encoder'], config['pretrained'], config['pretrained_path'],
                                  config['decoder_channels'])
    model = model.to(device)
    if device.type in ('cuda', 'cpu'):
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp[2])
    return model, optimizer, scheduler, scaler


def resume_from(path, model, optimizer, scheduler, scaler, device):
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    unwrap(model).load_state_dict(checkpoint['model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['scheduler'])
    scaler.load_state_dict(checkpoint['scaler'])
    set_rng_state(checkpoint['rng'])
    log.info('resumed from %s: epoch %d done, step %d, best %.3f', path, checkpoint['epoch'],
             checkpoint['global_step'], checkpoint['best_metric'])
    return {'epoch': checkpoint['epoch'], 'global_step': checkpoint['global_step'],
            'best_metric': checkpoint['best_metric']}


def epoch_summary(epoch, epochs, train, val, seconds):
    line = (f'epoch {epoch}/{epochs} | train loss {train["total"]:.4f} (signal {train["signal"]:.4f}) '
            f'| {train["images_per_s"]:.2f} img/s | {seconds:.0f} s')
    if val:
        line += (f' | val loss {val["total"]:.4f} pearson {val["pearson"]:.4f} snr {val["snr_db"]:.2f} dB '
                 f'theta err {val["theta_error_deg"]:.2f} deg')
    return line


def main(argv=None):
    args = parse_args(argv)
    config, rank, world_size, device, amp, run_dir = setup(args)
    log.info('device %s, world size %d, amp %s (%s), grad scaler %s', device, world_size, amp[0],
             config['amp_dtype_used'], amp[2])
    log.info('precision: %s', config['amp_reason'])
    log.info('threads %d: %s; OMP_WAIT_POLICY %s', config['threads_used'], config['threads_reason'],
             os.environ.get('OMP_WAIT_POLICY', 'unset'))
    if config['debug']:
        log.info('debug mode: %d samples, %d epochs', config['max_samples'], config['epochs'])
    train, val = build_datasets(config)
    train_loader, val_loader = build_loaders(train, val, config, world_size, rank, device)
    model, optimizer, scheduler, scaler = build_training(config, device, amp, world_size, len(train_loader))
    state = {'epoch': 0, 'global_step': 0, 'best_metric': -float('inf')}
    if config['resume']:
        state = resume_from(config['resume'], model, optimizer, scheduler, scaler, device)
    writer = None
    if rank == 0:
        (run_dir / 'checkpoints').mkdir(parents=True, exist_ok=True)
        with open(run_dir / 'config.json', 'w') as handle:
            json.dump(config, handle, indent=2)
        # purge_step drops points a crashed run logged after its last checkpoint (step > saved step)
        purge = state['global_step'] + 1 if state['global_step'] else None
        writer = SummaryWriter(run_dir / 'tensorboard', purge_step=purge)
        log.info('run folder %s; watch with: tensorboard --logdir %s', run_dir, run_dir / 'tensorboard')
    criterion = ecg_trainer.CompositeLoss(config['loss_weights'])
    started = time.perf_counter()
    while state['epoch'] < config['epochs']:
        epoch_start = time.perf_counter()
        set_loader_epoch(train_loader, state['epoch'], config['seed'])
        train_means = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, amp, device,
                                      writer, state, config, rank)
        state['epoch'] += 1
        val_means = None
        if rank == 0 and val_loader is not None:
            val_means, shown = validate(unwrap(model), val_loader, criterion, amp, device)
            log_losses(writer, 'Val', val_means, state['global_step'])
            for name in ('pearson', 'snr_db', 'theta_error_deg'):
                writer.add_scalar(f'Val/{name}', val_means[name], state['global_step'])
            log_val_images(writer, shown, state['global_step'])
        if rank == 0:
            save_epoch(run_dir, model, optimizer, scheduler, scaler, state, config, val_means)
            log.info(epoch_summary(state['epoch'], config['epochs'], train_means, val_means,
                                   time.perf_counter() - epoch_start))
            writer.flush()
        if config['time_budget_min'] is not None and time.perf_counter() - started > 60 * config['time_budget_min']:
            log.info('time budget of %.1f min reached after epoch %d', config['time_budget_min'], state['epoch'])
            break
    if rank == 0:
        writer.close()
        log.info('done: best val SNR %.2f dB; checkpoints in %s', state['best_metric'], run_dir / 'checkpoints')
    if dist.is_initialized():
        dist.destroy_process_group()
    return run_dir


def save_epoch(run_dir, model, optimizer, scheduler, scaler, state, config, val_means):
    """last.pth every epoch, epoch_N.pth every --save_every, best.pth on the best validation SNR."""
    metric = val_means['snr_db'] if val_means else -state['epoch']   # no val split: latest is best
    improved = metric > state['best_metric'] or not math.isfinite(state['best_metric'])
    if improved and math.isfinite(metric):
        state['best_metric'] = metric
    checkpoint = checkpoint_state(model, optimizer, scheduler, scaler, state['epoch'], state['global_step'],
                                  state['best_metric'], config)
    folder = run_dir / 'checkpoints'
    save_checkpoint(folder / 'last.pth', checkpoint)
    if config['save_every'] and state['epoch'] % config['save_every'] == 0:
        save_checkpoint(folder / f'epoch_{state["epoch"]}.pth', checkpoint)
    if improved:
        save_checkpoint(folder / 'best.pth', checkpoint)


if __name__ == '__main__':
    main()
