"""Digitize paper-ECG images with a trained checkpoint: image -> 12-lead signal CSV (Kaggle layout).

One image:
    python inference.py --image test.png --checkpoint best.pth --output result.csv
A folder (all *.png / *.jpg / *.jpeg / *.tif / *.tiff in it, recursively), one {image_stem}.csv each ({stem}_p2.csv
for page 2 of a multi-page TIFF), at 250 Hz, plus WFDB:
    python inference.py --image scans/ --checkpoint best.pth --output signals/ --fs 250 --wfdb
The network in onnxruntime instead of torch (export_onnx.py; the decoding stays in torch):
    python inference.py --image scans/ --onnx model.onnx --output signals/
Also a DICOM 12-lead ECG waveform, an EDF+ file and WFDB beside the CSV (ecg_formats.py; ./setup.sh --export):
    python inference.py --image page.png --output out/page.csv --dicom --edf --wfdb --patient_id 123

Needs only the image (no simulator JSON): it is read at any size (RGB, RGBA, gray, 16-bit, CMYK; PNG, JPEG or TIFF,
turned as its EXIF orientation says; a truncated or corrupt file is named and skipped),
resized to the checkpoint's input size, its scale read from its grid and calibration pulse, and decoded
in the layout its strips fit best among those the checkpoint was trained on (--layout NAME to say it).
A page whose strips fit a layout the checkpoint never saw better is still read, with a warning.
The CSV has columns I,II,III,aVR,aVL,aVF,V1..V6 in mV, round(10 * fs) rows (5000 at 500 Hz), and an
empty cell (NaN) wherever the image does not show a lead (on the standard 3x4 + II page: every lead but
II outside its 2.5 s column). Beside it, {stem}.json: the layout, scale, rotation, per-lead confidence and the
checkpoint's sha256. An image that does not look like an ECG (EcgEvidence) is named and gets no CSV, unless --force.
"""
import os

os.environ.setdefault('PYTORCH_ENABLE_MPS_FALLBACK', '1')   # must precede the torch import
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # waiting threads sleep: a shared CPU must not collapse (speed.py)

import argparse
import json
import sys
from collections import Counter, deque
from dataclasses import asdict, dataclass
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ecg_checkpoint
import ecg_formats
import ecg_model
import export_onnx
import page_rectify
import page_scale
import production_dataset as pdx
import speed
from ecg_page import FS as MODEL_FS, LAYOUTS, LEADS, N_LEADS, SECONDS, row_bands, whole_pages, with_cabrera   # 500 Hz x 10 s
from ecg_page import GAINS_MM_MV, LAYOUT_NAMES_HELP, MM_PER_MV, PAPER_SPEEDS_MM_S

IMAGE_SUFFIXES = pdx.IMAGE_SUFFIXES     # PNG, JPEG, TIFF (every page of a multi-page one)
CSV_DECIMALS = 3
CONFIDENCE_HALF_MV = 0.1               # a row spread of 0.1 mV (1 mm at 10 mm/mV) halves the confidence
READERS = 2                            # pages decoded and measured at once: PNG decoding and the grid FFT are
                                       # most of the CPU time on full-size pages
# An image is read as an ECG when its grid or calibration pulse is found, or, failing those (phone photos in
# perspective), when it is a sheet of paper on which the network sees traces. Measured with the starter on 40 + 24
# simulator pages, the 4 ecg-image-kit pages and the 20 real phone photos (none refused: photos without a grid
# found had 40-65 % paper and 2.2-3.7 % trace pixels) and on 24 non-ECG images (all refused: blank scans < 0.7 %
# trace, a page of text < 1.95 %, noise and synthetic photos < 40 % paper or < 1.95 % trace).
PAPER_TOL = 40                         # RGB distance from the paper's colour that is still paper
ECG_PAPER_SHARE = 0.3                  # of the input pixels at least this much paper...
ECG_TRACE_SHARE = 0.02                 # ...and at least this much trace (seg head) make a page without grid or pulse
GRID_SEEN_CONFIDENCE = 0.6             # a lattice this sure is a grid even at a size not believed: ecg-image-kit's
                                       # random grid colours read 0.7 (at 1.6x their size), noise 0.14-0.28, text 0.35
READ_AHEAD = 1                         # batches of pages read beyond the next one while the model runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Digitize ECG images into 12-lead signal CSVs (Kaggle layout).')
    parser.add_argument('--image', required=True, type=Path, help='an image, or a folder searched recursively')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='a trained .pth (e.g. checkpoints/best.pth); default: the shipped starter weights '
                             '(starter/MODEL_CARD.md says what they read and how they were made)')
    parser.add_argument('--onnx', type=Path, help='an exported network (export_onnx.py) to run in onnxruntime on the '
                                                  'CPU instead of --checkpoint')
    parser.add_argument('--output', required=True,
                        help='CSV path for one image, or a folder (existing, or named with a trailing /) to put '
                             '{image_stem}.csv in; a folder for --image DIR')
    parser.add_argument('--fs', type=float, default=MODEL_FS, help='sampling rate of the output in Hz (default 500)')
    parser.add_argument('--batch_size', type=int, default=4, help='images per forward pass in folder mode')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
                        help='auto: CUDA, else MPS, else CPU')
    parser.add_argument('--wfdb', action='store_true',
                        help='also write {stem}.hea/.dat (WFDB, fmt 16, 1000 units/mV, not-shown samples as NaN)')
    parser.add_argument('--dicom', action='store_true',
                        help='also write {stem}.dcm, a DICOM 12-lead ECG waveform (1 uV units, not-shown samples as '
                             'the padding value; optional extra: ./setup.sh --export)')
    parser.add_argument('--edf', action='store_true',
                        help='also write {stem}.edf, EDF+ (the shown leads in mV, 1 uV steps, annotations where the '
                             'page shows no lead; optional extra: ./setup.sh --export)')
    subject = parser.add_argument_group('patient and study fields for --dicom and --edf (empty, or X in EDF+, '
                                        'unless given: never guessed)')
    subject.add_argument('--patient_id')
    subject.add_argument('--patient_name', help='as DICOM writes it: FAMILY^GIVEN')
    subject.add_argument('--patient_sex', choices=['M', 'F', 'O'])
    subject.add_argument('--patient_birth_date', type=ecg_formats.date_arg, metavar='YYYYMMDD')
    subject.add_argument('--study_date', type=ecg_formats.date_arg, metavar='YYYYMMDD',
                         help='the day the ECG was recorded')
    parser.add_argument('--threads', type=speed.threads_arg, default='auto',
                        help='CPU threads; auto: one per usable core, or OMP_NUM_THREADS where set (speed.py)')
    parser.add_argument('--gain', type=float, choices=list(GAINS_MM_MV), metavar='MM_PER_MV',
                        help='the gain the pages are printed at (5, 10 or 20 mm/mV), over what their calibration '
                             'pulse shows (default: read from the pulse; 10 where there is none)')
    parser.add_argument('--paper_speed', type=float, choices=list(PAPER_SPEEDS_MM_S), metavar='MM_PER_S',
                        help='the paper speed (25 or 50 mm/s), over what the pulse shows (default: read from the '
                             'pulse; 25 where there is none)')
    parser.add_argument('--force', action='store_true',
                        help='read an image even when it does not look like an ECG (no grid, pulse or traces found); '
                             'its sidecar JSON then carries a warning')
    parser.add_argument('--layout', default='auto', choices=['auto'] + list(LAYOUTS), metavar='NAME',
                        help='the page layout: auto (default) finds it among those the checkpoint was trained '
                             'on; or one of ' + LAYOUT_NAMES_HELP)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- inputs

def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise pdx.InputError('--device cuda: CUDA is not available on this machine')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise pdx.InputError('--device mps: MPS is not available on this machine')
    return torch.device(name)


def checkpoint_path(given):
    """--checkpoint as given, or the starter weights shipped with the toolkit (and the user is told so)."""
    if given is not None:
        return given
    if not ecg_checkpoint.STARTER.is_file():
        raise pdx.InputError(f'--checkpoint is needed: no starter weights in this copy ({ecg_checkpoint.STARTER})')
    print(f'no --checkpoint: using the starter weights {ecg_checkpoint.STARTER} '
          f'(see {ecg_checkpoint.STARTER.parent / "MODEL_CARD.md"})')
    return ecg_checkpoint.STARTER


def load_checkpoint(path, device):
    """(model in eval mode, its input size (H, W)); a missing or broken file is an InputError naming it.
    model.trained_layouts: the page layouts it was trained on (the checkpoint's 'layouts')."""
    model, checkpoint = ecg_checkpoint.load_model(path, device)
    model.trained_layouts = ecg_checkpoint.trained_layouts(checkpoint)
    return model, ecg_checkpoint.input_size(checkpoint)


def auto_layouts(model):
    """What --layout auto chooses among: the page layouts the model was trained on and their Cabrera twins."""
    return whole_pages(with_cabrera(getattr(model, 'trained_layouts', ecg_checkpoint.TRAINED_LAYOUTS)))


def candidate_layouts(model, layout):
    """The layouts inference chooses among: --layout NAME, or auto (auto_layouts). A page layout the model
    never saw is read, with a warning (its strips may be misplaced)."""
    trained = whole_pages(getattr(model, 'trained_layouts', ecg_checkpoint.TRAINED_LAYOUTS))
    if layout == 'auto':
        return auto_layouts(model)
    if layout not in auto_layouts(model):
        print(f'warning: --layout {layout}: this model was trained on {", ".join(trained)} only; '
              f'its reading of {layout} pages is untested', file=sys.stderr)
    return [layout]


def load_network(args, device, threads):
    """(model, its input size (H, W)): the checkpoint's model with its batch norms folded, channels_last
    where the trainer runs so (1.5x faster on the CPU), or with --onnx the exported network in onnxruntime."""
    if args.onnx:
        if not args.onnx.is_file():
            raise pdx.InputError(f'{args.onnx}: ONNX file not found')
        try:
            network = export_onnx.OnnxDigitizer(args.onnx, threads)
        except Exception as exc:   # onnxruntime's errors have many types
            raise pdx.InputError(f'{args.onnx}: not an ONNX export of this toolkit ({type(exc).__name__}: {exc})') from exc
        return network, network.image_size
    model, size_hw = load_checkpoint(args.checkpoint, device)
    model = speed.fold_batch_norm(model)
    if device.type in ('cpu', 'cuda'):
        model = model.to(memory_format=torch.channels_last)
    return model, size_hw


def find_images(path):
    """--image as given -> the pages to read (pdx.ImagePage: every page of a multi-page TIFF), in file order;
    a folder is searched recursively."""
    if path.is_dir():
        files = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise pdx.InputError(f'{path}: no {"/".join(IMAGE_SUFFIXES)} image in this folder')
    elif path.is_file():
        files = [path]
    else:
        raise pdx.InputError(f'{path}: image not found')
    return [page for file in files for page in pdx.image_pages(file)]


@torch.inference_mode()
def run_model(model, inputs, device, layouts=None):
    """stack_inputs' model inputs -> the model's output dict, decoded with each page's real aspect (a squeezed
    wide input changes the page's shape, and the de-rotation must know it), the scale its grid and
    calibration pulse show (padding, cropping or rescaling the page leaves amplitudes right) and its layout
    found among `layouts` (default: auto_layouts)."""
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    layouts = layouts or auto_layouts(model)
    return model(inputs['image'], geometry=ecg_model.read_geometry(inputs, layouts))


def banded_pages(outputs, trained):
    """[(page index, its row bands)] of a batch's pages whose found layout is read again in row bands
    (ecg_page.row_bands) that the model was trained on (trained: layout names)."""
    pages = []
    for i, name in enumerate(found_layouts(outputs)):
        bands = row_bands(LAYOUTS[name])
        if bands and all(band.name in trained for band in bands):
            pages.append((i, bands))
    return pages


def place_rows(outputs, i, page_height):
    """(12,) rows (px of the upright page) where each place's strip runs, from the first reading: the median
    0 mV row over the columns where the strip is present."""
    zero, present = outputs['trace_rows']['zero'][i, :N_LEADS], outputs['trace_rows']['presence'][i, :N_LEADS] > 0
    rows = [torch.median(z[p] if p.any() else z).item() for z, p in zip(zero, present)]
    return (np.array(rows) + 0.5) * page_height / outputs['trace'].shape[-2] - 0.5


def upright_page(rgb, outputs, i):
    """Page i's pixels turned upright by the first reading's rotation, as band_pixels turns them: (h, w, 3)."""
    return pdx.band_pixels(rgb, (float(outputs['decode_theta'][i]), 0, rgb.shape[0]))


def band_row(upright, outputs, inputs, i, k, size_hw):
    """Row band k of page i, cut from its upright pixels (upright_page) where the first reading put its rows, as a
    model input row with the page's own scale carried over: (input (3, H, W), aspect, px_per_mv, px_per_s,
    speed, start)."""
    first, end = pdx.band_bounds(place_rows(outputs, i, upright.shape[0]), k, upright.shape[0])
    crop = upright[first:end]
    # rows per mV as decoded (page or border, --gain), on the crop's fewer px; columns as the page's
    px_per_mv = float(outputs['trace_rows']['px_per_mv'][i]) * upright.shape[0] / crop.shape[0]
    read_px_per_s = float(inputs['read_px_per_s'][i])
    px_per_s = read_px_per_s if np.isfinite(read_px_per_s) else float(
        ecg_model.border_px_per_s(size_hw[1], inputs['page_aspect'][i:i + 1])[0])
    speed = float(inputs['read_speed_mm_s'][i]) if np.isfinite(read_px_per_s) else float('nan')
    image, _, aspect = pdx.preprocess(crop, size_hw)
    return image, aspect, px_per_mv, px_per_s, speed, float(inputs['read_start'][i])


@torch.inference_mode()
def read_row_bands(model, outputs, inputs, pages, trained, size_hw, device):
    """Second reading of the pages whose layout has row bands the model was trained on (12x1): each band is
    cut from the upright page and read at the full input size, and its leads replace the first reading's
    (outputs['signal'] in place; 'row_bands' names the bands read per page), and so does their row spread
    ('spread' (B, 12, 5000), what lead_confidence reports). pages: index -> the page's (h, w, 3) RGB, read
    when needed (once a page, turned upright once for all its bands). The rest of outputs (rows, layout) stays
    the first reading's."""
    banded = banded_pages(outputs, trained)
    outputs['row_bands'] = [[] for _ in range(len(outputs['signal']))]
    if banded:
        outputs['spread'] = ecg_model.row_spread(outputs)
    upright = {i: upright_page(pages(i), outputs, i) for i, _ in banded}
    for k in range(max((len(bands) for _, bands in banded), default=0)):
        todo = [(i, bands[k]) for i, bands in banded]
        rows = [band_row(upright[i], outputs, inputs, i, k, size_hw) for i, _ in todo]
        images, aspects, px_per_mv, px_per_s, speeds, starts = zip(*rows)
        geometry = {'theta': torch.zeros(len(rows), device=device), 'layouts': sorted({b.name for _, b in todo}),
                    **{key: torch.tensor(values, dtype=torch.float32, device=device) for key, values in (
                        ('page_aspect', aspects), ('px_per_mv', px_per_mv), ('px_per_s', px_per_s),
                        ('paper_speed', speeds), ('start', starts))}}
        band_out = model(torch.stack(images).to(device), geometry=geometry)
        band_spread = ecg_model.row_spread(band_out)
        for j, (i, band) in enumerate(todo):
            leads = torch.from_numpy(band.shown_mask().any(1)).to(outputs['signal'].device)
            outputs['signal'][i, leads] = band_out['signal'][j, leads].to(outputs['signal'].dtype)
            outputs['spread'][i, leads] = band_spread[j, leads].to(outputs['spread'].dtype)
            outputs['row_bands'][i].append(band_out['trace_rows']['layouts'][j])
    return outputs


def lead_confidence(outputs):
    """Per image and lead, how sure the signal head was: the mean spread (mV) of its row softmax over the
    samples the page shows, and a 0..1 confidence (0.5 at a spread of CONFIDENCE_HALF_MV). Leads read again in
    row bands have their band's spread (read_row_bands)."""
    spread = outputs['spread'] if 'spread' in outputs else ecg_model.row_spread(outputs)
    shown = torch.from_numpy(np.stack([layout_mask(name) for name in found_layouts(outputs)])).to(spread.device)
    mean = (spread * shown).sum(-1) / shown.sum(-1).clamp(min=1)
    return mean.float().cpu().numpy(), (1 / (1 + mean / CONFIDENCE_HALF_MV)).float().cpu().numpy()


# ---------------------------------------------------------------- signals

def found_layouts(outputs):
    """The layout name decoding found for each image of a batch."""
    return outputs['trace_rows'].get('layouts') or [ecg_model.LAYOUT.name] * len(outputs['signal'])


def layout_mask(name=ecg_model.LAYOUT.name):
    """(12, 5000) bool: which 500 Hz samples a page layout shows (on the standard page II: all 10 s via
    the rhythm strip; every other lead: its 2.5 s column)."""
    return LAYOUTS[name].shown_mask()


def shown_signal(signal, layout=ecg_model.LAYOUT.name):
    """(12, 5000) model output in mV -> float64 copy with NaN where the page's layout does not show the lead."""
    return np.where(layout_mask(layout), signal.astype(np.float64), np.nan)


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
    write_whole(path, csv_text(signal))


def write_whole(path, text):
    """Write a file whole or not at all: a failed write (disk full) leaves no half a CSV to be taken for a
    signal. Written beside it, then renamed over it."""
    partial = path.with_name(f'.{path.name}.partial')
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise pdx.InputError(f'{path}: could not be written ({exc.strerror or exc})') from exc


def csv_text(signal):
    """(12, N) mV -> the text pandas' to_csv(index=False, float_format='%.3f') writes, byte for byte, in a
    third of its time (one % per row; NaN prints as 'nan', pandas writes an empty cell)."""
    row = ','.join([f'%.{CSV_DECIMALS}f'] * len(signal)) + '\n'
    body = ''.join(row % tuple(values) for values in signal.T.tolist())
    return ','.join(LEADS) + '\n' + body.replace('nan', '')


# ---------------------------------------------------------------- driving

def output_paths(images, args):
    """Where each page's CSV goes (images: find_images' pages): --output itself for one image (or inside it
    when it is a folder, or named as one with a trailing /), {output}/{image_stem}.csv in folder mode; the
    pages of a multi-page TIFF get _p1, _p2, ... after the stem."""
    output = Path(args.output)
    as_folder = args.output.endswith(('/', os.sep)) or output.is_dir()
    if not (args.image.is_dir() or as_folder):
        return [output if page.count == 1 else output.with_name(f'{output.stem}_p{page.index + 1}{output.suffix}')
                for page in images]
    if output.exists() and not output.is_dir():
        raise pdx.InputError(f'{output}: --output must be a folder when --image is a folder')
    names = [page.name for page in images]
    twins = sorted(name for name, n in Counter(names).items() if n > 1)
    if twins:   # a.png and sub/a.jpg would overwrite each other's a.csv
        raise pdx.InputError(f'{args.image}: several images share the stem(s) {twins}; outputs are named by stem')
    return [output / f'{name}.csv' for name in names]


def check_writable(csv_paths):
    """Every output folder can be made and written, found before the model runs (not after it read every
    page): the nearest existing folder above each must be a folder we may write in."""
    for folder in sorted({path.parent for path in csv_paths}):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise pdx.InputError(f'--output {folder}: cannot be made, {existing} is a file, not a folder')
        if not os.access(existing, os.W_OK | os.X_OK):
            raise pdx.InputError(f'--output {folder}: cannot be written (no write permission in {existing})')
    for path in csv_paths:
        if path.is_dir():
            raise pdx.InputError(f'--output {path}: is a folder; give a .csv path or a folder with a trailing /')


def page_rgb(page):
    """One page's (h, w, 3) uint8 RGB pixels (pdx.read_rgb, the toolkit's one reader)."""
    return pdx.read_rgb(page.path, page.index)


def find_page(rgb):
    """An image's page as the network reads it -> ((h, w, 3) RGB, what was done, for the sidecar): a photo's
    paper found and its perspective undone (page_rectify), then paper padding around the grid cut off
    (pdx.crop_to_grid). A render or scan that needs neither comes back as it is."""
    rectified = page_rectify.rectify(rgb)
    page, box = pdx.crop_to_grid(rectified.rgb)
    done = rectified.summary() if rectified.homography is not None else {'action': rectified.action}
    if box is not None:
        done['grid_crop_xywh'] = [box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0]
    return page, done


def page_pixels(page):
    """One page (pdx.ImagePage) -> find_page's (RGB as read, what was done)."""
    return find_page(page_rgb(page))


def read_page(page, size_hw):
    """One page (pdx.ImagePage) -> (its model inputs (page_input_row) or None, problem or None)."""
    try:
        rgb, done = page_pixels(page)
        return page_input_row(rgb, size_hw, done), None
    except pdx.InputError as exc:
        return None, str(exc)


def read_batch(paths, size_hw):
    """Read a batch of images here and now; unreadable ones are reported and left out (gather_pages)."""
    return gather_pages([(path, *read_page(path, size_hw)) for path in paths])


def read_batches(images, size_hw, batch_size, pool):
    """gather_pages' answer for each batch of images in turn, every page read on pool's threads as soon as one
    is free (decoding a PNG and reading its grid release the GIL), up to READ_AHEAD batches beyond the one
    yielded: a slow page (a long pulse search) no longer leaves the other thread idle at each batch's end."""
    upcoming, reading = iter(images), deque()

    def top_up():
        wanted = (READ_AHEAD + 1) * batch_size - len(reading)
        reading.extend((path, pool.submit(read_page, path, size_hw)) for path in islice(upcoming, wanted))

    top_up()
    while reading:
        batch = [reading.popleft() for _ in range(min(batch_size, len(reading)))]
        top_up()
        yield gather_pages([(path, *future.result()) for path, future in batch])


def gather_pages(pages):
    """[(path, read_page's row or None, problem or None)] -> (page_inputs or None, paths read, problems)."""
    rows = [row for _, row, _ in pages if row is not None]
    read = [path for path, row, _ in pages if row is not None]
    problems = [problem for _, _, problem in pages if problem is not None]
    return (stack_inputs(rows) if rows else None), read, problems


def page_input_row(rgb, size_hw, page_found=None):
    """(h, w, 3) uint8 RGB page -> (input tensor (3, H, W), page aspect, px_per_mv, px_per_s, scale found,
    paper share (paper_share), what finding the page did (find_page; None: not asked))."""
    tensor, picture, aspect = pdx.preprocess(rgb, size_hw)
    return (tensor, aspect) + pdx.read_scale(rgb, size_hw) + (paper_share(picture, rgb), page_found)


def paper_share(picture, rgb):
    """Share of the input picture's pixels within PAPER_TOL of the page's paper colour: a page, or a photo of one
    on a desk, is mostly paper; noise and photos of other things are not."""
    paper = page_scale.paper_colour(rgb)
    distance = np.linalg.norm(picture.astype(np.float32) - paper, axis=2)
    return float((distance < PAPER_TOL).mean())


def stack_inputs(rows):
    """page_input_row's per page -> the model's inputs: image (B, 3, H, W), page_aspect, read_px_per_mv,
    read_px_per_s, read_speed_mm_s (B,; NaN: not read from the pulse), read_start (B,: input column where the
    pulses end and the traces start, NaN: no pulse) and 'scale', what each page's grid and pulse showed."""
    tensors, aspects, px_per_mv, px_per_s, found, paper, page_found = zip(*rows)
    speeds = [pdx.pulse_reading(scale, 'paper_speed_mm_s', 'speed_assumed') for scale in found]
    return {'image': torch.stack(tensors), 'page_aspect': torch.tensor(aspects, dtype=torch.float32),
            'read_px_per_mv': torch.tensor(px_per_mv, dtype=torch.float32),
            'read_px_per_s': torch.tensor(px_per_s, dtype=torch.float32),
            'read_speed_mm_s': torch.tensor(speeds, dtype=torch.float32),
            'read_start': torch.tensor([scale['trace_start_column'] for scale in found], dtype=torch.float32),
            'scale': list(found), 'paper_share': list(paper), 'page_found': list(page_found)}


def with_known_scale(inputs, args, size_hw):
    """--gain / --paper_speed: the page's gain and speed as the user knows them, over what its pulse showed
    (or the 10 mm/mV and 25 mm/s assumed without one). Scales read_px_per_mv and read_px_per_s to match;
    a page without a readable grid gets the page border's px per mV at that gain."""
    gain, speed = getattr(args, 'gain', None), getattr(args, 'paper_speed', None)
    if gain:
        found = torch.tensor([scale['gain_mm_mv'] for scale in inputs['scale']], dtype=torch.float32)
        border = ecg_model.default_px_per_mv(size_hw[0]) * gain / MM_PER_MV
        px_per_mv = inputs['read_px_per_mv'] * gain / found
        inputs['read_px_per_mv'] = torch.where(torch.isfinite(px_per_mv), px_per_mv, torch.full_like(px_per_mv, border))
    if speed:
        found = torch.tensor([scale['paper_speed_mm_s'] for scale in inputs['scale']], dtype=torch.float32)
        inputs['read_px_per_s'] = inputs['read_px_per_s'] * speed / found   # NaN stays NaN: the border's guess
        inputs['read_speed_mm_s'] = torch.full_like(found, speed)
    for scale in inputs['scale']:   # the sidecar tells what the user gave
        if gain:
            scale['gain_from_flag'] = gain
        if speed:
            scale['speed_from_flag'] = speed
    return inputs


def page_inputs(pages, size_hw):
    """(h, w, 3) uint8 RGB pages -> the model's inputs (stack_inputs)."""
    return stack_inputs([page_input_row(rgb, size_hw) for rgb in pages])


def digitize(model, size_hw, images, csv_paths, args, device):
    """Run every image through the model in batches and write its files, the next pages read (read_batches)
    and the last batch's files written by helper threads while the model runs (cv2 and torch release the
    GIL; reading and writing cost about as much as the network on a CPU); returns the problems met."""
    target = dict(zip(images, csv_paths))
    problems, written = [], []
    layouts = getattr(args, 'layouts', None) or auto_layouts(model)
    bar = tqdm(total=len(images), desc='digitizing', unit='img', disable=len(images) == 1,
               mininterval=pdx.PROGRESS_SECONDS)
    with ThreadPoolExecutor(READERS) as readers, ThreadPoolExecutor(1) as writer:
        for inputs, read, bad in read_batches(images, size_hw, args.batch_size, readers):
            problems += bad
            if inputs is not None:
                inputs = with_known_scale(inputs, args, size_hw)
                outputs = run_model(model, inputs, device, layouts)
                outputs = read_row_bands(model, outputs, inputs, lambda i: page_pixels(read[i])[0],
                                         getattr(model, 'trained_layouts', ()), size_hw, device)
                files = outputs_to_files(outputs, inputs, read, args, layouts)
                files, kept, refused = keep_ecg_pages(files, read, args)
                problems += refused
                written.append(writer.submit(write_batch, files, [(path, target[path]) for path in kept], args))
            bar.update(len(read) + len(bad))
        for job in written:
            job.result()   # a failed write raises here
    bar.close()
    return problems


def outputs_to_files(outputs, inputs, read, args, layouts):
    """The model's outputs for a batch -> [(signal (12, 5000), sidecar report)] per image read; layouts: the
    names decoding chose among."""
    signals = outputs['signal'].float().cpu().numpy()
    spread, confidence = lead_confidence(outputs)
    reports = [reading_report(path, inputs, outputs, i, spread[i], confidence[i], args) for i, path in enumerate(read)]
    for report, evidence in zip(reports, ecg_evidence(outputs, inputs)):
        report['ecg_evidence'] = {key: round(value, 4) if isinstance(value, float) else value
                                  for key, value in asdict(evidence).items()}
    if getattr(args, 'layout', 'auto') == 'auto':
        warn_untrained_layouts(outputs, inputs, reports, layouts)
    return list(zip(signals, reports))


@dataclass
class EcgEvidence:
    """What says an image shows an ECG: its grid or pulse seen (grid_or_pulse_seen: scale_found), or a sheet of
    paper (paper_share) on which the network's seg head sees traces (trace_share: share of input pixels)."""
    scale_found: bool
    paper_share: float
    trace_share: float

    @property
    def is_ecg(self):
        return self.scale_found or (self.paper_share >= ECG_PAPER_SHARE and self.trace_share >= ECG_TRACE_SHARE)

    def why_not(self):
        return (f'does not look like an ECG: no grid or calibration pulse found, {self.paper_share:.0%} paper and '
                f'{self.trace_share:.1%} trace pixels where an ECG page shows at least {ECG_PAPER_SHARE:.0%} and '
                f'{ECG_TRACE_SHARE:.0%} (--force reads it anyway)')


def ecg_evidence(outputs, inputs):
    """EcgEvidence of each page of a batch."""
    trace = (outputs['seg'].argmax(1) > 0).float().mean((1, 2)).cpu().tolist()
    return [EcgEvidence(grid_or_pulse_seen(scale), paper, share)
            for scale, paper, share in zip(inputs['scale'], inputs['paper_share'], trace)]


def grid_or_pulse_seen(scale):
    """Whether a page's grid or calibration pulse was seen (pdx.read_scale's answer), even where its size was
    not believed and the page border gives the scale."""
    return (scale['source'] is not None or bool(scale.get('pulse_found'))
            or scale.get('grid_confidence', 0.0) >= GRID_SEEN_CONFIDENCE)


def keep_ecg_pages(files, read, args):
    """(files, pages, problems): the pages that show an ECG (reading_report's 'ecg_evidence') with their files,
    and a problem line for each that does not; with --force those are kept, their sidecar warning."""
    kept_files, kept, refused = [], [], []
    for (signal, report), page in zip(files, read):
        evidence = EcgEvidence(**report['ecg_evidence'])
        if not evidence.is_ecg:
            if not getattr(args, 'force', False):
                refused.append(f'{page}: {evidence.why_not()}')
                continue
            report['warning'] = evidence.why_not().replace('(--force reads it anyway)', '(read because of --force)')
            tqdm.write(f'warning: {page}: {report["warning"]}', file=sys.stderr)
        kept_files.append((signal, report))
        kept.append(page)
    return kept_files, kept, refused


def warn_untrained_layouts(outputs, inputs, reports, trained):
    """A page whose strips fit a layout the model was never trained on is still read (as the nearest trained
    layout), with a warning on stderr and in its sidecar ('layout_warning')."""
    device = outputs['signal'].device
    untrained = ecg_model.untrained_fits(outputs['trace_rows']['presence'], trained, inputs['page_aspect'].to(device),
                                         inputs['read_px_per_s'].to(device), inputs.get('read_speed_mm_s'),
                                         inputs.get('read_start'))
    for report, name in zip(reports, untrained):
        if name is not None:
            report['layout_warning'] = (f'its strips fit {name} best, a layout this model was not trained on '
                                        f'({", ".join(trained)}); read as {report["layout"]}')
            tqdm.write(f'warning: {report["image"]}: {report["layout_warning"]}', file=sys.stderr)


def write_batch(results, paths, args):
    """Each image's files: results [(signal, report)], paths [(image, csv)]."""
    for (signal, report), (image_path, csv_path) in zip(results, paths):
        write_outputs(shown_signal(signal, report['layout']), csv_path, image_path, args, report)


def reading_report(path, inputs, outputs, i, spread, confidence, args):
    """What the sidecar JSON tells about one image: the scale found, the rotation, per-lead confidence."""
    scale = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in inputs['scale'][i].items()}
    page = {'page': path.index + 1, 'pages': path.count} if getattr(path, 'count', 1) > 1 else {}
    return {'image': str(getattr(path, 'path', path)), **page, 'checkpoint': str(args.onnx or args.checkpoint),
            'checkpoint_sha256': getattr(args, 'checkpoint_sha256', None), 'fs': args.fs,
            'layout': found_layouts(outputs)[i], 'rotation_deg': float(outputs['decode_theta'][i]), 'scale': scale,
            'px_per_mv_input': float(outputs['trace_rows']['px_per_mv'][i]),
            'row_bands': outputs.get('row_bands', [[]] * (i + 1))[i],
            'leads': {lead: {'row_spread_mv': round(float(s), 4), 'confidence': round(float(c), 3)}
                      for lead, s, c in zip(LEADS, spread, confidence)}, **scale_warning(inputs['scale'][i]),
            **lead_order_report(outputs['trace_rows'].get('lead_orders'), i),
            **({'page_found': inputs['page_found'][i]} if inputs.get('page_found', [None] * (i + 1))[i] else {})}


def lead_order_report(lead_orders, i):
    """{'lead_order': how page i's lead order was told (ecg_model.LeadOrder)} where the layout has another
    order drawing the same strips (Cabrera), else {}; an unclear verdict says that the standard order was kept."""
    order = lead_orders[i] if lead_orders else None
    if order is None:
        return {}
    misfits = {'standard_misfit': order.standard_misfit, 'other_misfit': order.other_misfit}
    report = {'chosen': order.chosen, 'verdict': order.verdict, 'other': order.other,
              **{k: (round(v, 4) if np.isfinite(v) else None) for k, v in misfits.items()}}
    if order.verdict == 'unclear':
        report['note'] = (f'the limb leads fit Einthoven\'s and Goldberger\'s laws poorly in the standard order and no '
                          f'better as {order.other}: the standard order is kept')
    return {'lead_order': report}


def scale_warning(found):
    """{'scale_warning': what was wrong with the scale the page shows} where something was, else {}: a grid
    read at an implausible size (then the page border's scale is used), or a calibration pulse that fits no
    standard gain and paper speed on the grid (then 10 mm/mV and 25 mm/s are assumed, not an absurd gain)."""
    if found.get('rejected'):
        return {'scale_warning': f'{found["rejected"]}: read at the page border\'s scale'}
    assumed = [name for name, key in (('gain', 'gain_assumed'), ('paper speed', 'speed_assumed')) if found[key]]
    if found.get('pulse_found') and found['source'] and assumed:
        return {'scale_warning': f'the calibration pulse fits no standard {" or ".join(assumed)} on the grid; read at '
                                 f'{found["gain_mm_mv"]:g} mm/mV and {found["paper_speed_mm_s"]:g} mm/s'}
    return {}


def write_outputs(signal, csv_path, image_path, args, report):
    """(12, 5000) mV with NaN gaps -> CSV (and WFDB, DICOM, EDF+) at --fs, and {stem}.json: scale found and
    confidence."""
    signal = resample_signal(signal, args.fs)
    write_csv(signal, csv_path)
    sidecar = csv_path.with_suffix('.json')
    write_whole(sidecar, json.dumps(report, indent=2))
    reading = ecg_formats.Reading.from_report(signal, args.fs, report, subject_of(args))
    formats = [name for name in ('wfdb', 'dicom', 'edf') if getattr(args, name, False)]
    written = [csv_path, sidecar] + ecg_formats.write_formats(reading, csv_path, formats)
    tqdm.write(f'{image_path} -> ' + ', '.join(map(str, written)))


def subject_of(args):
    """The patient and study fields the user gave (--patient_id, ...), for the DICOM and EDF+ headers."""
    return ecg_formats.Subject(getattr(args, 'patient_id', None), getattr(args, 'patient_name', None),
                               getattr(args, 'patient_sex', None), getattr(args, 'patient_birth_date', None),
                               getattr(args, 'study_date', None))


def main(argv=None):
    args = parse_args(argv)
    if args.fs <= 0 or args.batch_size < 1:
        raise pdx.InputError('--fs and --batch_size must be positive')
    if args.checkpoint is not None and args.onnx is not None:
        raise pdx.InputError('give --checkpoint (torch) or --onnx (onnxruntime), not both')
    ecg_formats.check_formats(args.fs, args.dicom, args.edf)   # a missing extra stops here, before the model
    images = find_images(args.image)
    device = pick_device('cpu' if args.onnx else args.device)
    threads, _ = speed.set_threads(args.threads)
    speed.keep_freed_memory()
    if not args.onnx:
        args.checkpoint = checkpoint_path(args.checkpoint)
    csv_paths = output_paths(images, args)
    check_writable(csv_paths)
    model, size_hw = load_network(args, device, threads)
    args.checkpoint_sha256 = ecg_formats.sha256_file(args.onnx or args.checkpoint)   # once a run, in every file
    args.layouts = candidate_layouts(model, args.layout)
    problems = digitize(model, size_hw, images, csv_paths, args, device)
    n_rows = round(SECONDS * args.fs)
    print(f'wrote {len(images) - len(problems)} signal(s) of {n_rows} rows at {args.fs:g} Hz '
          f'(model input {size_hw[0]}x{size_hw[1]}, device {device}) to {args.output}')
    if problems:
        raise pdx.InputError(f'{len(problems)} image(s) not read: ' + '; '.join(problems))


if __name__ == '__main__':
    pdx.run_cli(main)
