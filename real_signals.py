#!/usr/bin/env python3
"""Real 12-lead recordings as pages are drawn from: 10 s windows cut from records of any length.

A page shows 10 s, and both renderers (ecg-image-kit, and ecg_simulator.py --csv_root) draw the first 10 s
of a record. Real archives hold longer records (CPSC 2018: 6 to 60 s; Holter-like exports: minutes), so
this cuts each record of a Kaggle-layout folder into windows of 10 s, each a record of its own, which
either renderer then draws:

    python real_signals.py --csv_root ../shared/real/signals --out data/real_windows
    python ecg_simulator.py --out data/real_pages --csv_root data/real_windows
    ../shared/tools/ecg-image-kit/render.sh KITWORK data/real_windows data/real_kit_pages

OUT/train.csv (id,fs,sig_len) and OUT/{id}_w{k}/{id}_w{k}.csv, in the input's own sampling rate; k counts
from 0 at the record's start. A record shorter than one window is skipped with a line naming it.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecg_page import LEADS, SECONDS
from ecg_signals import read_csv_index, read_record_csv, write_signal_csv

HOP_SECONDS = SECONDS          # windows side by side; a smaller hop overlaps them (more, correlated pages)
MIN_SHOWN_FRACTION = 0.9       # a window whose leads are mostly NaN (a lead switched off) is no page


@dataclass(frozen=True)
class Window:
    """One 10 s window of a record: its id, sampling rate and first row in the source CSV."""
    record_id: str
    window_id: str
    fs: float
    start_row: int
    n_rows: int


def record_windows(record_id, fs, sig_len, hop_s=HOP_SECONDS):
    """The windows of one record (id, fs Hz, sig_len rows): floor((len - 10 s) / hop) + 1 of them."""
    n_rows = int(round(SECONDS * fs))
    hop = max(1, int(round(hop_s * fs)))
    if sig_len < n_rows:
        return []
    return [Window(record_id, f'{record_id}_w{k}', fs, start, n_rows)
            for k, start in enumerate(range(0, sig_len - n_rows + 1, hop))]


def shown_fraction(values):
    """Share of finite samples in a (T, 12) window."""
    return float(np.isfinite(values).mean())


def write_window(signal, window, out):
    """Rows [start, start + n) of a record's (T, 12) DataFrame -> OUT/{window_id}/{window_id}.csv."""
    part = signal.iloc[window.start_row:window.start_row + window.n_rows].reset_index(drop=True)
    folder = Path(out) / window.window_id
    folder.mkdir(parents=True, exist_ok=True)
    write_signal_csv(part, folder / f'{window.window_id}.csv')


def cut_windows(csv_root, out, hop_s=HOP_SECONDS):
    """Every record of csv_root cut into 10 s windows in out (Kaggle layout); returns the windows written
    and the problems met (a record too short, or mostly NaN), each naming its file."""
    written, problems = [], []
    for record_id, fs, sig_len in read_csv_index(csv_root):
        path = Path(csv_root) / record_id / f'{record_id}.csv'
        signal = read_record_csv(path, int(float(sig_len)))
        windows = record_windows(record_id, float(fs), len(signal), hop_s)
        if not windows:
            problems.append(f'{path}: {len(signal) / float(fs):.1f} s, shorter than one {SECONDS:g} s window')
        for window in windows:
            values = signal.iloc[window.start_row:window.start_row + window.n_rows].to_numpy()
            if shown_fraction(values) < MIN_SHOWN_FRACTION:
                problems.append(f'{path}: window {window.window_id} is mostly empty (NaN); skipped')
                continue
            write_window(signal, window, out)
            written.append(window)
    return written, problems


def write_index(windows, out):
    """OUT/train.csv: id,fs,sig_len of each window."""
    rows = ''.join(f'{w.window_id},{w.fs:g},{w.n_rows}\n' for w in windows)
    (Path(out) / 'train.csv').write_text('id,fs,sig_len\n' + rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--csv_root', required=True, help='Kaggle-layout records: train.csv + {id}/{id}.csv')
    p.add_argument('--out', required=True, help='folder for the windows (Kaggle layout)')
    p.add_argument('--hop_s', type=float, default=HOP_SECONDS, help='seconds between window starts')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.hop_s <= 0:
        raise ValueError('--hop_s must be positive')
    Path(args.out).mkdir(parents=True, exist_ok=True)
    windows, problems = cut_windows(args.csv_root, args.out, args.hop_s)
    write_index(windows, args.out)
    for problem in problems:
        print(f'skipped: {problem}', file=sys.stderr)
    records = len({w.record_id for w in windows})
    print(f'wrote {len(windows)} windows of {SECONDS:g} s ({len(LEADS)} leads) from {records} records to {args.out}')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
