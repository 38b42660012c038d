"""Signal files of the Kaggle layout, read and written in one place: csv_root/train.csv (id, fs, sig_len) and
csv_root/{id}/{id}.csv (columns I..V6 in mV, NaN where a lead was not recorded), and every signal resampled to
500 Hz over 10 s (12 x 5000), each finite run of a lead on its own so that NaN never smears.

Two readers of a record's CSV for two uses: read_signal_csv checks a 10-s training or scoring record strictly
(SampleError: the sample is reported and skipped); read_record_csv takes a record of any length as it is (the
simulator's --csv_root and real_signals' windows).
"""
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.interpolate import CubicSpline
from scipy.signal import resample_poly

import ecg_cli
from ecg_page import FS, LEADS, N_SAMPLES, SECONDS

MAX_ABS_MV = 20.0                  # physiological ECG stays within a few mV; 20 allows pacing spikes


# ---------------------------------------------------------------- train.csv

def read_train_csv(csv_root):
    """csv_root/train.csv -> {id: (fs, sig_len)}; ids kept as strings (Kaggle ids are digits)."""
    if not Path(csv_root).is_dir():
        raise ecg_cli.InputError(f'{csv_root}: --csv_root is not a folder')
    path = Path(csv_root) / 'train.csv'
    if not path.is_file():
        raise ecg_cli.InputError(f'{path}: train.csv (id,fs,sig_len) not found under --csv_root')
    try:
        table = pd.read_csv(path, dtype={'id': str})
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:   # binary or broken file
        raise ecg_cli.InputError(f'{path}: not a readable CSV ({type(exc).__name__}); expected columns id,fs,sig_len') from exc
    missing = {'id', 'fs', 'sig_len'} - set(table.columns)
    if missing:
        raise ecg_cli.InputError(f'{path}: missing columns {sorted(missing)}; expected id,fs,sig_len')
    try:
        return {row.id: (float(row.fs), int(row.sig_len)) for row in table.itertuples()}
    except (TypeError, ValueError) as exc:
        raise ecg_cli.InputError(f'{path}: fs and sig_len must be numbers ({exc})') from exc


def read_csv_index(csv_root, n=None):
    """Rows (id, fs, sig_len) of csv_root/train.csv as strings, first n if given."""
    path = Path(csv_root) / 'train.csv'
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing (expected columns id,fs,sig_len)')
    index = pd.read_csv(path, dtype=str)
    missing = {'id', 'fs', 'sig_len'} - set(index.columns)
    if missing:
        raise ValueError(f'{path}: missing column(s) {sorted(missing)}; has {list(index.columns)}')
    rows = list(index[['id', 'fs', 'sig_len']].itertuples(index=False, name=None))
    return rows if n is None else rows[:n]


# ---------------------------------------------------------------- a record's CSV

def read_signal_csv(path, fs, sig_len):
    """Kaggle signal CSV -> raw (sig_len, 12) float64 array in mV, checked against train.csv."""
    path = Path(path)
    if not path.is_file():
        raise ecg_cli.SampleError(f'{path}: signal CSV not found')
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for a broken file
        raise ecg_cli.SampleError(f'{path}: unreadable CSV ({exc})') from exc
    missing = [lead for lead in LEADS if lead not in frame.columns]
    if missing:
        raise ecg_cli.SampleError(f'{path}: missing lead columns {missing}; expected {LEADS}')
    if len(frame) != sig_len:
        raise ecg_cli.SampleError(f'{path}: {len(frame)} rows but train.csv says sig_len={sig_len}')
    if abs(len(frame) - SECONDS * fs) > max(2, 0.01 * SECONDS * fs):
        longer = '; a longer record is cut into 10 s windows by real_signals.py' if len(frame) > SECONDS * fs else ''
        raise ecg_cli.SampleError(f'{path}: {len(frame)} rows disagree with fs={fs:g} Hz for {SECONDS:g} s '
                                  f'(expected {SECONDS * fs:g}{longer})')
    try:
        values = frame[LEADS].to_numpy(np.float64)
    except ValueError as exc:
        raise ecg_cli.SampleError(f'{path}: lead columns must hold numbers in mV ({exc})') from exc
    infinite = [lead for lead, column in zip(LEADS, values.T) if np.isinf(column).any()]
    if infinite:
        raise ecg_cli.SampleError(f'{path}: leads {infinite} hold infinite values')
    with np.errstate(invalid='ignore'):
        wild = [lead for lead, column in zip(LEADS, values.T) if (np.abs(column) > MAX_ABS_MV).any()]
    if wild:
        raise ecg_cli.SampleError(f'{path}: leads {wild} exceed {MAX_ABS_MV:g} mV (not an ECG in mV; wrong units?)')
    empty = [lead for lead, column in zip(LEADS, values.T) if not np.isfinite(column).any()]
    if empty:
        raise ecg_cli.SampleError(f'{path}: leads {empty} are entirely NaN')
    return values


def read_record_csv(path, sig_len=None):
    """A record's 12-lead CSV of any length (pandas frame of LEADS, mV, float64), as it is: the simulator renders
    it and real_signals cuts it into windows; a clear error names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: signal CSV missing')
    df = pd.read_csv(path)
    missing = [lead for lead in LEADS if lead not in df.columns]
    if missing:
        raise ValueError(f'{path}: missing lead column(s) {missing}; has {list(df.columns)}')
    if sig_len is not None and len(df) != sig_len:
        raise ValueError(f'{path}: {len(df)} rows but train.csv says sig_len={sig_len}')
    return df[LEADS].astype(np.float64)


def write_signal_csv(df, path):
    df[LEADS].to_csv(path, index=False, float_format='%.3f', na_rep='', lineterminator='\n')


def load_signal(path, fs, sig_len):
    """Kaggle signal CSV -> (12, 5000) float32 at 500 Hz, NaN where a lead was not recorded."""
    values = read_signal_csv(path, fs, sig_len)
    return np.stack([resample_lead(column, fs) for column in values.T])


# ---------------------------------------------------------------- resampling to 500 Hz

def find_finite_runs(values):
    """(start, end) half-open index pairs of each run of finite values in a 1-D array."""
    finite = np.isfinite(values).astype(np.int8)
    edges = np.diff(np.concatenate([[0], finite, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def resample_odd_padded(run, up, down):
    """resample_poly with the run extended by point reflection about its end samples, so the filter
    sees a continuous value and slope at the edges (zero or line padding bends the first and last
    0.1 s). The pad is a whole number of output samples long, so trimming keeps the time grid."""
    reach = 10 * max(up, down) / up + 5            # resample_poly's filter half-length, in input samples
    pad = down * math.ceil(max(20, reach) / down)
    if len(run) <= pad:
        return resample_poly(run, up, down, padtype='line')
    left = 2 * run[0] - run[pad:0:-1]
    right = 2 * run[-1] - run[-2:-pad - 2:-1]
    out = resample_poly(np.concatenate([left, run, right]), up, down)
    skip = pad * up // down
    return out[skip:skip + math.ceil(len(run) * up / down)]


def resample_run(run, fs, start, fs_out=FS, n_out=N_SAMPLES):
    """Resample one finite run that starts at input sample `start` onto the grid t = m / fs_out.

    Returns (m_first, values) with values at m_first, m_first + 1, ... (< n_out). resample_poly does the
    anti-aliased rate change; a cubic spline places the result on the grid when the run's first
    sample falls between two output instants (e.g. 1025 Hz to 500 Hz)."""
    ratio = Fraction(fs_out).limit_denominator(1000) / Fraction(fs).limit_denominator(1000)
    t0 = start / fs
    t_end = (start + len(run)) / fs        # sample n stands for [n / fs, (n + 1) / fs)
    m_first = math.ceil(t0 * fs_out - 1e-9)
    m_last = min(math.ceil(t_end * fs_out - 1e-9) - 1, n_out - 1)
    if m_last < m_first:
        return m_first, np.zeros(0, np.float32)
    m = np.arange(m_first, m_last + 1)
    if len(run) < 4:
        return m_first, np.interp(m / fs_out, t0 + np.arange(len(run)) / fs, run).astype(np.float32)
    resampled = run if ratio == 1 else resample_odd_padded(run, ratio.numerator, ratio.denominator)
    if abs(m_first / fs_out - t0) < 1e-9 and len(resampled) >= len(m):
        return m_first, resampled[:len(m)].astype(np.float32)
    t = t0 + np.arange(len(resampled)) / fs_out
    return m_first, CubicSpline(t, resampled)(m / fs_out).astype(np.float32)


def resample_lead(values, fs, fs_out=FS, n_out=N_SAMPLES):
    """One lead at fs (NaN where not recorded) -> (n_out,) at fs_out (default 500 Hz x 10 s), NaN
    outside the finite runs: each run is resampled on its own, so NaN never smears."""
    out = np.full(n_out, np.nan, np.float32)
    for start, end in find_finite_runs(values):
        m_first, resampled = resample_run(values[start:end].astype(np.float64), fs, start, fs_out, n_out)
        out[m_first:m_first + len(resampled)] = resampled
    return out
