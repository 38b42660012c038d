"""Digitize paper-ECG images with a trained checkpoint: image -> 12-lead signal CSV (Kaggle layout).

One image:
    python inference.py --image test.png --checkpoint best.pth --output result.csv
A folder (all *.png / *.jpg / *.jpeg / *.tif / *.tiff / *.pdf in it, recursively), one {image_stem}.csv each
({stem}_p2.csv for page 2 of a multi-page TIFF or PDF), at 250 Hz, plus WFDB:
    python inference.py --image scans/ --checkpoint best.pth --output signals/ --fs 250 --wfdb
The network in onnxruntime instead of torch (export_onnx.py; the decoding stays in torch):
    python inference.py --image scans/ --onnx model.onnx --output signals/
Also a DICOM 12-lead ECG waveform, an EDF+ file and WFDB beside the CSV (ecg_formats.py; ./setup.sh --export):
    python inference.py --image page.png --output out/page.csv --dicom --edf --wfdb --patient_id 123

Needs only the image (no simulator JSON): it is read at any size (RGB, RGBA, gray, 16-bit, CMYK; PNG, JPEG or TIFF,
turned as its EXIF orientation says; a PDF's pages rasterized at --pdf_dpi; a truncated or corrupt file is named
and skipped),
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
from collections import Counter
from dataclasses import asdict, dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ecg_cli
import ecg_formats
import ecg_decode
import ecg_signals
import page_image
import page_reader
import speed
from ecg_page import FS as MODEL_FS, LAYOUTS, LEADS, SECONDS   # 500 Hz x 10 s
from ecg_page import GAINS_MM_MV, LAYOUT_NAMES_HELP, PAPER_SPEEDS_MM_S

CSV_DECIMALS = 3
# An image is read as an ECG when its grid or calibration pulse is found, or, failing those (phone photos in
# perspective), when it is a sheet of paper (page_reader.paper_share) on which the network sees traces. Measured with
# the starter on 40 + 24 simulator pages, the 4 ecg-image-kit pages and the 20 real phone photos (none refused:
# photos without a grid found had 40-65 % paper and 2.2-3.7 % trace pixels) and on 24 non-ECG images (all refused:
# blank scans < 0.7 % trace, a page of text < 1.95 %, noise and synthetic photos < 40 % paper or < 1.95 % trace).
ECG_PAPER_SHARE = 0.3                  # of the input pixels at least this much paper...
ECG_TRACE_SHARE = 0.02                 # ...and at least this much trace (seg head) make a page without grid or pulse
GRID_SEEN_CONFIDENCE = 0.6             # a lattice this sure is a grid even at a size not believed: ecg-image-kit's
                                       # random grid colours read 0.7 (at 1.6x their size), noise 0.14-0.28, text 0.35


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Digitize ECG images into 12-lead signal CSVs (Kaggle layout).')
    parser.add_argument('--image', required=True, type=Path, help='an image or PDF, or a folder searched recursively')
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
    parser.add_argument('--pdf_dpi', type=positive_dpi, default=page_image.PDF_DPI,
                        help=f'dots per inch a PDF page is rasterized at (default {page_image.PDF_DPI:g}); each page '
                             'of a PDF is read as an image, its outputs named {stem}_p1, {stem}_p2, ...')
    return parser.parse_args(argv)


def positive_dpi(text):
    dpi = float(text)
    if not 36 <= dpi <= 1200:
        raise argparse.ArgumentTypeError(f'{text}: a dpi between 36 and 1200')
    return dpi


# ---------------------------------------------------------------- inputs


# ---------------------------------------------------------------- signals


def resample_signal(signal, fs):
    """(12, 5000) at 500 Hz with NaN gaps -> (12, round(10 * fs)); each finite run on its own (the
    dataset's resampler, run the other way), so NaN never smears and the gaps stay where they were."""
    if fs == MODEL_FS:
        return signal
    n_out = round(SECONDS * fs)
    return np.stack([ecg_signals.resample_lead(values, MODEL_FS, fs, n_out) for values in signal]).astype(np.float64)


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
        raise ecg_cli.InputError(f'{path}: could not be written ({exc.strerror or exc})') from exc


def csv_text(signal):
    """(12, N) mV -> the text pandas' to_csv(index=False, float_format='%.3f') writes, byte for byte, in a
    third of its time (one % per row; NaN prints as 'nan', pandas writes an empty cell)."""
    row = ','.join([f'%.{CSV_DECIMALS}f'] * len(signal)) + '\n'
    body = ''.join(row % tuple(values) for values in signal.T.tolist())
    return ','.join(LEADS) + '\n' + body.replace('nan', '')


# ---------------------------------------------------------------- driving

def output_paths(images, args):
    """Where each page's CSV goes (images: page_reader.find_images' pages): --output itself for one image (or inside it
    when it is a folder, or named as one with a trailing /), {output}/{image_stem}.csv in folder mode; the
    pages of a multi-page TIFF get _p1, _p2, ... after the stem."""
    output = Path(args.output)
    as_folder = args.output.endswith(('/', os.sep)) or output.is_dir()
    if not (args.image.is_dir() or as_folder):
        return [output if page.count == 1 else output.with_name(f'{output.stem}_p{page.index + 1}{output.suffix}')
                for page in images]
    if output.exists() and not output.is_dir():
        raise ecg_cli.InputError(f'{output}: --output must be a folder when --image is a folder')
    names = [page.name for page in images]
    twins = sorted(name for name, n in Counter(names).items() if n > 1)
    if twins:   # a.png and sub/a.jpg would overwrite each other's a.csv
        raise ecg_cli.InputError(f'{args.image}: several images share the stem(s) {twins}; outputs are named by stem')
    return [output / f'{name}.csv' for name in names]


def check_writable(csv_paths):
    """Every output folder can be made and written, found before the model runs (not after it read every
    page): the nearest existing folder above each must be a folder we may write in."""
    for folder in sorted({path.parent for path in csv_paths}):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ecg_cli.InputError(f'--output {folder}: cannot be made, {existing} is a file, not a folder')
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ecg_cli.InputError(f'--output {folder}: cannot be written (no write permission in {existing})')
    for path in csv_paths:
        if path.is_dir():
            raise ecg_cli.InputError(f'--output {path}: is a folder; give a .csv path or a folder with a trailing /')



def digitize(reader, images, csv_paths, args):
    """Read every image with reader (page_reader.Reader) in batches and write its files, the next pages read
    (page_reader.read_batches) and the last batch's files written by helper threads while the model runs (cv2
    and torch release the GIL; reading and writing cost about as much as the network on a CPU); returns the
    problems met."""
    target = dict(zip(images, csv_paths))
    problems, written = [], []
    bar = tqdm(total=len(images), desc='digitizing', unit='img', disable=len(images) == 1,
               mininterval=ecg_cli.PROGRESS_SECONDS)
    with ThreadPoolExecutor(page_reader.READERS) as readers, ThreadPoolExecutor(1) as writer:
        for inputs, read, bad in page_reader.read_batches(images, reader.size_hw, args.batch_size, readers):
            problems += bad
            if inputs is not None:
                inputs = page_reader.with_known_scale(inputs, reader.size_hw, args.gain, args.paper_speed)
                outputs = page_reader.read_signals(reader, inputs, page_reader.found_pixels(read))
                files = outputs_to_files(outputs, inputs, read, args, reader.layouts)
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
    readings = page_reader.page_readings(outputs, inputs)
    reports = [reading_report(path, reading, args) for path, reading in zip(read, readings)]
    for report, reading in zip(reports, readings):
        report['ecg_evidence'] = {key: round(value, 4) if isinstance(value, float) else value
                                  for key, value in asdict(ecg_evidence(reading)).items()}
    if getattr(args, 'layout', 'auto') == 'auto':
        warn_untrained_layouts(outputs, inputs, reports, layouts)
    return [(reading.signal, report) for reading, report in zip(readings, reports)]


@dataclass
class EcgEvidence:
    """What says an image shows an ECG: its grid or pulse seen (grid_or_pulse_seen: scale_found), or a sheet of
    paper (page_reader.paper_share) on which the network's seg head sees traces (trace_share: share of input pixels)."""
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


def ecg_evidence(reading):
    """EcgEvidence of a page (page_reader.PageReading)."""
    return EcgEvidence(grid_or_pulse_seen(reading.scale), reading.paper_share, reading.trace_share)


def grid_or_pulse_seen(scale):
    """Whether a page's grid or calibration pulse was seen (page_scale.read_scale's answer), even where its size was
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
    untrained = ecg_decode.untrained_fits(outputs['trace_rows']['presence'], trained, inputs['page_aspect'].to(device),
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
        write_outputs(page_reader.shown_signal(signal, report['layout']), csv_path, image_path, args, report)


def reading_report(path, reading, args):
    """What the sidecar JSON tells about one image (page_reader.PageReading): the scale found, the rotation,
    per-lead confidence."""
    scale = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in reading.scale.items()}
    page = {'page': path.index + 1, 'pages': path.count} if getattr(path, 'count', 1) > 1 else {}
    if page_image.is_pdf(getattr(path, 'path', path)):
        page['pdf_dpi'] = path.dpi       # the raster the scale was read on
    return {'image': str(getattr(path, 'path', path)), **page, 'checkpoint': str(args.onnx or args.checkpoint),
            'checkpoint_sha256': getattr(args, 'checkpoint_sha256', None), 'fs': args.fs,
            'layout': reading.layout, 'rotation_deg': reading.rotation_deg, 'scale': scale,
            'px_per_mv_input': reading.px_per_mv_input, 'row_bands': reading.row_bands,
            'leads': {lead: {'row_spread_mv': round(float(s), 4), 'confidence': round(float(c), 3)}
                      for lead, s, c in zip(LEADS, reading.spread_mv, reading.confidence)},
            **scale_warning(reading.scale), **lead_order_report(reading.lead_order),
            **({'page_found': reading.page_found} if reading.page_found else {})}


def lead_order_report(order):
    """{'lead_order': how the page's lead order was told (ecg_decode.LeadOrder)} where the layout has another
    order drawing the same strips (Cabrera), else {}; an unclear verdict says that the standard order was kept."""
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
        raise ecg_cli.InputError('--fs and --batch_size must be positive')
    if args.checkpoint is not None and args.onnx is not None:
        raise ecg_cli.InputError('give --checkpoint (torch) or --onnx (onnxruntime), not both')
    ecg_formats.check_formats(args.fs, args.dicom, args.edf)   # a missing extra stops here, before the model
    images = page_reader.find_images(args.image, args.pdf_dpi)
    device = page_reader.pick_device('cpu' if args.onnx else args.device)
    threads, _ = speed.set_threads(args.threads)
    speed.keep_freed_memory()
    if not args.onnx:
        args.checkpoint = page_reader.checkpoint_path(args.checkpoint)
    csv_paths = output_paths(images, args)
    check_writable(csv_paths)
    reader = page_reader.open_reader(args.checkpoint, device, threads, args.onnx, args.layout)
    args.checkpoint_sha256 = ecg_formats.sha256_file(args.onnx or args.checkpoint)   # once a run, in every file
    problems = digitize(reader, images, csv_paths, args)
    n_rows = round(SECONDS * args.fs)
    print(f'wrote {len(images) - len(problems)} signal(s) of {n_rows} rows at {args.fs:g} Hz '
          f'(model input {reader.size_hw[0]}x{reader.size_hw[1]}, device {device}) to {args.output}')
    if problems:
        raise ecg_cli.InputError(f'{len(problems)} image(s) not read: ' + '; '.join(problems))


if __name__ == '__main__':
    ecg_cli.run_cli(main)
