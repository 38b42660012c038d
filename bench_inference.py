"""Inference speed on a folder of pages, side by side in one run: the old path (one image at a time, as
inference.py ran before) against the new one (batched, reading and writing beside the model), and the
network in onnxruntime where the optional extras are installed.

    python bench_inference.py                          # 64 simulator pages at 100 dpi, 128 x 672, tu-regnetx_002
    python bench_inference.py --batch_size 8 --settings old new
    python bench_inference.py --checkpoint best.pth    # a trained model (speed does not depend on the weights)

Without --checkpoint it writes a randomly initialised model of the CPU setting as a weights-only checkpoint. Each setting runs in a fresh child process (OpenMP reads its wait policy once, when torch loads)
through inference.py's own functions, from the first image read to the last CSV written:
    old     the old settings through today's inference.digitize: torch's default threads and OpenMP wait
            policy, batch 1, the per-image rotation search (ecg_decode.estimate_theta), pandas' CSV writer,
            no folded batch norms, NCHW (reading and writing still overlap the model, as they do now)
    old_b4  the same at batch 4 (the old inference.py's default --batch_size)
    new     what inference.py does now: OMP_WAIT_POLICY=PASSIVE, --threads auto, --batch_size,
            estimate_theta_batch, batch norms folded, channels_last, freed memory kept for the next page
    onnx    new, with the network in onnxruntime (export_onnx.py)
Reports images/s, CPU seconds per image (all threads: on a busy machine the part that cannot overlap),
peak RSS of the process (and torch's peak on CUDA), and each setting's largest difference from the old
CSVs in mV. The simulator pages are made once into bench_out/. Writes bench_out/bench_inference.json (--report).

    python bench_inference.py --pages DIR --against 90f7f85

also times the whole inference.py command of an earlier commit (its own files, from `git archive`, with a
random model of its own making) against today's, in turn, on the same pages; each on all pages and on one,
so that img/s = (n - 1) / (seconds for n - seconds for 1) leaves out start-up and model loading. 90f7f85 is
inference.py as it was when the speed issue was filed (one image at a time, rotation search per image).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ecg_checkpoint
import ecg_decode
import ecg_heads
import ecg_model
import ecg_simulator
import export_onnx
import inference
import page_image
import page_reader
import speed
from ecg_page import LEADS

PASSIVE = {'OMP_WAIT_POLICY': 'PASSIVE'}    # what inference.py sets before torch loads
SETTINGS = {'old': ({}, 1), 'old_b4': ({}, 4), 'new': (PASSIVE, None), 'onnx': (PASSIVE, None)}   # env, batch
WAIT_VARIABLES = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')
CHILD_TIMEOUT_S = 900
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--settings', nargs='+', default=None, choices=list(SETTINGS),
                   help='default: old, old_b4, new, and onnx where onnxruntime is installed')
    p.add_argument('--checkpoint', type=Path, help='default: a random model of --encoder at --image_size')
    p.add_argument('--encoder', default='tu-regnetx_002')
    p.add_argument('--image_size', type=int, nargs=2, default=[128, 672], metavar=('H', 'W'))
    p.add_argument('--batch_size', type=int, default=4, help='batch of the new path (the old one: 1)')
    p.add_argument('--n', type=int, default=64, help='pages in the folder')
    p.add_argument('--data', type=Path, default=Path('bench_out/sim_100dpi'), help='simulator pages, made once')
    p.add_argument('--pages', type=Path, help='time this folder of page images instead (for example ecg-image-kit '
                                             'renders at 200 dpi, 2200 x 1700 px: reading them costs more)')
    p.add_argument('--out', type=Path, default=Path('bench_out/inference'), help='CSVs, model files')
    p.add_argument('--report', type=Path, default=Path('bench_out/bench_inference.json'), help='the JSON report')
    p.add_argument('--against', metavar='COMMIT', help='also time the whole inference.py command of this commit '
                                                       'against today\'s (needs the git history)')
    p.add_argument('--child', help=argparse.SUPPRESS)   # internal: run one setting
    return p.parse_args(argv)


def ensure_pages(folder, n):
    """n simulator pages at 100 dpi (1100 x 850 px), made once; -> the first n PNG paths."""
    if not (folder / 'train.csv').is_file() or len((folder / 'train.csv').read_text().splitlines()) - 1 < n:
        ecg_simulator.generate(folder, n, seed=3, dpi_choices=(100,), workers=min(4, os.cpu_count() or 1))
    return sorted(folder.glob('*/*.png'))[:n]


def random_checkpoint(path, encoder, size_hw):
    """A freshly initialised model as a weights-only checkpoint (speed does not depend on the weights)."""
    torch.manual_seed(0)
    model = ecg_model.build_model(encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    ecg_checkpoint.save(path, {'format': ecg_checkpoint.FORMAT, 'model': model.state_dict(),
                               'head_channels': dict(ecg_heads.HEAD_CHANNELS),
                               'model_args': model.model_args, 'image_size': list(size_hw),
                               'config': {'image_size': list(size_hw), 'encoder': encoder}})
    return path


# ---------------------------------------------------------------- one setting (child process)

def pandas_csv(signal, path):
    """inference.write_csv as it was: pandas' writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(signal.T, columns=LEADS).to_csv(path, index=False, float_format='%.3f')


def use_old_path():
    """Put back what inference.py used before: the per-image rotation search, pandas' CSV writer, one
    page read at a time."""
    ecg_decode.estimate_theta_batch = ecg_decode.estimate_theta
    page_reader.READERS = 1
    inference.write_csv = pandas_csv


def bench_images(args):
    """The pages timed: the first --n of --pages (every kind inference.py reads: photos, scans, PDFs), else the
    simulator's."""
    if not args.pages:
        return ensure_pages(args.data, args.n)
    return sorted(path for path in args.pages.rglob('*') if path.suffix.lower() in page_image.IMAGE_SUFFIXES)[:args.n]


def without_wait_variables():
    """This environment less the OpenMP wait settings, which each timed process chooses for itself."""
    return {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}


def run_setting(args):
    """Digitize the folder with one setting; prints one JSON line of numbers."""
    images = bench_images(args)
    out = args.out / args.child
    shutil.rmtree(out, ignore_errors=True)     # CSVs of an earlier run's pages would be compared too
    device = torch.device('cpu')
    batch_size = SETTINGS[args.child][1] or args.batch_size
    onnx = args.out / 'model.onnx' if args.child == 'onnx' else None
    run_args = argparse.Namespace(fs=inference.MODEL_FS, wfdb=False, batch_size=batch_size, gain=None,
                                  paper_speed=None, checkpoint=args.checkpoint, onnx=onnx)
    if args.child.startswith('old'):
        use_old_path()
        threads = torch.get_num_threads()
        model, size_hw = page_reader.load_checkpoint(args.checkpoint, device)
        reader = page_reader.Reader(model, size_hw, device, page_reader.auto_layouts(model), model.trained_layouts)
    else:
        threads, _ = speed.set_threads('auto')
        speed.keep_freed_memory()
        reader = page_reader.open_reader(args.checkpoint, device, threads, onnx)
    inference.tqdm.write = lambda *a, **k: None   # no line per image
    csv_paths = [out / f'{image.stem}.csv' for image in images]
    cpu, start = time.process_time(), time.perf_counter()
    problems = inference.digitize(reader, [page_image.ImagePage(image) for image in images], csv_paths, run_args)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({'images': len(images) - len(problems), 'images_per_s': len(images) / seconds,
                      'cpu_s_per_image': cpu / len(images), 'batch_size': run_args.batch_size, 'threads': threads,
                      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'torch_peak_mib': torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available()
                      else None}), flush=True)


# ---------------------------------------------------------------- driving (parent process)

def run_child(setting, args):
    env = {**without_wait_variables(), **SETTINGS[setting][0]}
    command = [sys.executable, __file__, '--child', setting, '--checkpoint', str(args.checkpoint), '--n', str(args.n),
               '--batch_size', str(args.batch_size), '--data', str(args.data), '--out', str(args.out)]
    command += ['--pages', str(args.pages)] if args.pages else []
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f'{setting} failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_difference(out, setting):
    """Largest |setting - old| over every CSV value in mV; NaN where the two disagree on what is shown."""
    worst = 0.0
    for old_csv in sorted((out / 'old').glob('*.csv')):
        old = pd.read_csv(old_csv).to_numpy()
        new = pd.read_csv(out / setting / old_csv.name).to_numpy()
        if (np.isnan(old) != np.isnan(new)).any():
            return float('nan')
        worst = max(worst, float(np.nanmax(np.abs(new - old))))
    return worst


# ---------------------------------------------------------------- the whole command of another commit

OLD_CHECKPOINT = """
import sys, torch, ecg_model
torch.manual_seed(0)
model = ecg_model.ECGDigitizer(encoder=sys.argv[2])
size = [int(sys.argv[3]), int(sys.argv[4])]
torch.save({'model': model.state_dict(), 'model_args': model.model_args, 'image_size': size,
            'config': {'image_size': size, 'encoder': sys.argv[2]}}, sys.argv[1])
"""   # a checkpoint as the earlier commit's trainer wrote them (run in its source tree)


def commit_tree(commit, out):
    """The commit's files, unpacked once into out/src_COMMIT (git archive: no worktree to clean up)."""
    tree = out / f'src_{commit}'
    if not (tree / 'inference.py').is_file():
        archive = subprocess.run(['git', 'archive', commit], capture_output=True, cwd=HERE)
        if archive.returncode != 0:
            sys.exit(f'--against {commit}: git archive could not read it ({archive.stderr.decode().strip()})')
        tree.mkdir(parents=True, exist_ok=True)
        subprocess.run(['tar', '-x', '-C', str(tree)], input=archive.stdout, check=True)
    return tree


def time_command(name, tree, checkpoint, images, out):
    """Seconds of one whole `python inference.py` run over `images` (a folder of links to them), in `tree`;
    its CSVs go to out/csv_{name}_{number of images}."""
    folder = out / f'pages_{len(images)}'
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in images:
        (folder / image.name).symlink_to(image.resolve())
    csvs = out / f'csv_{name}_{len(images)}'
    shutil.rmtree(csvs, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, 'inference.py', '--image', str(folder.resolve()), '--checkpoint',
                    str(checkpoint.resolve()), '--output', str(csvs.resolve()) + os.sep], cwd=tree,
                   env=without_wait_variables(),
                   check=True, capture_output=True, timeout=CHILD_TIMEOUT_S)
    return time.perf_counter() - start


def against_commit(args):
    """The whole inference.py command of args.against and of today, on all pages and on one, in turn ->
    {name: {seconds_n, seconds_1, images_per_s}} and today's speed-up."""
    images = bench_images(args)
    tree = commit_tree(args.against, args.out)
    old_checkpoint = args.out / f'random_{args.against}.pth'
    subprocess.run([sys.executable, '-c', OLD_CHECKPOINT, str(old_checkpoint.resolve()), args.encoder,
                    *map(str, args.image_size)], cwd=tree, check=True, capture_output=True)
    runs = {args.against: (tree, old_checkpoint), 'today': (HERE, args.checkpoint)}
    rows = {}
    for name, (source, checkpoint) in runs.items():
        seconds_n = time_command(name, source, checkpoint, images, args.out)
        seconds_1 = time_command(name, source, checkpoint, images[:1], args.out)
        rows[name] = {'seconds_n': seconds_n, 'seconds_1': seconds_1,
                      'images_per_s': (len(images) - 1) / max(seconds_n - seconds_1, 1e-9)}
        print(f'inference.py of {name}: {seconds_n:.1f} s for {len(images)} pages, {seconds_1:.1f} s for one: '
              f'{rows[name]["images_per_s"]:.2f} img/s past start-up', flush=True)
    rows['speedup'] = rows['today']['images_per_s'] / rows[args.against]['images_per_s']
    print(f'today / {args.against}: {rows["speedup"]:.2f}x img/s', flush=True)
    return rows


def default_settings():
    try:
        import onnxruntime  # noqa: F401
        return ['old', 'old_b4', 'new', 'onnx']
    except ImportError:
        print('onnxruntime is not installed: no onnx setting (pip install -r requirements-export.txt)')
        return ['old', 'old_b4', 'new']


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_setting(args)
    settings = args.settings or default_settings()
    ensure_pages(args.data, args.n)
    if args.checkpoint is None:
        args.checkpoint = random_checkpoint(args.out / f'random_{args.encoder}_{args.image_size[0]}x'
                                            f'{args.image_size[1]}.pth', args.encoder, args.image_size)
    if 'onnx' in settings:
        export_onnx.export(args.checkpoint, args.out / 'model.onnx')
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    results = {}
    for setting in settings:
        results[setting] = run_child(setting, args)
        if 'old' in results and setting != 'old':   # the same model: only float rounding may differ
            results[setting]['max_diff_vs_old_mv'] = largest_difference(args.out, setting)
        row = results[setting]
        print(f"{setting:6s} batch {row['batch_size']:2d}: {row['images_per_s']:6.2f} img/s, "
              f"{1000 * row['cpu_s_per_image']:5.0f} CPU ms/img, peak RSS {row['peak_rss_mib']:5.0f} MiB"
              + (f", max |diff| vs old {row['max_diff_vs_old_mv']:.4f} mV" if 'max_diff_vs_old_mv' in row else ''),
              flush=True)
    if 'old' in results:
        for setting in results:
            if setting != 'old':
                ratio = results[setting]['images_per_s'] / results['old']['images_per_s']
                results[setting]['speedup_vs_old'] = ratio
                print(f'{setting} / old: {ratio:.2f}x img/s')
    commands = against_commit(args) if args.against else None
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with open(args.report, 'w') as handle:
        json.dump({'images': args.n, 'image_size': args.image_size, 'checkpoint': str(args.checkpoint),
                   'cores': speed.usable_cores(), 'load_average_before': load_before, 'results': results,
                   'whole_command': commands}, handle, indent=2)


if __name__ == '__main__':
    main()
