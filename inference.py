"""Digitize paper-ECG images with a trained checkpoint: image -> 12-lead signal CSV (Kaggle layout).

One image:
    python inference.py --image test.png --checkpoint best.pth --output result.csv
A folder (all *.png / *.jpg / *.jpeg in it, recursively), one {image_stem}.csv each, at 250 Hz, plus WFDB:
    python inference.py --image scans/ --checkpoint best.pth --output signals/ --fs 250 --wfdb
The network in onnxruntime instead of torch (export_onnx.py; the decoding stays in torch):
    python inference.py --image scans/ --onnx model.onnx --output signals/

Needs only the image (no simulator JSON): it is read at any size (RGB, RGBA, gray; PNG or JPEG),
resized to the checkpoint's input size and decoded assuming the standard 3x4 + rhythm-strip layout.
The CSV has columns I,II,III,aVR,aVL,aVF,V1..V6 in mV, round(10 * fs) rows (5000 at 500 Hz), and an
empty cell (NaN) wherever the image does not show a lead: every lead but II outside its 2.5 s column.
"""
import os

os.environ.setdefault('PYTORCH_ENABLE_MPS_FALLBACK', '1')   # must precede the torch import
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # waiting threads sleep: a shared CPU must not collapse (speed.py)

import argparse
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import wfdb
from tqdm import tqdm

import ecg_model
import export_onnx
import production_dataset as pdx
import speed
from production_trainer import load_model

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
MODEL_FS = ecg_model.FS                # the model's signal: 500 Hz over 10 s
SECONDS = ecg_model.SECONDS
CSV_DECIMALS = 3
WFDB_ADC_GAIN = 1000.0                 # digital units per mV: 1 uV steps, as PTB-XL stores its records
WFDB_MAX_MV = 32.767                   # fmt 16 holds +-32767 uV; -32768 is wfdb's NaN code


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Digitize ECG images into 12-lead signal CSVs (Kaggle layout).')
    parser.add_argument('--image', required=True, type=Path, help='an image, or a folder searched recursively')
    parser.add_argument('--checkpoint', type=Path, help='a trained .pth (e.g. checkpoints/best.pth)')
    parser.add_argument('--onnx', type=Path, help='an exported network (export_onnx.py) to run in onnxruntime on the '
                                                  'CPU instead of --checkpoint')
    parser.add_argument('--output', required=True, type=Path,
                        help='CSV path for one image (or a folder to put {image_stem}.csv in); '
                             'a folder for --image DIR')
    parser.add_argument('--fs', type=float, default=MODEL_FS, help='sampling rate of the output in Hz (default 500)')
    parser.add_argument('--batch_size', type=int, default=4, help='images per forward pass in folder mode')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
                        help='auto: CUDA, else MPS, else CPU')
    parser.add_argument('--wfdb', action='store_true',
                        help='also write {stem}.hea/.dat (WFDB, fmt 16, 1000 units/mV, not-shown samples as NaN)')
    parser.add_argument('--threads', type=speed.threads_arg, default='auto',
                        help='CPU threads; auto: one per usable core, or OMP_NUM_THREADS where set (speed.py)')
    return parser.parse_args(argv)


class InputError(Exception):
    """A problem with a file the user named: reported as one line, without a traceback."""


# ---------------------------------------------------------------- inputs

def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise InputError('--device cuda: CUDA is not available on this machine')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise InputError('--device mps: MPS is not available on this machine')
    return torch.device(name)


def load_checkpoint(path, device):
    """(model in eval mode, its input size (H, W)); a missing or broken file is an InputError naming it."""
    if not path.is_file():
        raise InputError(f'{path}: checkpoint not found')
    try:
        model, checkpoint = load_model(path, device)
    except Exception as exc:   # torch.load / pickle / state-dict errors come in many types
        raise InputError(f'{path}: not a readable checkpoint of this toolkit ({type(exc).__name__}: {exc})') from exc
    return model, tuple(int(v) for v in checkpoint['config']['image_size'])


def load_network(args, device, threads):
    """(model, its input size (H, W)): the checkpoint's model with its batch norms folded, channels_last
    where the trainer runs so (1.5x faster on the CPU), or with --onnx the exported network in onnxruntime."""
    if args.onnx:
        if not args.onnx.is_file():
            raise InputError(f'{args.onnx}: ONNX file not found')
        try:
            network = export_onnx.OnnxDigitizer(args.onnx, threads)
        except Exception as exc:   # onnxruntime's errors have many types
            raise InputError(f'{args.onnx}: not an ONNX export of this toolkit ({type(exc).__name__}: {exc})') from exc
        return network, network.image_size
    model, size_hw = load_checkpoint(args.checkpoint, device)
    model = speed.fold_batch_norm(model)
    if device.type in ('cpu', 'cuda'):
        model = model.to(memory_format=torch.channels_last)
    return model, size_hw


def find_images(path):
    """--image as given -> sorted list of image files (a folder is searched recursively)."""
    if path.is_dir():
        images = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise InputError(f'{path}: no {"/".join(IMAGE_SUFFIXES)} image in this folder')
        return images
    if not path.is_file():
        raise InputError(f'{path}: image not found')
    return [path]


def read_rgb(path):
    """Any image cv2 decodes -> (H, W, 3) uint8 RGB at its own size. Gray is repeated; RGBA is composited
    over white paper (a transparent page is paper, not black); 16-bit is scaled to 8."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise InputError(f'{path}: unreadable image (cv2 could not decode it)')
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def model_input(rgb, size_hw):
    """(h, w, 3) uint8 page -> normalized (3, H, W) float tensor, the (H, W, 3) uint8 picture the model
    sees (INTER_AREA keeps thin traces, as in training), and the page aspect w / h of the original."""
    resized = cv2.resize(rgb, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)
    image = (resized.astype(np.float32) / 255.0 - pdx.IMAGENET_MEAN) / pdx.IMAGENET_STD
    return torch.from_numpy(image.transpose(2, 0, 1).copy()), resized, rgb.shape[1] / rgb.shape[0]


@torch.inference_mode()
def run_model(model, images, aspects, device):
    """images (B, 3, H, W), aspects (B,) -> the model's output dict, decoded with each page's real aspect
    (a squeezed wide input changes the page's shape, and the de-rotation must know it)."""
    geometry = {'page_aspect': torch.tensor(aspects, dtype=torch.float32, device=device)}
    return model(images.to(device), geometry=geometry)


# ---------------------------------------------------------------- signals

def layout_mask():
    """(12, 5000) bool: which 500 Hz samples the standard layout shows (II: all 10 s via the rhythm strip;
    every other lead: its 2.5 s column)."""
    column = int(ecg_model.COLUMN_SECONDS * MODEL_FS)
    mask = np.zeros((ecg_model.N_LEADS, ecg_model.N_SAMPLES), bool)
    for lead, col in enumerate(ecg_model.LAYOUT_COLUMN):
        mask[lead, col * column:(col + 1) * column] = True
    mask[ecg_model.RHYTHM_LEAD] = True
    return mask


def shown_signal(signal):
    """(12, 5000) model output in mV -> float64 copy with NaN where the image does not show the lead."""
    return np.where(layout_mask(), signal.astype(np.float64), np.nan)


def resample_signal(signal, fs):
    """(12, 5000) at 500 Hz with NaN gaps -> (12, round(10 * fs)); each finite run on its own (the
    dataset's resampler, run the other way), so NaN never smears and the gaps stay where they were."""
    if fs == MODEL_FS:
        return signal
    n_out = round(SECONDS * fs)
    return np.stack([pdx.resample_lead(values, MODEL_FS, fs, n_out) for values in signal]).astype(np.float64)


def write_csv(signal, path):
    """(12, N) mV -> Kaggle signal CSV: header I..V6, 3 decimals, empty cells where NaN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(signal))


def csv_text(signal):
    """(12, N) mV -> the text pandas' to_csv(index=False, float_format='%.3f') writes, byte for byte, in a
    third of its time (one % per row; NaN prints as 'nan', pandas writes an empty cell)."""
    row = ','.join([f'%.{CSV_DECIMALS}f'] * len(signal)) + '\n'
    body = ''.join(row % tuple(values) for values in signal.T.tolist())
    return ','.join(pdx.LEADS) + '\n' + body.replace('nan', '')


def write_wfdb(signal, fs, csv_path):
    """(12, N) mV -> {stem}.hea/.dat beside the CSV (fmt 16, 1000 units/mV, baseline 0). Not-shown samples
    are written as wfdb's NaN code (-32768), which wfdb.rdrecord reads back as NaN. Returns the .hea path."""
    record = re.sub(r'[^-\w]', '_', csv_path.stem)   # wfdb accepts letters, digits, '-' and '_' only
    p_signal = np.clip(signal.T, -WFDB_MAX_MV, WFDB_MAX_MV)
    wfdb.wrsamp(record, fs=fs, units=['mV'] * len(pdx.LEADS), sig_name=list(pdx.LEADS), p_signal=p_signal,
                fmt=['16'] * len(pdx.LEADS), adc_gain=[WFDB_ADC_GAIN] * len(pdx.LEADS),
                baseline=[0] * len(pdx.LEADS), write_dir=str(csv_path.parent))
    return csv_path.parent / f'{record}.hea'


# ---------------------------------------------------------------- driving

def output_paths(images, args):
    """Where each image's CSV goes: --output itself for one image (or inside it when it is a folder),
    {output}/{image_stem}.csv in folder mode."""
    if not (args.image.is_dir() or args.output.is_dir()):
        return [args.output]
    if args.output.exists() and not args.output.is_dir():
        raise InputError(f'{args.output}: --output must be a folder when --image is a folder')
    stems = [image.stem for image in images]
    twins = sorted(stem for stem, n in Counter(stems).items() if n > 1)
    if twins:   # a.png and sub/a.jpg would overwrite each other's a.csv
        raise InputError(f'{args.image}: several images share the stem(s) {twins}; outputs are named by stem')
    return [args.output / f'{stem}.csv' for stem in stems]


def read_batch(paths, size_hw):
    """Read a batch of images; unreadable ones are reported and left out. -> (tensor (B, 3, H, W) or None,
    aspects, paths read, problems)."""
    tensors, aspects, read, problems = [], [], [], []
    for path in paths:
        try:
            tensor, _, aspect = model_input(read_rgb(path), size_hw)
        except InputError as exc:
            problems.append(str(exc))
            continue
        tensors.append(tensor)
        aspects.append(aspect)
        read.append(path)
    return (torch.stack(tensors) if tensors else None), aspects, read, problems


def digitize(model, size_hw, images, csv_paths, args, device):
    """Run every image through the model in batches and write its files; returns the problems met."""
    target = dict(zip(images, csv_paths))
    problems = []
    bar = tqdm(total=len(images), desc='digitizing', unit='img', disable=len(images) == 1)
    for first in range(0, len(images), args.batch_size):
        batch, aspects, read, bad = read_batch(images[first:first + args.batch_size], size_hw)
        problems += bad
        if batch is not None:
            signals = run_model(model, batch, aspects, device)['signal'].float().cpu().numpy()
            for path, signal in zip(read, signals):
                write_outputs(shown_signal(signal), target[path], path, args)
        bar.update(len(images[first:first + args.batch_size]))
    bar.close()
    return problems


def digitize_pipelined(model, size_hw, images, csv_paths, args, device):
    """digitize, with the next batch read and the last batch's files written by helper threads while the
    model runs (cv2 and torch release the GIL; reading and writing cost about as much as the network on
    a CPU); returns the problems met."""
    target = dict(zip(images, csv_paths))
    chunks = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    problems, written = [], []
    bar = tqdm(total=len(images), desc='digitizing', unit='img', disable=len(images) == 1)
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        ahead = reader.submit(read_batch, chunks[0], size_hw)
        for index, chunk in enumerate(chunks):
            batch, aspects, read, bad = ahead.result()
            if index + 1 < len(chunks):
                ahead = reader.submit(read_batch, chunks[index + 1], size_hw)
            problems += bad
            if batch is not None:
                signals = run_model(model, batch, aspects, device)['signal'].float().cpu().numpy()
                written.append(writer.submit(write_batch, signals, [(path, target[path]) for path in read], args))
            bar.update(len(chunk))
        for job in written:
            job.result()   # a failed write raises here
    bar.close()
    return problems


def write_batch(signals, paths, args):
    """(B, 12, 5000) mV model output -> each image's files; paths: [(image, csv)]."""
    for signal, (image_path, csv_path) in zip(signals, paths):
        write_outputs(shown_signal(signal), csv_path, image_path, args)


def write_outputs(signal, csv_path, image_path, args):
    """(12, 5000) mV with NaN gaps -> CSV (and WFDB) at --fs."""
    signal = resample_signal(signal, args.fs)
    write_csv(signal, csv_path)
    written = [csv_path]
    if args.wfdb:
        hea = write_wfdb(signal, args.fs, csv_path)
        written += [hea, hea.with_suffix('.dat')]
    tqdm.write(f'{image_path} -> ' + ', '.join(map(str, written)))


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.fs <= 0 or args.batch_size < 1:
            raise InputError('--fs and --batch_size must be positive')
        if (args.checkpoint is None) == (args.onnx is None):
            raise InputError('give --checkpoint (torch) or --onnx (onnxruntime), one of them')
        images = find_images(args.image)
        device = pick_device('cpu' if args.onnx else args.device)
        threads, _ = speed.set_threads(args.threads)
        model, size_hw = load_network(args, device, threads)
        problems = digitize_pipelined(model, size_hw, images, output_paths(images, args), args, device)
    except InputError as exc:
        sys.exit(f'error: {exc}')
    n_rows = round(SECONDS * args.fs)
    print(f'wrote {len(images) - len(problems)} signal(s) of {n_rows} rows at {args.fs:g} Hz '
          f'(model input {size_hw[0]}x{size_hw[1]}, device {device}) to {args.output}')
    if problems:
        sys.exit('error: could not read ' + '; '.join(problems))


if __name__ == '__main__':
    main()
