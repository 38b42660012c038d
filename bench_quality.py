"""Digitization-quality benchmark: simulate, train within a fixed budget, evaluate on held-out images.

    python bench_quality.py                # the full run: about 30 min of training on a 2-core CPU
    python bench_quality.py --quick        # a one-minute check that the benchmark itself works

1. Simulates a training set (seed 100) and a held-out set (seed 200: other records, the full variety
   of styles, rotations, dpi and sampling rates) with ecg_simulator.py.
2. Trains with production_trainer.py (the toolkit's CPU settings, as train.sh picks them) until the
   time budget is spent.
3. Scores best.pth with evaluate.py on the held-out set and on the ecg-image-kit fixture images
   (../shared/fixtures/ecg-image-kit, made by no part of this toolkit).
4. Reports the round-trip bound (ground truth decoded through the same path) at several input sizes,
   so a GPU user sees what a larger input buys.
Prints a summary and writes bench_out/quality/report_{H}x{W}.json.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import ecg_checkpoint
import ecg_trainer
import evaluate
import production_trainer
import production_dataset as pdx

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT.parent / 'shared' / 'fixtures' / 'ecg-image-kit'
TRAIN_SEED, HELDOUT_SEED = 100, 200
SIZES = [(384, 504), (512, 672), (256, 1344), (512, 1344), (512, 2688)]
FULL = dict(train_records=480, heldout_records=60, budget_min=30.0, image_size=(128, 672),
            encoder='tu-regnetx_002', batch_size=4, lr=1e-3, epochs=20)   # 20 epochs fill 30 min at 5 img/s
QUICK = dict(train_records=12, heldout_records=4, budget_min=0.0, image_size=(64, 320),
             encoder='tu-regnetx_002', batch_size=4, lr=1e-3, epochs=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Digitization-quality benchmark on a CPU budget.')
    p.add_argument('--quick', action='store_true', help='tiny data, one epoch, small input: checks the benchmark runs')
    p.add_argument('--out', default='bench_out/quality', help='data, run and report folder')
    p.add_argument('--budget_min', type=float, help='training minutes (default 30; quick: one epoch)')
    p.add_argument('--train_records', type=int)
    p.add_argument('--image_size', type=int, nargs=2, metavar=('H', 'W'))
    p.add_argument('--encoder')
    p.add_argument('--epochs', type=int, help='epochs the schedule is laid out for (the budget may stop sooner)')
    p.add_argument('--lr', type=float)
    p.add_argument('--workers', type=int, default=2, help='simulator processes')
    p.add_argument('--run_dir', help='evaluate this finished run instead of training a new one')
    p.add_argument('--checkpoint', default='best', choices=['best', 'last'], help='which checkpoint to score')
    return p.parse_args(argv)


def settings(args):
    chosen = dict(QUICK if args.quick else FULL)
    for key in ('budget_min', 'train_records', 'image_size', 'encoder', 'epochs', 'lr'):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    chosen['image_size'] = list(chosen['image_size'])
    return chosen


def run(*command):
    """A project CLI, its output streamed; fails loudly."""
    print('$', ' '.join(map(str, command)), flush=True)
    subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True)


def simulate(folder, records, seed, workers, quick):
    if (folder / 'train.csv').is_file():
        return
    extra = ['--dpi_choices', '100'] if quick else []
    run('ecg_simulator.py', '--out', folder, '--n', records, '--seed', seed, '--workers', workers, *extra)


def train(data, out, cfg):
    run('production_trainer.py', '--sim_root', data, '--csv_root', data, '--output_dir', out,
        '--encoder', cfg['encoder'], '--image_size', *cfg['image_size'], '--batch_size', cfg['batch_size'],
        '--num_workers', 0, '--lr', cfg['lr'], '--epochs', cfg['epochs'], '--cache', '--val_fraction', 0.05,
        '--time_budget_min', cfg['budget_min'], '--save_every', 0)
    return sorted(Path(out).glob('run_*'))[-1]


def bound_at_sizes(data, sizes, max_samples):
    """Round-trip bound (SNR dB, Pearson) of the held-out images at each input size."""
    out = {}
    for size in sizes:
        dataset = pdx.ECGImageDataset(data, data, target_size=size, max_samples=max_samples)
        batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
        summary = ecg_trainer.summarize(ecg_trainer.record_stats(evaluate.round_trip(batch), batch['signal'],
                                                                 batch['signal_mask']))
        out[f'{size[0]}x{size[1]}'] = {'bound_snr_db': summary['snr_db'], 'bound_pearson': summary['pearson']}
    return out


def summary_lines(report):
    held, fixture = report['heldout'], report['fixture']
    lines = [f"held-out simulator ({held['n_images']} images): pearson {held['pearson']:.3f}  "
             f"SNR {held['snr_db']:.2f} dB  (bound {held['bound_snr_db']:.2f} dB, r {held['bound_pearson']:.3f})",
             f"  theta error {held['theta_error_deg']:.2f} deg (rotated {held['theta_error_deg_rotated']:.2f}), "
             f"seg Dice {held['seg_dice']:.3f}, 0 mV line error {held['baseline_error_px']:.2f} px",
             f"ecg-image-kit fixture ({fixture['n_images']} images): pearson {fixture['pearson']:.3f}  "
             f"SNR {fixture['snr_db']:.2f} dB  (bound {fixture['bound_snr_db']:.2f} dB); "
             f"theta error {fixture['theta_error_deg']:.2f} deg",
             f"training: {report['train_minutes']:.1f} min, {report['train_images_per_s']:.2f} images/s, "
             f"{report['epochs_done']} epochs; total wall {report['wall_minutes']:.1f} min",
             f"untrained model of the same architecture on the held-out set: pearson "
             f"{report['heldout_untrained']['pearson']:.3f}, SNR {report['heldout_untrained']['snr_db']:.2f} dB"]
    lines += [f"  bound at {size}: {v['bound_snr_db']:.2f} dB, r {v['bound_pearson']:.3f}"
              for size, v in report['bound_by_input_size'].items()]
    return lines


def main(argv=None):
    args = parse_args(argv)
    cfg = settings(args)
    out = Path(args.out)
    started = time.perf_counter()
    simulate(out / 'train_data', cfg['train_records'], TRAIN_SEED, args.workers, args.quick)
    simulate(out / 'heldout_data', cfg['heldout_records'], HELDOUT_SEED, args.workers, args.quick)
    train_start = time.perf_counter()
    run_dir = Path(args.run_dir) if args.run_dir else train(out / 'train_data', out / 'runs', cfg)
    train_minutes = (time.perf_counter() - train_start) / 60
    epochs = production_trainer.read_metrics(run_dir)
    speeds = [epoch['train']['images_per_s'] for epoch in epochs]
    if args.run_dir:   # the run's own metrics hold how long its epochs took
        train_minutes = sum(epoch['seconds'] for epoch in epochs) / 60
    best = run_dir / 'checkpoints' / f'{args.checkpoint}.pth'
    heldout, _ = evaluate.evaluate_checkpoint(best, out / 'heldout_data', out / 'heldout_data')
    fixture, _ = evaluate.evaluate_checkpoint(best, FIXTURE / 'images', FIXTURE / 'signals')
    untrained, _ = evaluate.evaluate_checkpoint(best, out / 'heldout_data', out / 'heldout_data', untrained=True)
    sizes = [tuple(cfg['image_size'])] if args.quick else sorted(set(SIZES) | {tuple(cfg['image_size'])})
    report = {'settings': cfg, 'run_dir': str(run_dir), 'heldout': heldout, 'fixture': fixture,
              'heldout_untrained': {k: untrained[k] for k in ('pearson', 'snr_db', 'theta_error_deg', 'seg_dice')},
              'train_minutes': train_minutes, 'train_images_per_s': sum(speeds) / max(1, len(speeds)),
              'epochs_done': ecg_checkpoint.load(best)['epoch'],
              'bound_by_input_size': bound_at_sizes(out / 'heldout_data', sizes, 8 if args.quick else 30),
              'wall_minutes': (time.perf_counter() - started) / 60}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f'report_{cfg["image_size"][0]}x{cfg["image_size"][1]}.json'
    with open(path, 'w') as handle:
        json.dump(evaluate.strict_json(report), handle, indent=2, allow_nan=False)
    print('\n'.join(summary_lines(report)))
    print(f'report: {path}')
    return report


if __name__ == '__main__':
    main()
