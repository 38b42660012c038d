"""Digitization-quality benchmark: simulate, train within a fixed budget, evaluate on held-out images.

    python bench_quality.py                # the full run: about 30 min of training on a 2-core CPU
    python bench_quality.py --quick        # a one-minute check that the benchmark itself works

1. Simulates a training set (seed 100) and a held-out set (seed 200: other records, the full variety
   of styles, rotations, dpi and sampling rates) with ecg_simulator.py.
2. Trains with production_trainer.py (the toolkit's CPU settings, as train.sh picks them) for the time
   budget: after each epoch the trainer lays its cosine schedule over the epochs the budget has room for,
   so the run ends annealed at the budget.
3. Scores best.pth with evaluate.py on the held-out set and on the ecg-image-kit fixture images
   (../shared/fixtures/ecg-image-kit, made by no part of this toolkit).
4. Reports the round-trip bound (ground truth decoded through the same path) at several input sizes,
   so a GPU user sees what a larger input buys.
5. With --kit_work (an ecg-image-kit workdir made by ../shared/tools/ecg-image-kit/setup.sh): renders
   held-out records with the real renderer in its seven styles and reports quality per style; with
   --kit_train_records N it also renders N training records in every style and trains on the mix.
6. A scaling curve: the run's epoch checkpoints scored at 15, 30, 60 and 120 min of training, as far as
   the budget reaches (table in the report, PNG plot beside it); --budget_min 120 gives all four.
7. With --export_starter: best.pth as the shipped fp16 starter weights (starter/) with its model card.
8. With --layouts NAME... (or --layouts mix: the layouts ecg-image-kit and clinics draw most): training
   and held-out pages in that mix of layouts (in their own folders, train_data_layouts/...), reported per
   layout with how often inference found the layout; --gains 5 10 20 and --speeds 25 50 draw them at those
   gains and paper speeds as well (folders and report suffixed _gains5-10-20_speeds25-50), reported with
   how often the pulse gave the gain and the speed. The layouts are also compared on equal footing: every
   held-out record is drawn again in each layout of the mix (heldout_data{suffix}_by_layout/NAME, the same
   signals on every layout), and each layout's SNR gap below the standard page's is reported with a 95 %
   interval from resampling the records, pairs kept together (a few pages per layout in the mixed set
   cannot resolve a 1.5 dB gap: 7 pages of 12x1 read 9.12 dB where the same weights read 10.11 on 60).
9. With --kit_work, real ECGs as well: the recordings of --real_csv (default ../shared/real/signals, never
   trained on) cut into 10 s windows (real_signals.py) and rendered by ecg-image-kit in its seven styles
   (random resolution and padding among them), scored per style beside each style's round-trip bound, with
   the pages below 0 dB; --findings_prob P trains on simulator records of which P show real-ECG findings.
Prints a summary and writes bench_out/quality/report_{H}x{W}.json.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import ecg_checkpoint
import ecg_decode
import ecg_trainer
import evaluate
import production_trainer
import production_dataset as pdx
import real_signals

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT.parent / 'shared' / 'fixtures' / 'ecg-image-kit'
KIT_TOOLS = ROOT.parent / 'shared' / 'tools' / 'ecg-image-kit'
REAL_SIGNALS = ROOT.parent / 'shared' / 'real' / 'signals'
CURVE_MINUTES = (15, 30, 60, 120)
TRAIN_SEED, HELDOUT_SEED = 100, 200
LAYOUT_MIX = ('3x4+II', '3x4', '3x4+V1', '3x4+II+V1+V5', '6x2+II', '12x1')
SIMULATED = 'bench_simulated.json'   # in each data folder: the simulator arguments that made it
BOOTSTRAP_DRAWS = 2000   # resamples of the held-out records for a layout gap's 95 % interval
SIZES = [(384, 504), (512, 672), (256, 1344), (512, 1344), (512, 2688)]
# epochs is the most: the trainer lays its schedule over the epochs the budget has room for (20 at 7.5 img/s);
# the peak held until the last 20 % of them, and a peak of 3e-3 (over 1e-3 and 2e-3), each read better at 30 min
# (README's table)
FULL = dict(train_records=480, heldout_records=60, budget_min=30.0, image_size=(128, 672),
            encoder='tu-regnetx_002', batch_size=4, lr=3e-3, epochs=20, decay_fraction=0.2)
QUICK = dict(train_records=8, heldout_records=4, budget_min=0.0, image_size=(64, 320),
             encoder='tu-regnetx_002', batch_size=4, lr=1e-3, epochs=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Digitization-quality benchmark on a CPU budget.')
    p.add_argument('--quick', action='store_true', help='tiny data, one epoch, small input: checks the benchmark runs')
    p.add_argument('--out', default='bench_out/quality', help='data, run and report folder')
    p.add_argument('--budget_min', type=float, help='training minutes (default 30; quick: one epoch)')
    p.add_argument('--train_records', type=int)
    p.add_argument('--image_size', type=int, nargs=2, metavar=('H', 'W'))
    p.add_argument('--encoder')
    p.add_argument('--epochs', type=int,
                   help='the most epochs; the trainer lays its schedule over those the budget has room for')
    p.add_argument('--lr', type=float)
    p.add_argument('--decay_fraction', type=float, help="the trainer's --decay_fraction")
    p.add_argument('--ema_decay', type=float, help="the trainer's --ema_decay (a moving average of the weights)")
    p.add_argument('--workers', type=int, default=2, help='simulator processes')
    p.add_argument('--run_dir', help='evaluate this finished run instead of training a new one')
    p.add_argument('--checkpoint', default='best', choices=['best', 'last'], help='which checkpoint to score')
    p.add_argument('--kit_work', help='ecg-image-kit workdir (setup.sh): also score real-renderer pages per style')
    p.add_argument('--kit_records', type=int, default=10, help='held-out records rendered by ecg-image-kit (x7 styles)')
    p.add_argument('--real_csv', default=str(REAL_SIGNALS),
                   help='real 12-lead recordings (Kaggle layout) never trained on: with --kit_work, cut into 10 s '
                        'windows (real_signals.py), rendered by ecg-image-kit in its 7 styles and scored per style '
                        'beside the round-trip bound; "none" to skip')
    p.add_argument('--kit_train_records', type=int, default=0,
                   help='training records also rendered by ecg-image-kit in all 7 styles and trained on')
    p.add_argument('--layouts', nargs='+', metavar='NAME',
                   help='train and hold out pages in these layouts (ecg_page.LAYOUTS names), or mix: '
                        + ' '.join(LAYOUT_MIX))
    p.add_argument('--gains', type=float, nargs='+', metavar='MM_PER_MV',
                   help='gains the training and held-out pages are drawn at (simulator --gains), e.g. 5 10 20')
    p.add_argument('--speeds', type=float, nargs='+', metavar='MM_PER_S',
                   help='paper speeds likewise (simulator --speeds): 25 50 adds the layouts\' 5 s twins')
    p.add_argument('--findings_prob', type=float, default=0.0,
                   help='share of training records with real-ECG findings (ecg_simulator.py --findings_prob); the '
                        'held-out simulator set stays healthy, so its numbers compare across runs')
    p.add_argument('--omp_wait_policy', choices=['ACTIVE', 'PASSIVE'], default='ACTIVE',
                   help='OpenMP wait of the training run: the benchmark runs alone (its numbers are a budget of CPU '
                        'time), and alone the spinning wait trains faster than the sleeping one the trainer keeps '
                        'for shared machines')
    p.add_argument('--photo_aug', type=float, default=0.0, help="the trainer's --photo_aug (photo-like images)")
    p.add_argument('--init_from', help='start from these weights (e.g. starter/ecg_starter.pth) instead of scratch')
    p.add_argument('--export_starter', action='store_true',
                   help=f'write best.pth as the shipped starter weights ({ecg_checkpoint.STARTER.relative_to(ROOT)})')
    return p.parse_args(argv)


def settings(args):
    chosen = dict(QUICK if args.quick else FULL)
    for key in ('budget_min', 'train_records', 'image_size', 'encoder', 'epochs', 'lr', 'decay_fraction', 'ema_decay',
                'photo_aug'):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    chosen['image_size'] = list(chosen['image_size'])
    return chosen


def run(*command, env=None):
    """A project CLI, its output streamed, with `env` added to the environment; fails loudly."""
    print('$', ' '.join(f'{k}={v}' for k, v in (env or {}).items()), *map(str, command), flush=True)
    subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True, env={**os.environ, **(env or {})})


@dataclass(frozen=True)
class PageMix:
    """What the simulator draws for a data folder: quick pages (100 dpi), layouts, gains, speeds (None: the
    simulator's defaults), and the share of records with real-ECG findings."""
    quick: bool = False
    layouts: tuple = None
    gains: tuple = None
    speeds: tuple = None
    findings_prob: float = 0.0

    def arguments(self, csv_root=None):
        """ecg_simulator.py's arguments for this mix (of csv_root's signals if given), in the order the
        folders' SIMULATED files hold them."""
        extra = ['--dpi_choices', '100'] if self.quick else []
        extra += ['--findings_prob', self.findings_prob] if self.findings_prob else []
        extra += ['--csv_root', csv_root] if csv_root else []
        extra += ['--layouts', *self.layouts] if self.layouts else []
        extra += ['--gains', *self.gains] if self.gains else []
        extra += ['--speeds', *self.speeds] if self.speeds else []
        return extra

    def suffix(self):
        """The data folders' and report's name suffix: each page mix has its own (findings aside: the
        held-out data is the same whatever share the training data has)."""
        return (('_layouts' if self.layouts else '') +
                (f'_gains{"-".join(f"{g:g}" for g in self.gains)}' if self.gains else '') +
                (f'_speeds{"-".join(f"{v:g}" for v in self.speeds)}' if self.speeds else ''))


def simulate(folder, records, seed, workers, mix, csv_root=None):
    """Simulator pages of `mix` in folder, made once (of csv_root's signals if given): a folder made with other
    arguments (another layout mix under the same name) is made again."""
    arguments = [str(v) for v in ('--n', records, '--seed', seed, *mix.arguments(csv_root))]
    made_with = folder / SIMULATED
    if folder.exists():
        if made_with.is_file() and json.loads(made_with.read_text()) == arguments:
            return
        print(f'{folder}: not made with {arguments}: simulating it again', flush=True)
        shutil.rmtree(folder)
    run('ecg_simulator.py', '--out', folder, '--workers', workers, *arguments)
    made_with.write_text(json.dumps(arguments))


def train(data, out, cfg, init_from=None, wait_policy='ACTIVE'):
    keep_epochs = 1 if cfg['budget_min'] >= CURVE_MINUTES[1] else 0   # the scaling curve scores them
    start = ['--init_from', init_from] if init_from else []
    run('production_trainer.py', '--sim_root', data, '--csv_root', data, '--output_dir', out, *start,
        '--encoder', cfg['encoder'], '--image_size', *cfg['image_size'], '--batch_size', cfg['batch_size'],
        '--num_workers', 0, '--lr', cfg['lr'], '--epochs', cfg['epochs'], '--cache', '--val_fraction', 0.05,
        '--time_budget_min', cfg['budget_min'], '--save_every', keep_epochs,
        *(['--decay_fraction', cfg['decay_fraction']] if cfg.get('decay_fraction') is not None else []),
        *(['--ema_decay', cfg['ema_decay']] if cfg.get('ema_decay') else []),
        *(['--photo_aug', cfg['photo_aug']] if cfg.get('photo_aug') else []),
        env={'OMP_WAIT_POLICY': wait_policy})
    return sorted(Path(out).glob('run_*'))[-1]


# ---------------------------------------------------------------- layouts on equal footing

def standard_of(layouts):
    """The layout the others are compared with: the standard page if in the mix, else the first."""
    return ecg_decode.LAYOUT.name if ecg_decode.LAYOUT.name in layouts else layouts[0]


def layout_folders(heldout_data, records, workers, mix):
    """{layout: folder}: the held-out records drawn again in each layout of the mix alone (their own signals,
    at the same gains and speeds), so that every layout is read on the same signals."""
    root = heldout_data.with_name(heldout_data.name + '_by_layout')
    folders = {name: root / name.replace('/', '-') for name in mix.layouts}
    for name, folder in folders.items():
        simulate(folder, records, HELDOUT_SEED, workers, replace(mix, layouts=(name,)),
                 csv_root=heldout_data)
    return folders


def paired_gap(standard, other, draws=BOOTSTRAP_DRAWS, seed=0):
    """SNR of `other` below `standard` on the same records (evaluate's per-image frames: record_id, snr_db)
    -> (gap dB, (low, high) 95 % interval): the score is the dB of the mean ratio, so the records are
    resampled with their pairs kept together and the gap taken of each resample's two mean ratios."""
    both = standard.merge(other, on='record_id', suffixes=('_standard', '_other'))
    ratios = 10 ** (both[['snr_db_standard', 'snr_db_other']].to_numpy() / 10)             # (N, 2)
    picks = np.random.default_rng(seed).integers(0, len(both), (draws, len(both)))

    def gap_db(mean_ratios):                                                              # (..., 2) -> (...)
        return 10 * np.log10(mean_ratios[..., 0] / mean_ratios[..., 1])
    gaps = gap_db(ratios[picks].mean(1))
    return float(gap_db(ratios.mean(0))), (float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5)))


def compare_layouts(best, folders):
    """Each layout's held-out score on the same records, and its gap below the standard page's."""
    scored = {name: evaluate.evaluate_checkpoint(best, folder, folder) for name, folder in folders.items()}
    standard = standard_of(list(folders))
    rows = {}
    for name, (report, frame) in scored.items():
        gap, interval = paired_gap(scored[standard][1], frame)
        rows[name] = {'n': report['n_images'], 'pearson': report['pearson'], 'snr_db': report['snr_db'],
                      'bound_snr_db': report['bound_snr_db'], 'gap_db': gap, 'gap_ci95': list(interval),
                      'layout_found_share': report['layout_found_share']}
    return {'standard': standard, 'per_layout': rows}


# ---------------------------------------------------------------- the real renderer

def render_kit(work, csv_root, out, records):
    """ecg-image-kit pages of the first `records` records of csv_root, in its seven styles (render.sh)."""
    if (out / 'train.csv').is_file():
        return
    print(f'$ render.sh {work} {csv_root} {out} {records}', flush=True)
    subprocess.run(['bash', str(KIT_TOOLS / 'render.sh'), str(work), str(csv_root), str(out), str(records)],
                   check=True)


def render_real(work, real_csv, out):
    """ecg-image-kit pages (7 styles) of every 10 s window of the real recordings in real_csv -> the folder."""
    pages = out / 'kit_real'
    if not (pages / 'train.csv').is_file():
        windows, _ = real_signals.cut_windows(real_csv, out / 'real_windows')
        real_signals.write_index(windows, out / 'real_windows')
        render_kit(work, out / 'real_windows', pages, 0)
    return pages


def real_report(best, pages):
    """evaluate's report on the real-signal pages, with each style's gap below its round-trip bound."""
    report, frame = evaluate.evaluate_checkpoint(best, pages, pages)
    report['gap_db'] = report['bound_snr_db'] - report['snr_db']
    for row in report['per_style'].values():
        row['gap_db'] = row['bound_snr_db'] - row['snr_db']
    report['worst_pages'] = frame.nsmallest(5, 'snr_db')[['record_id', 'style', 'snr_db', 'pearson']].to_dict('records')
    return report


def mix_kit_into(train_data, kit_pages):
    """Copy rendered pages beside the simulator's, numbered after them ({id}-{k + 10}), so one data folder
    holds both and the trainer's record split keeps each record's pages together."""
    for png in sorted(kit_pages.glob('*/*.png')):
        record, k = png.stem.rsplit('-', 1)
        for suffix in ('.png', '.json'):
            target = train_data / record / f'{record}-{int(k) + 10:04d}{suffix}'
            if not target.exists():
                shutil.copyfile(png.with_suffix(suffix), target)


# ---------------------------------------------------------------- the scaling curve

def curve_checkpoints(run_dir, budget_min):
    """{minutes: epoch_N.pth} for each curve mark within the budget: the last epoch done by then."""
    elapsed, marks = 0.0, {}
    for epoch in production_trainer.read_metrics(run_dir):
        elapsed += epoch['seconds'] / 60
        for minutes in CURVE_MINUTES:
            if minutes <= budget_min and elapsed <= minutes * 1.02:
                marks[minutes] = run_dir / 'checkpoints' / f'epoch_{epoch["epoch"]}.pth'
    return {m: path for m, path in sorted(marks.items()) if path.is_file()}


def scaling_curve(run_dir, budget_min, heldout, kit):
    """Score the epoch checkpoints at 15/30/60/120 min; the rest of the epoch files are removed."""
    rows = []
    for minutes, checkpoint in curve_checkpoints(run_dir, budget_min).items():
        row = {'minutes': minutes, 'epoch': ecg_checkpoint.load(checkpoint)['epoch']}
        for name, data in (('heldout', heldout), ('kit', kit)):
            if data is not None:
                report, _ = evaluate.evaluate_checkpoint(checkpoint, data, data)
                row.update({f'{name}_{k}': report[k] for k in ('pearson', 'snr_db', 'bound_snr_db')})
        rows.append(row)
    kept = {str(p) for p in curve_checkpoints(run_dir, budget_min).values()}
    for path in (run_dir / 'checkpoints').glob('epoch_*.pth'):
        if str(path) not in kept:
            path.unlink()
    return rows


def plot_curve(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in ('heldout', 'kit'):
        if f'{name}_snr_db' in rows[0]:
            ax.plot([r['minutes'] for r in rows], [r[f'{name}_snr_db'] for r in rows], 'o-', label=f'{name} SNR')
            ax.axhline(rows[-1][f'{name}_bound_snr_db'], ls='--', lw=0.8, color=ax.lines[-1].get_color(),
                       label=f'{name} bound')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('training minutes (2-core CPU)')
    ax.set_ylabel('SNR dB')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.savefig(path, bbox_inches='tight')
    plt.close(figure)


# ---------------------------------------------------------------- the starter weights

def export_starter(best, report, command):
    """fp16 weights of best.pth to starter/, with a model card: how they were made and what they read."""
    ecg_checkpoint.STARTER.parent.mkdir(exist_ok=True)
    ecg_checkpoint.save_weights_only(ecg_checkpoint.load(best), ecg_checkpoint.STARTER)
    digest = hashlib.sha256(ecg_checkpoint.STARTER.read_bytes()).hexdigest()
    held, fixture = report['heldout'], report['fixture']
    lines = [f'# Starter weights: {ecg_checkpoint.STARTER.name}', '',
             f'- sha256: `{digest}`', f'- size: {ecg_checkpoint.STARTER.stat().st_size / 2 ** 20:.1f} MiB (fp16 weights only)',
             f'- made by: `{command}` (this repository, 2-core CPU, '
             f'{report["train_minutes"]:.0f} min of training, {report["epochs_done"]} epochs, '
             f'these weights from epoch {report.get("best_epoch", report["epochs_done"])})',
             f'- model: {report["settings"]["encoder"]} U-Net, input {report["settings"]["image_size"][0]}x'
             f'{report["settings"]["image_size"][1]}, standard 3x4 + II layout',
             f'- trained on: {report["training_data"]}',
             '', '| held-out set | images | Pearson | SNR dB | round-trip bound dB |', '| --- | --- | --- | --- | --- |',
             f'| simulator (seed {HELDOUT_SEED}) | {held["n_images"]} | {held["pearson"]:.3f} | {held["snr_db"]:.2f} | '
             f'{held["bound_snr_db"]:.2f} |',
             f'| ecg-image-kit fixture | {fixture["n_images"]} | {fixture["pearson"]:.3f} | {fixture["snr_db"]:.2f} | '
             f'{fixture["bound_snr_db"]:.2f} |']
    if report.get('kit'):
        kit = report['kit']
        lines.append(f'| ecg-image-kit renders, 7 styles | {kit["n_images"]} | {kit["pearson"]:.3f} | '
                     f'{kit["snr_db"]:.2f} | {kit["bound_snr_db"]:.2f} |')
    lines += ['', 'Use: `inference.py` and `visualize.py` load these when no `--checkpoint` is given; '
              '`production_trainer.py --init_from starter/ecg_starter.pth --encoder tu-regnetx_002` fine-tunes them.']
    (ecg_checkpoint.STARTER.parent / 'MODEL_CARD.md').write_text('\n'.join(lines) + '\n')
    return digest


def bound_at_sizes(data, sizes, max_samples):
    """Round-trip bound (SNR dB, Pearson) of the held-out images at each input size."""
    out = {}
    for size in sizes:
        dataset = pdx.ECGImageDataset.from_folders(data, data, target_size=size, max_samples=max_samples)
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
    if len(held['per_layout']) > 1:
        lines.append(f"  layout found on {100 * held['layout_found_share']:.1f} % of held-out pages; gain read from "
                     f"the pulse on {100 * held['gain_found_share']:.1f} %, paper speed on "
                     f"{100 * held['speed_found_share']:.1f} %")
        lines += [f"  layout {name}: pearson {v['pearson']:.3f}  SNR {v['snr_db']:.2f} dB  (bound {v['bound_snr_db']:.2f})"
                  for name, v in held['per_layout'].items()]
    if report.get('paired_layouts'):
        paired = report['paired_layouts']
        lines.append(f"  the same held-out records drawn in each layout, gap below {paired['standard']} (95 % interval):")
        lines += [f"    {name}: pearson {v['pearson']:.3f}  SNR {v['snr_db']:.2f} dB  gap {v['gap_db']:+.2f} dB "
                  f"[{v['gap_ci95'][0]:+.2f}, {v['gap_ci95'][1]:+.2f}]  layout found {100 * v['layout_found_share']:.0f} %"
                  for name, v in paired['per_layout'].items()]
    if report.get('real'):
        real = report['real']
        lines.append(f"real ECGs rendered by ecg-image-kit ({real['n_images']} pages): pearson {real['pearson']:.3f}  "
                     f"SNR {real['snr_db']:.2f} dB  (bound {real['bound_snr_db']:.2f} dB, {real['gap_db']:.2f} below); "
                     f"{real['pages_below_0db']} pages below 0 dB, worst {real['worst_snr_db']:.2f} dB")
        lines += [f"  style {name}: pearson {v['pearson']:.3f}  SNR {v['snr_db']:.2f} dB  (bound {v['bound_snr_db']:.2f}, "
                  f"{v['gap_db']:.2f} below)" for name, v in real['per_style'].items()]
    if report.get('kit'):
        kit = report['kit']
        lines.append(f"ecg-image-kit renders ({kit['n_images']} images): pearson {kit['pearson']:.3f}  "
                     f"SNR {kit['snr_db']:.2f} dB  (bound {kit['bound_snr_db']:.2f} dB)")
        lines += [f"  style {name}: pearson {v['pearson']:.3f}  SNR {v['snr_db']:.2f} dB  (bound {v['bound_snr_db']:.2f})"
                  for name, v in kit['per_style'].items()]
    for row in report.get('scaling_curve', []):
        lines.append(f"  after {row['minutes']} min (epoch {row['epoch']}): held-out SNR {row['heldout_snr_db']:.2f} dB, "
                     f"pearson {row['heldout_pearson']:.3f}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    cfg = settings(args)
    out = Path(args.out)
    started = time.perf_counter()
    layouts = list(LAYOUT_MIX) if args.layouts == ['mix'] else args.layouts
    train_mix = PageMix(args.quick, tuple(layouts) if layouts else None, tuple(args.gains) if args.gains else None,
                        tuple(args.speeds) if args.speeds else None, args.findings_prob)
    heldout_mix = replace(train_mix, findings_prob=0.0)
    suffix = train_mix.suffix()
    findings = f'_findings{round(100 * args.findings_prob)}pct' if args.findings_prob else ''   # no '.': a suffix
    train_data, heldout_data = out / f'train_data{suffix}{findings}', out / f'heldout_data{suffix}'
    simulate(train_data, cfg['train_records'], TRAIN_SEED, args.workers, train_mix)
    simulate(heldout_data, cfg['heldout_records'], HELDOUT_SEED, args.workers, heldout_mix)
    kit = None
    if args.kit_work:
        kit = out / f'kit_heldout{suffix}'
        render_kit(args.kit_work, heldout_data, kit, args.kit_records)
        if args.kit_train_records:
            render_kit(args.kit_work, train_data, out / f'kit_train{suffix}', args.kit_train_records)
            mix_kit_into(train_data, out / f'kit_train{suffix}')
    train_start = time.perf_counter()
    run_dir = Path(args.run_dir) if args.run_dir else train(train_data, out / 'runs', cfg, args.init_from,
                                                                     args.omp_wait_policy)
    train_minutes = (time.perf_counter() - train_start) / 60
    epochs = production_trainer.read_metrics(run_dir)
    speeds = [epoch['train']['images_per_s'] for epoch in epochs]
    if args.run_dir:   # the run's own metrics hold how long its epochs took
        train_minutes = sum(epoch['seconds'] for epoch in epochs) / 60
    best = run_dir / 'checkpoints' / f'{args.checkpoint}.pth'
    heldout, _ = evaluate.evaluate_checkpoint(best, heldout_data, heldout_data)
    fixture, _ = evaluate.evaluate_checkpoint(best, FIXTURE / 'images', FIXTURE / 'signals')
    untrained, _ = evaluate.evaluate_checkpoint(best, heldout_data, heldout_data, untrained=True)
    sizes = [tuple(cfg['image_size'])] if args.quick else sorted(set(SIZES) | {tuple(cfg['image_size'])})
    report = {'settings': {**cfg, 'omp_wait_policy': None if args.run_dir else args.omp_wait_policy},
              'run_dir': str(run_dir), 'heldout': heldout, 'fixture': fixture,
              'heldout_untrained': {k: untrained[k] for k in ('pearson', 'snr_db', 'theta_error_deg', 'seg_dice')},
              'train_minutes': train_minutes, 'train_images_per_s': sum(speeds) / max(1, len(speeds)),
              'epochs_done': len(epochs), 'best_epoch': ecg_checkpoint.load(best)['epoch'],
              'bound_by_input_size': bound_at_sizes(heldout_data, sizes, 8 if args.quick else 30)}
    if kit is not None:
        report['kit'], _ = evaluate.evaluate_checkpoint(best, kit, kit)
    if args.kit_work and args.real_csv != 'none':
        report['real'] = real_report(best, render_real(args.kit_work, args.real_csv, out))
    if layouts and len(layouts) > 1:
        report['paired_layouts'] = compare_layouts(best, layout_folders(
            heldout_data, cfg['heldout_records'], args.workers, heldout_mix))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'report_{cfg["image_size"][0]}x{cfg["image_size"][1]}{suffix}{findings}'
    if cfg['budget_min'] >= CURVE_MINUTES[1] and list((run_dir / 'checkpoints').glob('epoch_*.pth')):
        report['scaling_curve'] = scaling_curve(run_dir, cfg['budget_min'], heldout_data, kit)
        plot_curve(report['scaling_curve'], stem.with_name(stem.name + '_curve.png'))
    report['training_data'] = (f'{cfg["train_records"]} simulator records (seed {TRAIN_SEED})' +
                               (f', {args.findings_prob:g} of them with real-ECG findings' if findings else '') +
                               (f' in layouts {", ".join(layouts)}' if layouts else '') +
                               (f' at gains {args.gains} mm/mV' if args.gains else '') +
                               (f' and paper speeds {args.speeds} mm/s' if args.speeds else '') +
                               (f', starting from {args.init_from}' if args.init_from else '') +
                               (f' + {args.kit_train_records} of them rendered by ecg-image-kit in its 7 styles'
                                if args.kit_train_records else '') +
                               (f'; {cfg["photo_aug"]:g} of the images made photo-like (--photo_aug)'
                                if cfg.get('photo_aug') else ''))
    if args.export_starter:
        report['starter_sha256'] = export_starter(best, report, 'python bench_quality.py ' + ' '.join(argv or sys.argv[1:]))
    report['wall_minutes'] = (time.perf_counter() - started) / 60
    with open(stem.with_suffix('.json'), 'w') as handle:
        json.dump(evaluate.strict_json(report), handle, indent=2, allow_nan=False)
    print('\n'.join(summary_lines(report)))
    print(f'report: {stem.with_suffix(".json")}')
    return report


if __name__ == '__main__':
    main()
