"""Real recordings as pages are drawn from: real_signals.py cuts records of any length into 10 s windows."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import run_cli  # noqa: E402

REAL = ROOT.parent / 'shared' / 'real' / 'signals'


def test_windows_of_the_real_recordings(tmp_path):
    """Each record of the shared real set gives floor(seconds / 10) windows, each the record's own rows."""
    out = tmp_path / 'windows'
    result = run_cli('real_signals.py', '--csv_root', REAL, '--out', out)
    index = pd.read_csv(REAL / 'train.csv', dtype={'id': str})
    expected = sum(int(row.sig_len // (10 * row.fs)) for row in index.itertuples())
    windows = pd.read_csv(out / 'train.csv', dtype={'id': str})
    assert len(windows) == expected == 22 and f'wrote {expected} windows' in result.stdout
    assert (windows.fs == 500).all() and (windows.sig_len == 5000).all()
    source = pd.read_csv(REAL / 'cpsc2018_A1988' / 'cpsc2018_A1988.csv')
    third = pd.read_csv(out / 'cpsc2018_A1988_w2' / 'cpsc2018_A1988_w2.csv')
    np.testing.assert_allclose(third.to_numpy(), source.iloc[10000:15000].to_numpy(), atol=5e-4)


def test_short_records_are_named_and_skipped(tmp_path):
    """A record shorter than 10 s is named on stderr; an overlapping hop gives more windows."""
    src = tmp_path / 'src'
    for rec, seconds in (('long', 25.0), ('short', 6.0)):
        (src / rec).mkdir(parents=True)
        n = int(seconds * 250)
        pd.DataFrame(np.random.default_rng(0).normal(size=(n, 12)),
                     columns=['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']
                     ).round(3).to_csv(src / rec / f'{rec}.csv', index=False)
    (src / 'train.csv').write_text('id,fs,sig_len\nlong,250,6250\nshort,250,1500\n')
    result = run_cli('real_signals.py', '--csv_root', src, '--out', tmp_path / 'out', '--hop_s', 5)
    assert 'short.csv: 6.0 s, shorter than one 10 s window' in result.stderr
    windows = pd.read_csv(tmp_path / 'out' / 'train.csv', dtype={'id': str})
    assert list(windows.id) == ['long_w0', 'long_w1', 'long_w2', 'long_w3'] and (windows.sig_len == 2500).all()
