"""Trainer speed on a shared CPU, side by side in one run: alone and beside one competing CPU-bound
process, for the old thread setting and the new default.

    python bench_threads.py                                  # 128 x 672, tu-regnetx_002, batch 4, 2 workers
    python bench_threads.py --competitor spin --seconds 20   # a pure-Python busy loop as the competitor
    python bench_threads.py --settings old auto one_thread one_thread_spin

Settings: `old` is what the trainer did before --threads (torch's default: a thread per core, OpenMP's
default wait policy, which spins); `auto` is the new default (--threads auto: a thread per core, with
OMP_WAIT_POLICY=PASSIVE); `one_thread` (PASSIVE) and `one_thread_spin` are the other remedy, fewer
threads. Each measurement is a fresh child process (OpenMP reads its wait policy once, when torch
loads) running the trainer's own train_one_epoch (its data loader with --cache and --num_workers,
model, loss, optimizer step) over a small simulator set, epoch after epoch for --seconds after one
warm-up step; img/s is the trainer's own figure.
Competitors: `torch` (a PyTorch conv loop at torch's default threads: a second training or test run),
`spin` (a pure-Python busy loop, one core), `numpy` (a numpy matmul loop). A competitor bounds its
own life and is always killed. Writes bench_out/bench_threads.json (--report).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import ecg_simulator
import production_trainer as pt
import speed

OLD_ENV = {}                                   # OpenMP's default wait policy (spins a while)
NEW_ENV = {'OMP_WAIT_POLICY': 'PASSIVE'}       # what the scripts set before torch loads
SETTINGS = {'old': (OLD_ENV, None), 'auto': (NEW_ENV, 'auto'),
            'one_thread': (NEW_ENV, '1'),        # what 'cores less the busy ones' picks beside one competitor
            'one_thread_spin': (OLD_ENV, '1')}
WAIT_VARIABLES = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')
COMPETITORS = {
    'torch': 'import torch, time, sys\nconv = torch.nn.Conv2d(16, 16, 3, padding=1)\n'
             'x = torch.randn(2, 16, 64, 336)\nend = time.time() + float(sys.argv[1])\nprint("ready", flush=True)\n'
             'with torch.no_grad():\n    while time.time() < end:\n        conv(x)\n',
    'spin': 'import time, sys\nend = time.time() + float(sys.argv[1])\nprint("ready", flush=True)\n'
            'while time.time() < end:\n    pass\n',
    'numpy': 'import numpy, time, sys\na = numpy.random.rand(256, 256)\nend = time.time() + float(sys.argv[1])\n'
             'print("ready", flush=True)\nwhile time.time() < end:\n    a @ a\n',
}
CHILD_SLACK_S = 90          # start-up, cache fill, warm-up and the last step, beyond --seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--settings', nargs='+', default=['old', 'auto'], choices=list(SETTINGS))
    p.add_argument('--competitor', default='torch', choices=list(COMPETITORS))
    p.add_argument('--seconds', type=float, default=12, help='timed training per measurement (after the warm-up)')
    p.add_argument('--encoder', default='tu-regnetx_002')
    p.add_argument('--image_size', type=int, nargs=2, default=[128, 672], metavar=('H', 'W'))
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--num_workers', type=int, default=2, help="the trainer's DataLoader workers (train.sh: 2 on CPU)")
    p.add_argument('--images', type=int, default=24,
                   help='training images (cached; an epoch is images / batch_size steps)')
    p.add_argument('--data', default='bench_out/sim_100dpi', help='simulator images, made once')
    p.add_argument('--report', type=Path, default=Path('bench_out/bench_threads.json'), help='the JSON report')
    p.add_argument('--child', help=argparse.SUPPRESS)   # internal: one measurement, --threads value or 'default'
    return p.parse_args(argv)


def ensure_images(folder, n):
    """A simulator set of at least n records at 100 dpi in folder, made once and reused."""
    folder = Path(folder)
    if not (folder / 'train.csv').is_file() or len((folder / 'train.csv').read_text().splitlines()) - 1 < n:
        ecg_simulator.generate(folder, n, seed=3, dpi_choices=(100,), workers=min(4, os.cpu_count() or 1))
    return folder


# ---------------------------------------------------------------- one measurement (child process)

def measure(args):
    """Train for --seconds after a warm-up epoch with the trainer's own code; prints one JSON line."""
    if args.child == 'default':
        threads, reason = torch.get_num_threads(), "torch's default"
    else:
        threads, reason = speed.set_threads(speed.threads_arg(args.child))
    config = pt.resolve_config(['--sim_root', str(args.data), '--csv_root', str(args.data), '--encoder', args.encoder,
                                '--image_size', *map(str, args.image_size), '--batch_size', str(args.batch_size),
                                '--num_workers', str(args.num_workers), '--max_samples', str(args.images),
                                '--val_fraction', '0', '--cache', '--epochs', '1000000', '--no-amp'])
    pt.log.disabled = True
    train, val = pt.build_datasets(config)
    device = torch.device('cpu')
    amp = speed.amp_choice(device, 'off')
    loader, _ = pt.build_loaders(train, val, config, 1, 0, device)
    training = pt.build_training(config, device, amp, 1, len(loader))
    criterion = pt.ecg_trainer.CompositeLoss()
    state = {'epoch': 0, 'global_step': 0, 'step_in_epoch': 0, 'bad_steps': 0}
    for seconds in (0, args.seconds):   # the first (one step) is the warm-up: allocation, kernel choice
        state['step_in_epoch'] = 0
        means = pt.train_one_epoch(training, batches_for(loader, seconds), criterion, None, state, config,
                                   {'signal': None}, rank=1)
    print(json.dumps({'images_per_s': means['images_per_s'], 'steps': state['global_step'] - 1, 'threads': threads,
                      'reason': reason}), flush=True)


def batches_for(loader, seconds):
    """The loader's batches, epoch after epoch (workers restart each epoch, as in the trainer), until
    `seconds` have passed; at least one."""
    end = time.perf_counter() + seconds
    while True:
        for batch in loader:
            yield batch
            if time.perf_counter() > end:
                return


# ---------------------------------------------------------------- driving (parent process)

def child_env(setting):
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(SETTINGS[setting][0])
    return env


def run_child(setting, args):
    threads = SETTINGS[setting][1] or 'default'
    command = [sys.executable, __file__, '--child', threads, '--seconds', str(args.seconds), '--encoder', args.encoder,
               '--image_size', *map(str, args.image_size), '--batch_size', str(args.batch_size),
               '--num_workers', str(args.num_workers), '--images', str(args.images), '--data', str(args.data)]
    result = subprocess.run(command, env=child_env(setting), capture_output=True, text=True,
                            timeout=args.seconds + CHILD_SLACK_S)
    if result.returncode != 0:
        raise RuntimeError(f'{setting} measurement failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_competitor(kind, seconds):
    """A CPU-bound process that ends itself after `seconds`; returns once it is running its loop."""
    process = subprocess.Popen([sys.executable, '-c', COMPETITORS[kind], str(seconds)], stdout=subprocess.PIPE,
                               text=True)
    process.stdout.readline()   # 'ready': imports done, the loop starts now
    return process


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure_all(args):
    """[{setting, condition, images_per_s, threads, reason}]: alone, then beside the competitor."""
    results = []
    for condition in ('alone', f'beside {args.competitor}'):
        for setting in args.settings:
            competitor = None
            if condition != 'alone':
                competitor = start_competitor(args.competitor, args.seconds + CHILD_SLACK_S)
            try:
                row = run_child(setting, args)
            finally:
                if competitor:
                    stop(competitor)
            row.update(setting=setting, condition=condition)
            print(f"{setting:11s} {condition:14s} {row['images_per_s']:6.2f} img/s   {row['reason']}", flush=True)
            results.append(row)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return measure(args)
    args.data = ensure_images(args.data, args.images)
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    results = measure_all(args)
    ratios = {}
    for setting in args.settings:
        alone, busy = (r['images_per_s'] for r in results if r['setting'] == setting)
        ratios[setting] = busy / alone
        print(f'{setting:11s} beside {args.competitor}: {100 * ratios[setting]:.0f} % of its speed alone')
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with open(args.report, 'w') as handle:
        json.dump({'cores': speed.usable_cores(), 'load_average_before': load_before, 'competitor': args.competitor,
                   'encoder': args.encoder, 'image_size': args.image_size, 'batch_size': args.batch_size,
                   'num_workers': args.num_workers, 'seconds': args.seconds, 'results': results,
                   'busy_over_alone': ratios}, handle, indent=2)


if __name__ == '__main__':
    main()
