"""The formats a digitized ECG goes on to beside its Kaggle CSV: WFDB (wfdb.rdrecord and PhysioNet's tools)."""
import re

import numpy as np
import wfdb

from ecg_page import LEADS

WFDB_ADC_GAIN = 1000.0                 # digital units per mV: 1 uV steps, as PTB-XL stores its records
WFDB_MAX_MV = 32.767                   # fmt 16 holds +-32767 uV; -32768 is wfdb's NaN code


def write_wfdb(signal, fs, csv_path):
    """(12, N) mV -> {stem}.hea/.dat beside the CSV (fmt 16, 1000 units/mV, baseline 0). Not-shown samples
    are written as wfdb's NaN code (-32768), which wfdb.rdrecord reads back as NaN. Returns the .hea path."""
    record = re.sub(r'[^-\w]', '_', csv_path.stem)   # wfdb accepts letters, digits, '-' and '_' only
    p_signal = np.clip(signal.T, -WFDB_MAX_MV, WFDB_MAX_MV)
    wfdb.wrsamp(record, fs=fs, units=['mV'] * len(LEADS), sig_name=list(LEADS), p_signal=p_signal,
                fmt=['16'] * len(LEADS), adc_gain=[WFDB_ADC_GAIN] * len(LEADS),
                baseline=[0] * len(LEADS), write_dir=str(csv_path.parent))
    return csv_path.parent / f'{record}.hea'
