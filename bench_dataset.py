"""Speed and memory of the data path, measured side by side in one run (the machine is shared and noisy).

    python bench_dataset.py                 # 40 images at 200 dpi, input 256 x 1344
    python bench_dataset.py --n 10 --quick  # a smoke run

Reports: the simulator's seconds per 2200 x 1700 image (render alone, and render + PNG/JSON write) on
one core; the dataset's seconds per sample without and with --cache (same images, augmentation on);
the cache's memory per sample and for 1000 samples. Writes bench_out/bench_dataset.json (--report).
"""
import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import ecg_simulator
import production_dataset as pdx


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=40, help='records to simulate and load')
    p.add_argument('--dpi', type=int, default=200, help='200 dpi = 2200 x 1700 pages')
    p.add_argument('--image_size', type=int, nargs=2, default=list(pdx.DEFAULT_IMAGE_SIZE), metavar=('H', 'W'))
    p.add_argument('--out', default='bench_out/dataset', help='where the simulated images go')
    p.add_argument('--report', type=Path, default=Path('bench_out/bench_dataset.json'), help='the JSON report')
    p.add_argument('--quick', action='store_true', help='fewer repeats')
    return p.parse_args(argv)


def time_render(n, dpi):
    """Seconds per rendered page (no disk), one core."""
    rng = np.random.default_rng(0)
    signals = ecg_simulator.synthesize_record(rng, 500)
    ecg_simulator.render_image(signals, 500, rng, dpi_choices=(dpi,))   # warm-up
    start = time.perf_counter()
    for _ in range(n):
        image, meta = ecg_simulator.render_image(signals, 500, rng, dpi_choices=(dpi,))
    return (time.perf_counter() - start) / n, image.shape


def time_generate(out, n, dpi):
    """Seconds per image of the whole simulator (signal, render, PNG + JSON + CSV written), one process."""
    start = time.perf_counter()
    ecg_simulator.generate(out, n, seed=0, workers=1, dpi_choices=(dpi,))
    return (time.perf_counter() - start) / n


def time_dataset(dataset, repeats):
    """Seconds per __getitem__ over the data set, `repeats` passes."""
    torch.manual_seed(0)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(dataset)):
            dataset[i]
    return (time.perf_counter() - start) / (repeats * len(dataset))


def main(argv=None):
    args = parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    out = Path(args.out)
    render_s, shape = time_render(3 if args.quick else 10, args.dpi)
    generate_s = time_generate(out, args.n, args.dpi)
    size = tuple(args.image_size)
    plain = pdx.ECGImageDataset.from_folders(out, out, target_size=size, augment=True)
    start = time.perf_counter()
    cached = pdx.ECGImageDataset.from_folders(out, out, target_size=size, augment=True, cache=True)
    fill_s = (time.perf_counter() - start) / len(cached)
    repeats = 1 if args.quick else 3
    plain_s = time_dataset(plain, 1)
    cached_s = time_dataset(cached, repeats)
    per_sample = cached.cache_bytes() / len(cached)
    report = {
        'page_px': [int(shape[1]), int(shape[0])], 'dpi': args.dpi, 'images': len(cached), 'input': list(size),
        'simulator_render_s_per_image': render_s, 'simulator_generate_s_per_image': generate_s,
        'dataset_s_per_sample_no_cache': plain_s, 'dataset_s_per_sample_cache': cached_s,
        'cache_fill_s_per_sample': fill_s, 'cache_speedup': plain_s / cached_s,
        'cache_mib_per_sample': per_sample / 2 ** 20, 'cache_gib_per_1000_samples': 1000 * per_sample / 2 ** 30,
    }
    for key, value in report.items():
        print(f'{key:34s} {value:.4f}' if isinstance(value, float) else f'{key:34s} {value}')
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with open(args.report, 'w') as handle:
        json.dump(report, handle, indent=2)
    return report


if __name__ == '__main__':
    main()
