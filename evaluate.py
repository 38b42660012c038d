"""Score a trained checkpoint on a data set.

    python evaluate.py --checkpoint experiments/run_xxx/checkpoints/best.pth
    python evaluate.py --checkpoint best.pth --sim_root /path/to/simulations --csv_root /path/to/train

Without --sim_root / --csv_root it scores the validation split recorded in the run's config.json.

Real pages (phone photos, scans) come without simulator JSON: --images scores them against their true signals,
each image read exactly as inference.py reads it, over the standard layout's windows (or --layout NAME's):
    python evaluate.py --checkpoint starter/ecg_starter.pth --images ../shared/real/photos/images \
        --csv_root ../shared/real/photos/csv
An image {id}-{k}.jpg (or {id}.png) is record {id} of --csv_root/train.csv; only the samples its true signal
holds (not NaN) are scored. A manifest.csv in or beside the images folder (or --manifest) with an image or id
column and an artefact (or style) column gives the per-artefact table.
Reports Pearson and SNR (dB, Kaggle-style) overall, per lead, per sampling rate and per image style;
the rotation error in degrees; the 0 mV line error in input pixels; the seg Dice; and the round-trip
bound (the ground-truth targets decoded by the same path, the best any model can do at this input
size) beside the model's score. A table goes to the terminal, JSON and CSV reports beside the
checkpoint ({checkpoint stem}_eval.json / .csv).
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # waiting threads sleep: a shared CPU must not collapse (speed.py)

import argparse
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import ecg_checkpoint
import ecg_cli
import ecg_decode
import ecg_model
import ecg_signals
import ecg_trainer
import page_image
import page_json
import page_reader
import production_dataset as pdx
import speed
from ecg_page import LAYOUTS, LEADS, STANDARD

MANIFEST = 'manifest.csv'
ARTEFACT_COLUMNS = ('artefact', 'artifact', 'style')   # the first one a manifest has names each page's artefact


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Score a checkpoint: Pearson, SNR, theta, baseline, Dice, round-trip bound.')
    p.add_argument('--checkpoint', required=True, help='best.pth / last.pth of a run')
    p.add_argument('--sim_root', help='images to score (default: the run\'s validation split)')
    p.add_argument('--csv_root', help='signals of those images')
    p.add_argument('--images', type=Path,
                   help='real pages without simulator JSON (photos, scans): a folder or one image, scored against '
                        '--csv_root as inference.py reads them')
    p.add_argument('--layout', choices=list(LAYOUTS), metavar='NAME',
                   help='with --images: read the pages as this layout and score its windows (default: the layout '
                        'found, as inference.py does, scored over the standard layout\'s windows)')
    p.add_argument('--manifest', type=Path,
                   help=f'with --images: a CSV naming each page\'s artefact (default: {MANIFEST} in or beside the '
                        'images folder, where there is one)')
    p.add_argument('--max_samples', type=int, default=None, help='score at most this many images')
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--num_workers', type=int, default=0)
    p.add_argument('--output', help='report path stem (default: beside the checkpoint)')
    p.add_argument('--force_cpu', action='store_true')
    p.add_argument('--untrained', action='store_true',
                   help='score a freshly initialized model of the same architecture (the chance level)')
    p.add_argument('--threads', type=speed.threads_arg, default='auto',
                   help='CPU threads; auto: one per usable core, or OMP_NUM_THREADS where set (speed.py)')
    return p.parse_args(argv)


def evaluation_refs(config, sim_root=None, csv_root=None, max_samples=None):
    """The images to score: the given roots, or the run's own validation split."""
    if sim_root or csv_root:
        if not (sim_root and csv_root):
            raise ecg_cli.InputError('give both --sim_root and --csv_root, or neither (the run\'s validation split)')
        refs, problems = pdx.find_samples(sim_root, csv_root, max_samples)
        return refs, problems
    refs, problems = pdx.find_samples(config['sim_root'], config['csv_root'], config['max_samples'])
    _, val_refs = pdx.split_by_record(refs, config['val_fraction'], config['seed'])
    return val_refs[:max_samples] if max_samples else val_refs, problems


def seg_dice(logits, target):
    """(B,) mean Dice over the lead classes present in each target."""
    pred = logits.argmax(1)
    scores = []
    for b in range(len(pred)):
        per_class = []
        for c in target[b].unique().tolist():
            if c == 0:
                continue
            p, t = pred[b] == c, target[b] == c
            per_class.append(2 * (p & t).sum().item() / max(1, p.sum().item() + t.sum().item()))
        scores.append(float(np.mean(per_class)) if per_class else float('nan'))
    return torch.tensor(scores)


def baseline_error_px(predicted_rows, true_rows):
    """(B,) mean |predicted - true| 0 mV row over the columns each lead is plotted, in input pixels."""
    ok = torch.isfinite(true_rows)
    diff = (predicted_rows - torch.nan_to_num(true_rows)).abs() * ok
    return diff.sum((1, 2)) / ok.sum((1, 2)).clamp(min=1)


def round_trip(batch):
    """Ground truth decoded through the model's decoding path: (B, 12, 5000)."""
    centre = (batch['trace_top'] + batch['trace_bot']) / 2
    signal, _ = ecg_decode.decode_rows(centre, batch['baseline_row'], None, ecg_decode.true_geometry(batch))
    return signal


def score_batches(reader, loader):
    """Per-image numbers for the whole loader, each page read as inference reads it (page_reader.read_signals:
    its layout found among reader.layouts, pages of a layout with row bands among reader.trained read again
    in them)."""
    rows, model_stats, bound_stats = [], [], []
    for batch in tqdm(loader, desc='evaluating', leave=False, mininterval=ecg_cli.PROGRESS_SECONDS):
        batch = page_reader.to_device(batch, reader.device)
        outputs = page_reader.read_signals(reader, batch, page_reader.known_pixels(batch['png']))
        outputs = {k: (v.float() if torch.is_tensor(v) else v) for k, v in outputs.items()}
        model_stats.append(ecg_trainer.record_stats(outputs['signal'], batch['signal'], batch['signal_mask']))
        scores = ecg_trainer.per_record(model_stats[-1])
        bound_stats.append(ecg_trainer.record_stats(round_trip(batch), batch['signal'], batch['signal_mask']))
        theta_err = (outputs['decode_theta'] - batch['theta']).abs().cpu()
        dice = seg_dice(outputs['seg'], batch['seg'])
        base = baseline_error_px(outputs['trace_rows']['zero'], batch['baseline_row']).cpu()
        scale_error = (100 * (batch['read_px_per_mv'] / batch['px_per_mv'] - 1)).cpu()   # NaN: no scale found
        for i in range(len(batch['image'])):
            rows.append({'record_id': batch['record_id'][i], 'fs': float(batch['fs'][i]), 'style': batch['style'][i],
                         **{name: float(values[i]) for name, values in scores.items()},
                         'theta_true': float(batch['theta'][i]), 'theta_valid': bool(batch['theta_valid'][i] > 0),
                         'theta_error_deg': float(theta_err[i]), 'seg_dice': float(dice[i]),
                         'baseline_error_px': float(base[i]), 'scale_error_pct': float(scale_error[i]),
                         'gain_mm_mv': float(batch['gain_mm_mv'][i]), 'read_gain_mm_mv': float(batch['read_gain_mm_mv'][i]),
                         'paper_speed_mm_s': float(batch['paper_speed_mm_s'][i]),
                         'read_speed_mm_s': float(batch['read_speed_mm_s'][i]),
                         'layout': page_json.layout_name(batch['layout_id'][i]) or 'unknown',
                         'layout_found': outputs['trace_rows']['layouts'][i],
                         'row_bands': ' '.join(outputs['row_bands'][i])})
    return pd.DataFrame(rows), ecg_trainer.concat_stats(model_stats), ecg_trainer.concat_stats(bound_stats)


def subset(stats, index):
    return {k: v[index] for k, v in stats.items()}


def group_report(frame, model_stats, bound_stats, column):
    """Pearson and SNR of the model and the bound (where given) for each value of one column (fs, style)."""
    out = {}
    for value, group in frame.groupby(column):
        index = torch.tensor(group.index.to_numpy())
        m = ecg_trainer.summarize(subset(model_stats, index))
        out[str(value)] = {'n': len(group), **{name: m[name] for name in ecg_trainer.METRICS}}
        if bound_stats is not None:
            b = ecg_trainer.summarize(subset(bound_stats, index))
            out[str(value)].update({f'bound_{name}': b[name] for name in ecg_trainer.METRICS})
    return out


def build_report(frame, model_stats, bound_stats):
    model_sum = ecg_trainer.summarize(model_stats)
    bound_sum = ecg_trainer.summarize(bound_stats)
    rotated = frame[frame.theta_valid & (frame.theta_true.abs() > 0.5)]
    valid_theta = frame[frame.theta_valid]
    return {
        'n_images': len(frame),
        **{name: model_sum[name] for name in ecg_trainer.METRICS},
        'pages_below_0db': int((frame.snr_db < 0).sum()), 'worst_snr_db': float(frame.snr_db.min()),
        **{f'bound_{name}': bound_sum[name] for name in ecg_trainer.METRICS},
        'per_lead': {lead: {'pearson': model_sum['pearson_per_lead'][i], 'snr_db': model_sum['snr_db_per_lead'][i],
                            'bound_pearson': bound_sum['pearson_per_lead'][i],
                            'bound_snr_db': bound_sum['snr_db_per_lead'][i]}
                     for i, lead in enumerate(LEADS)},
        'per_fs': group_report(frame, model_stats, bound_stats, 'fs'),
        'per_style': group_report(frame, model_stats, bound_stats, 'style'),
        'per_layout': group_report(frame, model_stats, bound_stats, 'layout'),
        'layout_found_share': float((frame.layout == frame.layout_found).mean()),
        'theta_error_deg': float(valid_theta.theta_error_deg.mean()) if len(valid_theta) else float('nan'),
        'theta_error_deg_rotated': float(rotated.theta_error_deg.mean()) if len(rotated) else float('nan'),
        'baseline_error_px': float(frame.baseline_error_px.mean()),
        'seg_dice': float(frame.seg_dice.mean()),
        'scale_found_share': float(np.isfinite(frame.scale_error_pct).mean()),
        'scale_error_pct': float(frame.scale_error_pct.abs().mean()),
        # read from the calibration pulse and right; an assumed 10 mm/mV or 25 mm/s does not count
        'gain_found_share': float((frame.read_gain_mm_mv == frame.gain_mm_mv).mean()),
        'speed_found_share': float((frame.read_speed_mm_s == frame.paper_speed_mm_s).mean()),
        'per_gain': {f'{gain:g} mm/mV': float((group.read_gain_mm_mv == gain).mean())
                     for gain, group in frame.groupby('gain_mm_mv')},
    }


def evaluate_checkpoint(checkpoint_path, sim_root=None, csv_root=None, max_samples=None, batch_size=4,
                        num_workers=0, force_cpu=False, untrained=False):
    """Score one checkpoint (or, untrained, a fresh model of its architecture) -> (report, per-image frame)."""
    device = page_reader.pick_device('cpu' if force_cpu else 'auto')
    model, checkpoint = ecg_checkpoint.load_model(checkpoint_path, device)
    if untrained:
        torch.manual_seed(checkpoint['config']['seed'])
        model = ecg_model.ECGDigitizer(**checkpoint['model_args']).to(device).eval()
    config = checkpoint['config']
    refs, problems = evaluation_refs(config, sim_root, csv_root, max_samples)
    dataset = pdx.ECGImageDataset(refs, target_size=ecg_checkpoint.input_size(checkpoint), read_scale=True)
    for path, message in problems + dataset.problems:
        print(f'skipped {path}: {message}')
    if len(dataset) == 0:
        raise ecg_cli.InputError('no usable image to evaluate')
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    layouts = ecg_checkpoint.trained_layouts(checkpoint)
    reader = page_reader.Reader(model, ecg_checkpoint.input_size(checkpoint), device,
                                ecg_checkpoint.readable_layouts(checkpoint), layouts)
    frame, model_stats, bound_stats = score_batches(reader, loader)
    report = build_report(frame, model_stats, bound_stats)
    report.update(checkpoint=str(checkpoint_path), untrained=untrained, image_size=config['image_size'],
                  encoder=config['encoder'], trained_layouts=layouts,
                  pulse_start_weight=model.pulse_start_weight or ecg_decode.PULSE_START_WEIGHT,
                  epoch=checkpoint['epoch'], skipped=len(problems) + len(dataset.problems))
    return report, frame


# ---------------------------------------------------------------- real pages (no simulator JSON)

@dataclass
class RealPage:
    """One image to score without JSON: its record, its true signal at 500 Hz (NaN where the page does not
    print the lead) and the artefact its manifest names ('' where none does)."""
    record_id: str
    image: page_image.ImagePage
    truth: np.ndarray
    artefact: str = ''


def record_of(stem, records):
    """The train.csv id of an image: its stem, or the stem less its '-{k}' page number (Kaggle layout)."""
    record_id, _, page = stem.rpartition('-')
    return record_id if stem not in records and page.isdigit() else stem


def manifest_path(images, given=None):
    """--manifest, or a manifest.csv in or beside the images folder; None where there is none."""
    if given is not None:
        if not given.is_file():
            raise ecg_cli.InputError(f'{given}: --manifest not found')
        return given
    folder = images if images.is_dir() else images.parent
    return next((path for path in (folder / MANIFEST, folder.parent / MANIFEST) if path.is_file()), None)


def read_manifest(path):
    """manifest CSV -> {image file name or record id: artefact}; {} without a path."""
    if path is None:
        return {}
    try:
        table = pd.read_csv(path, dtype=str)
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise ecg_cli.InputError(f'{path}: not a readable CSV ({type(exc).__name__})') from exc
    column = next((name for name in ARTEFACT_COLUMNS if name in table.columns), None)
    keys = [name for name in ('image', 'id') if name in table.columns]
    if column is None or not keys:
        raise ecg_cli.InputError(f'{path}: a manifest needs an image or id column and one of {list(ARTEFACT_COLUMNS)}')
    return {key: artefact for name in keys for key, artefact in zip(table[name], table[column].fillna(''))}


def real_pages(images, csv_root, manifest=None, max_samples=None):
    """The images to score with their true signals -> (pages, problems [(path, message)])."""
    records = ecg_signals.read_train_csv(csv_root)
    artefacts = read_manifest(manifest)
    pages, problems = [], []
    for image in page_reader.find_images(images)[:max_samples]:
        record_id = record_of(image.name, records)
        if record_id not in records:
            problems.append((image, f'id {record_id!r} is not in {Path(csv_root) / "train.csv"}'))
            continue
        try:
            truth = ecg_signals.load_signal(Path(csv_root) / record_id / f'{record_id}.csv', *records[record_id])
        except ecg_cli.SampleError as exc:
            problems.append((image, str(exc)))
            continue
        pages.append(RealPage(record_id, image, truth, artefacts.get(image.path.name, artefacts.get(record_id, ''))))
    return pages, problems


def read_real_batches(reader, pages, args):
    """Each batch's pages read exactly as inference.py reads them without --gain or --paper_speed
    (page_reader.read_batches, read_signals) -> yields (pages read, their page_reader.PageReading, problems)."""
    by_path = {page.image: page for page in pages}
    with ThreadPoolExecutor(page_reader.READERS) as readers:
        for inputs, read, bad in page_reader.read_batches(list(by_path), reader.size_hw, args.batch_size, readers):
            if inputs is None:
                yield [], [], bad
                continue
            outputs = page_reader.read_signals(reader, inputs, page_reader.found_pixels(read))
            yield [by_path[path] for path in read], page_reader.page_readings(outputs, inputs), bad


def score_real_pages(reader, pages, args):
    """-> (per-image frame, record_stats of all pages read, problems). Scored: the samples the truth holds
    within the scored layout's windows, against the signal inference would write (NaN where the layout found
    does not show a lead: a sample the reading leaves NaN counts as a prediction of 0, as Kaggle scores it)."""
    window = torch.from_numpy(page_reader.layout_mask(args.score_layout))
    rows, stats, problems = [], [], []
    for read, readings, bad in tqdm(read_real_batches(reader, pages, args), desc='evaluating', leave=False,
                                    mininterval=ecg_cli.PROGRESS_SECONDS):
        problems += bad
        if not read:
            continue
        truth = torch.from_numpy(np.stack([page.truth for page in read]))
        signals = torch.from_numpy(np.stack([reading.shown_signal() for reading in readings]))
        stats.append(ecg_trainer.record_stats(signals, truth, window.expand_as(truth)))
        scores = ecg_trainer.per_record(stats[-1])
        for i, (page, reading) in enumerate(zip(read, readings)):
            rows.append({'record_id': page.record_id, 'image': page.image.path.name, 'artefact': page.artefact,
                         **{name: float(values[i]) for name, values in scores.items()}, 'layout_found': reading.layout,
                         'scale_source': reading.scale['source'] or 'border', 'rotation_deg': reading.rotation_deg})
    if not rows:
        raise ecg_cli.InputError('no usable image to evaluate: ' + '; '.join(problems))
    return pd.DataFrame(rows), ecg_trainer.concat_stats(stats), problems


def real_report(frame, stats):
    """Overall, per lead and per artefact Pearson and SNR; the pages below 0 dB and the worst page."""
    overall = ecg_trainer.summarize(stats)
    worst = frame.loc[frame.snr_db.idxmin()]
    return {
        'n_images': len(frame), **{name: overall[name] for name in ecg_trainer.METRICS},
        'per_lead': {lead: {'pearson': overall['pearson_per_lead'][i], 'snr_db': overall['snr_db_per_lead'][i]}
                     for i, lead in enumerate(LEADS)},
        'per_artefact': group_report(frame, stats, None, 'artefact') if frame.artefact.ne('').any() else {},
        'pages_below_0db': int((frame.snr_db < 0).sum()),
        'worst_page': {'image': worst.image, 'snr_db': float(worst.snr_db), 'pearson': float(worst.pearson)},
        'scale_found_share': float((frame.scale_source != 'border').mean()),
    }


def evaluate_real_pages(args):
    """--images: score real pages (no JSON) as inference.py reads them -> (report, per-image frame)."""
    if not args.csv_root or args.sim_root:
        raise ecg_cli.InputError('--images needs --csv_root (the true signals) and no --sim_root')
    device = page_reader.pick_device('cpu' if args.force_cpu else 'auto')
    reader = page_reader.open_reader(args.checkpoint, device, torch.get_num_threads(), layout=args.layout or 'auto')
    args.score_layout = args.layout or STANDARD.name
    manifest = manifest_path(args.images, args.manifest)
    pages, problems = real_pages(args.images, args.csv_root, manifest, args.max_samples)
    for path, message in problems:
        print(f'skipped {path}: {message}')
    if not pages:
        raise ecg_cli.InputError(f'{args.images}: no image with a true signal in {args.csv_root} to evaluate')
    frame, stats, unread = score_real_pages(reader, pages, args)
    for message in unread:
        print(f'skipped {message}')
    report = real_report(frame, stats)
    report.update(checkpoint=str(args.checkpoint), images=str(args.images), manifest=manifest and str(manifest),
                  image_size=list(reader.size_hw), layouts_read=reader.layouts, layout_scored=args.score_layout,
                  skipped=len(problems) + len(unread))
    return report, frame


def print_real_table(report):
    print(f"\n{report['n_images']} real pages, input {report['image_size'][0]}x{report['image_size'][1]}, "
          f"scored over the {report['layout_scored']} windows")
    print(f"{'':18s}{'n':>4s}{'pearson':>9s}{'snr dB':>9s}")
    print(f"{'overall':18s}{report['n_images']:>4d}{fmt(report['pearson']):>9s}{fmt(report['snr_db'], 2):>9s}")
    for name, row in report['per_artefact'].items():
        print(f"{'artefact ' + name:18s}{row['n']:>4d}{fmt(row['pearson']):>9s}{fmt(row['snr_db'], 2):>9s}")
    for lead, row in report['per_lead'].items():
        print(f"{'lead ' + lead:18s}{'':>4s}{fmt(row['pearson']):>9s}{fmt(row['snr_db'], 2):>9s}")
    worst = report['worst_page']
    print(f"{report['pages_below_0db']} page(s) below 0 dB; worst {worst['image']} "
          f"{fmt(worst['snr_db'], 2)} dB (r {fmt(worst['pearson'])}); scale read from the page on "
          f"{100 * report['scale_found_share']:.0f} % of pages")


def fmt(value, digits=3):
    return 'nan' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def print_table(report):
    print(f"\n{report['n_images']} images, input {report['image_size'][0]}x{report['image_size'][1]}, "
          f"epoch {report['epoch']}")
    print(f"{'':14s}{'pearson':>9s}{'snr dB':>9s}{'bound r':>9s}{'bound dB':>9s}")
    print(f"{'overall':14s}{fmt(report['pearson']):>9s}{fmt(report['snr_db'], 2):>9s}"
          f"{fmt(report['bound_pearson']):>9s}{fmt(report['bound_snr_db'], 2):>9s}")
    for title, block in (('lead', report['per_lead']), ('fs', report['per_fs']), ('style', report['per_style']),
                         ('layout', report['per_layout'])):
        for name, row in block.items():
            print(f"{title + ' ' + name:14s}{fmt(row['pearson']):>9s}{fmt(row['snr_db'], 2):>9s}"
                  f"{fmt(row['bound_pearson']):>9s}{fmt(row['bound_snr_db'], 2):>9s}")
    print(f"{report['pages_below_0db']} page(s) below 0 dB; the worst {fmt(report['worst_snr_db'], 2)} dB")
    print(f"theta error {fmt(report['theta_error_deg'], 2)} deg (rotated pages {fmt(report['theta_error_deg_rotated'], 2)}), "
          f"0 mV line error {fmt(report['baseline_error_px'], 2)} px, seg Dice {fmt(report['seg_dice'])}")
    print(f"layout found on {100 * report['layout_found_share']:.0f} % of images "
          f"(among {', '.join(report['trained_layouts'])} and their Cabrera twins); time start held to the "
          f"pulses' end with weight {report['pulse_start_weight']:g} per column")
    print(f"scale read from the page on {100 * report['scale_found_share']:.0f} % of images, px per mV off by "
          f"{fmt(report['scale_error_pct'], 2)} % on average")
    per_gain = ', '.join(f'{gain} {100 * share:.0f} %' for gain, share in report['per_gain'].items())
    print(f"gain read from the calibration pulse on {100 * report['gain_found_share']:.0f} % of images ({per_gain}), "
          f"paper speed on {100 * report['speed_found_share']:.0f} %")


def strict_json(value):
    """NaN (a lead or group with nothing to score) -> null, so strict JSON readers accept the report."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_reports(report, frame, stem):
    stem = Path(stem)
    with open(stem.with_name(stem.name + '_eval.json'), 'w') as handle:
        json.dump(strict_json(report), handle, indent=2, allow_nan=False)
    frame.to_csv(stem.with_name(stem.name + '_eval.csv'), index=False)
    return stem.with_name(stem.name + '_eval.json'), stem.with_name(stem.name + '_eval.csv')


def main(argv=None):
    args = parse_args(argv)
    speed.set_threads(args.threads)
    if args.images:
        report, frame = evaluate_real_pages(args)
        print_real_table(report)
    else:
        report, frame = evaluate_checkpoint(args.checkpoint, args.sim_root, args.csv_root, args.max_samples,
                                            args.batch_size, args.num_workers, args.force_cpu, args.untrained)
        print_table(report)
    stem = args.output or str(Path(args.checkpoint).with_suffix('')) + ('_untrained' if args.untrained else '')
    json_path, csv_path = write_reports(report, frame, stem)
    print(f'reports: {json_path} {csv_path}')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
