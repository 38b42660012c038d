"""Checkpoints, written and read in one place: the trainer saves through here; evaluate.py, inference.py
and visualize.py load through here without importing the trainer.

A checkpoint is a dict that `torch.load(path)` reads with its default weights_only=True (no pickled
Python objects, so loading a file from elsewhere cannot run code):

    format                      FORMAT: 3 names the head channels, 2 loads with weights_only, 1 did not
    model, model_args           state dict and ECGDigitizer(**model_args)
    head_channels               {head: channels} of the weights (ecg_heads.HEAD_CHANNELS when saved)
    image_size, preprocessing   the input (H, W) and how a page becomes the input tensor
    layouts                     the page layouts the model was trained on (ecg_page.LAYOUTS names)
    decoding                    {'pulse_start_weight': w}: how its maps read best, tuned on its validation
                                pages when training ended (absent: ecg_decode.PULSE_START_WEIGHT)
    config                      every setting of the run (config.json)
    optimizer, scheduler, scaler, epoch, step_in_epoch, global_step, best_metric, select_metric, rng
                                what --resume needs to continue exactly

Saving writes a temporary file and renames it, so a crash mid-write never leaves a broken file; it
refuses weights that are not finite, so a diverged run never overwrites good weights.
"""
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import ecg_cli
import ecg_heads
import ecg_model
import page_image
from ecg_page import STANDARD, whole_pages, with_cabrera

FORMAT = 3      # 3: head_channels named; 2: weights_only, heads told by width; 1: numpy RNG pickled (not loaded)
PREPROCESSING = {'resize': 'cv2.INTER_AREA', 'mean': page_image.IMAGENET_MEAN.tolist(), 'std': page_image.IMAGENET_STD.tolist(),
                 'coord_channels': ecg_model.COORD_CHANNELS, 'rgba': 'composited over white'}
TRAINED_LAYOUTS = [STANDARD.name]            # what a checkpoint that names none was trained on
REQUIRED_KEYS = ('model', 'model_args', 'config')
STARTER = Path(__file__).resolve().parent / 'starter' / 'ecg_starter.pth'   # shipped weights, see its MODEL_CARD.md


class CheckpointError(ecg_cli.InputError):
    """A checkpoint that cannot be read or used: the message names the file and what is wrong."""


class NonFiniteError(RuntimeError):
    """Weights or optimizer state hold NaN or inf: such a state is never written to disk."""


# ---------------------------------------------------------------- RNG state as plain tensors

def rng_state():
    """Python, numpy, torch (and CUDA) generator states in types weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'gauss': float(gauss)}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------- save

def training_state(model, optimizer, scheduler, scaler, progress, config):
    """The whole checkpoint dict. `model` is the bare ECGDigitizer (not DDP); `progress` holds epoch,
    step_in_epoch, global_step, best_metric and select_metric."""
    return {'format': FORMAT, 'model': model.state_dict(), 'model_args': model.model_args,
            'head_channels': dict(ecg_heads.HEAD_CHANNELS),
            'image_size': list(config['image_size']), 'preprocessing': PREPROCESSING,
            'layouts': config.get('layouts') or TRAINED_LAYOUTS, 'decoding': decoding(model), 'config': config,
            'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'rng': rng_state(),
            **{key: progress[key] for key in ('epoch', 'step_in_epoch', 'global_step', 'best_metric',
                                              'select_metric')}}


def decoding(model):
    """The model's own decoding settings, as a checkpoint keeps them ({}: the toolkit's defaults)."""
    return {} if model.pulse_start_weight is None else {'pulse_start_weight': float(model.pulse_start_weight)}


def trained_layouts(checkpoint):
    """The page layouts (ecg_page.LAYOUTS names) a checkpoint was trained on; older ones name none."""
    return list(checkpoint.get('layouts') or TRAINED_LAYOUTS)


def readable_layouts(checkpoint):
    """What evaluation chooses each page's layout among: the trained layouts and their Cabrera twins.
    checkpoint: a checkpoint dict, or a run's config (both name the trained 'layouts')."""
    return whole_pages(with_cabrera(trained_layouts(checkpoint)))


def non_finite_tensors(state, prefix=''):
    """Names of floating tensors anywhere in a nested dict/list that hold NaN or inf."""
    if torch.is_tensor(state):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [name for key, value in items for name in non_finite_tensors(value, f'{prefix}.{key}' if prefix else str(key))]


def save(path, checkpoint):
    """Write to path.tmp, then rename over path. Refuses non-finite weights (NonFiniteError) and turns a
    full disk or an unwritable folder into a CheckpointError that says so; path is never left broken."""
    path = Path(path)
    bad = non_finite_tensors({'model': checkpoint['model'], 'optimizer': checkpoint.get('optimizer', {}),
                              'train_model': checkpoint.get('train_model', {})})
    if bad:
        raise NonFiniteError(f'not saving {path}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); '
                             f'the previous {path.name} is kept')
    tmp = path.with_name(path.name + '.tmp')
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if tmp.is_file():
            tmp.unlink()
        raise CheckpointError(f'{path}: could not be written ({write_problem(exc, path.parent)}); '
                              f'the previous {path.name}, if any, is kept') from exc


def write_problem(exc, folder):
    """What went wrong writing into folder, in words: torch reports a full disk as 'unexpected pos'."""
    free = shutil.disk_usage(folder).free if folder.exists() else None
    if getattr(exc, 'errno', None) == errno.ENOSPC or (free is not None and free < 64 * 2 ** 20):
        return f'disk full: {0 if free is None else free / 2 ** 20:.0f} MiB free on {folder}'
    if isinstance(exc, PermissionError) or getattr(exc, 'errno', None) in (errno.EACCES, errno.EROFS):
        return f'no permission to write in {folder}'
    return f'{type(exc).__name__}: {exc}'


def remove_stale_tmp(folder):
    """Leftovers of saves that a crash or kill -9 interrupted -> removed; returns their names."""
    stale = sorted(Path(folder).glob('*.pth.tmp')) if Path(folder).is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return [tmp.name for tmp in stale]


def save_weights_only(checkpoint, path):
    """A small file to ship or share: fp16 weights and what is needed to use them (no optimizer, no RNG)."""
    small = {key: checkpoint[key] for key in ('format', 'model_args', 'image_size', 'preprocessing', 'layouts',
                                             'epoch', 'global_step', 'select_metric', 'best_metric')}
    small['head_channels'] = head_channels(checkpoint)
    small['decoding'] = checkpoint.get('decoding', {})
    small['model'] = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint['model'].items()}
    small['config'] = {k: checkpoint['config'][k] for k in ('encoder', 'decoder_channels', 'image_size', 'lr',
                                                           'epochs', 'batch_size', 'seed')}
    save(path, small)


# ---------------------------------------------------------------- load

def load(path, map_location='cpu'):
    """A checkpoint dict of this toolkit, read safely (weights_only); every problem is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:   # truncated zip, text file, foreign pickle: torch raises many types
        raise CheckpointError(f'{path}: not a readable checkpoint of this toolkit ({load_problem(exc)})') from exc
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        have = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{path}: not a checkpoint of this toolkit (needs {list(REQUIRED_KEYS)}, has {have}); '
                              f'a bare state dict can be given to the trainer as --pretrained_path only if it '
                              f'is an encoder')
    return checkpoint


def load_problem(exc):
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if 'Weights only load failed' in str(exc):
        return 'it holds pickled Python objects, which are not loaded for safety; checkpoints of this ' \
               'toolkit before format 2 did, train again or re-save it'
    return f'{type(exc).__name__}: {text[:200]}'


def build_model(checkpoint, path, device='cpu'):
    """ECGDigitizer of the checkpoint's architecture with its weights, in eval mode on device."""
    try:
        model = ecg_model.ECGDigitizer(**checkpoint['model_args'])
        ecg_model.load_weights(model, checkpoint['model'], head_channels(checkpoint))
        model.pulse_start_weight = checkpoint.get('decoding', {}).get('pulse_start_weight')
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f'{path}: weights do not fit the architecture it names '
                              f'{checkpoint.get("model_args")} ({first})') from exc
    return model.to(device).eval()


def head_channels(checkpoint):
    """{maps: channels} of a checkpoint's head weights. Format 3 names them; format 2 named none and saved either
    the heads of before three rhythm strips (ecg_model.ONE_RHYTHM_HEADS, the starter of 2026-11-30) or those of
    15 trace channels (ecg_model.FORMAT2_HEADS), which the trace head's width tells apart: the only place a width
    stands for a version."""
    if checkpoint.get('format', 0) >= 3:
        return dict(checkpoint['head_channels'])
    bias = checkpoint['model'].get(ecg_model.HEAD_KEYS[1])
    one_rhythm = torch.is_tensor(bias) and bias.shape[0] == sum(ecg_model.ONE_RHYTHM_HEADS.values())
    return dict(ecg_model.ONE_RHYTHM_HEADS if one_rhythm else ecg_model.FORMAT2_HEADS)


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict), for evaluate / inference / visualize."""
    checkpoint = load(path)
    return build_model(checkpoint, path, device), checkpoint


def input_size(checkpoint):
    """(H, W) the model was trained at."""
    size = checkpoint.get('image_size', checkpoint['config'].get('image_size'))
    return tuple(int(v) for v in size)
