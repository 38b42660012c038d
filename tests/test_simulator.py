"""Tests of the built-in simulator: signals, Kaggle layout, ecg-image-kit JSON, geometry, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ecg_simulator as sim  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / '..' / 'shared' / 'fixtures' / 'ecg-image-kit'
# a plain classic page at 100 dpi: what the geometry tests need to see exactly
CLEAN = dict(dpi_choices=(100,), style_probs=(1, 0, 0, 0, 0), noise_prob=0.0, blur_prob=0.0,
             jpeg_prob=0.0, tint_prob=0.0, header_prob=0.0)
SMALL = dict(dpi_choices=(100,))
CSV_ROUNDING = 1.6e-3   # three 3-decimal roundings at most


def read_png(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


def assert_identities(df, tol):
    """Einthoven/Goldberger identities wherever all leads involved are finite; returns how many
    samples were compared."""
    I, II = df['I'].to_numpy(), df['II'].to_numpy()
    compared = 0
    for lead, expected in [('III', II - I), ('aVR', -(I + II) / 2), ('aVL', I - II / 2), ('aVF', II - I / 2)]:
        ok = np.isfinite(expected) & np.isfinite(df[lead].to_numpy())
        np.testing.assert_allclose(df[lead].to_numpy()[ok], expected[ok], atol=tol, rtol=0)
        compared += ok.sum()
    return compared


def ink(img):
    """Brightest channel: low only for dark ink, not for red/pink grid lines or paper."""
    return img.astype(float).max(2)


def dark_fraction(img, pixels, rng, k=200):
    """Share of k random plotted pixels whose 3x3 neighbourhood holds a pixel much darker than the
    paper (the thinnest antialiased strokes at 100 dpi reach ~0.7 x paper, paper and grid ~0.9+)."""
    value = ink(img)
    paper = np.median(value)
    pts = np.asarray(pixels)[rng.choice(len(pixels), size=min(k, len(pixels)), replace=False)]
    r, c = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
    neigh = np.min([value[r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
    return np.mean(neigh < 0.75 * paper)


@pytest.fixture(scope='module')
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('sim')
    ids = sim.generate(out, n=3, seed=0, images_per_id=2, workers=1, **SMALL)
    return out, ids


@pytest.fixture(scope='module')
def record():
    df = sim.round_mv(sim.synthesize_record(np.random.default_rng([7, 0]), 500))
    return df


def test_synthesized_leads_are_consistent_and_plausible():
    for i, fs in enumerate((250, 1025)):
        df = sim.synthesize_record(np.random.default_rng([3, i]), fs)
        assert list(df.columns) == sim.LEADS and len(df) == round(10 * fs)
        assert_identities(df, 1e-9)
        assert np.isfinite(df.to_numpy()).all()
        peak = df.abs().max()
        assert 0.4 < peak.max() < 4.0                  # R of 0.5-2 mV, room for V leads
        assert (df.diff().abs().max() < 1.0).all()     # no steps: smooth at any fs


def test_layout_fs_and_csv_roundtrip(sim_dir):
    out, ids = sim_dir
    index = pd.read_csv(out / 'train.csv', dtype={'id': str})
    assert list(index.columns) == ['id', 'fs', 'sig_len']
    assert list(index['id']) == ids == [str(1000000 + i) for i in range(3)]
    for rec_id, fs, sig_len in index.itertuples(index=False):
        assert fs in sim.FS_CHOICES and sig_len == round(10 * fs)
        df = pd.read_csv(out / rec_id / f'{rec_id}.csv')
        assert list(df.columns) == sim.LEADS and len(df) == sig_len
        text = (out / rec_id / f'{rec_id}.csv').read_text().splitlines()[1]
        assert all(v == '' or len(v.split('.')[1]) == 3 for v in text.split(','))
        assert assert_identities(df, CSV_ROUNDING) >= sig_len // 4   # masked records: III in column 0
        for k in (1, 2):
            assert (out / rec_id / f'{rec_id}-{k:04d}.png').is_file()
            assert (out / rec_id / f'{rec_id}-{k:04d}.json').is_file()


def test_nan_mask_layout(tmp_path):
    sim.generate(tmp_path, n=2, seed=5, images_per_id=0,
                 signal_knobs=sim.SignalKnobs(fs_choices=(250, 1025), nan_mask_prob=1.0))
    index = pd.read_csv(tmp_path / 'train.csv', dtype={'id': str})
    for rec_id, fs, sig_len in index.itertuples(index=False):
        df = pd.read_csv(tmp_path / rec_id / f'{rec_id}.csv')
        assert df['II'].notna().all()
        for j, leads in enumerate(zip(*sim.LAYOUT)):   # column j holds e.g. I, II, III
            start, end = j * sig_len // 4, (j + 1) * sig_len // 4
            for lead in leads:
                if lead == 'II':
                    continue
                finite = df[lead].notna().to_numpy()
                assert finite[start:end].all() and not finite[:start].any() and not finite[end:].any()
        assert assert_identities(df, CSV_ROUNDING) == sig_len // 4   # only III meets I and II
    sim.generate(tmp_path / 'nomask', n=2, seed=5, images_per_id=0, signal_knobs=sim.SignalKnobs(nan_mask_prob=0.0))
    for csv in (tmp_path / 'nomask').glob('*/*.csv'):
        assert pd.read_csv(csv).notna().all().all()


def test_json_keys_and_sample_counts(sim_dir):
    out, ids = sim_dir
    meta = json.loads((out / ids[0] / f'{ids[0]}-0001.json').read_text())
    sig_len = int(pd.read_csv(out / 'train.csv').iloc[0]['sig_len'])
    for key, kind in [('sampling_frequency', float), ('width', int), ('height', int), ('resolution', int),
                      ('pad_inches', int), ('x_grid', float), ('y_grid', float), ('gridlines', bool),
                      ('number_of_columns_in_image', int), ('full_mode_lead', str), ('leads', list),
                      ('rotation_deg', float), ('rotation_center', list), ('grid_origin', list),
                      ('style', str), ('baseline_rows', list)]:
        assert isinstance(meta[key], kind), key
    assert 'rotate' in meta and meta['number_of_columns_in_image'] == 4 and meta['full_mode_lead'] == 'II'
    img = read_png(out / ids[0] / f'{ids[0]}-0001.png')
    assert img.shape == (meta['height'], meta['width'], 3) == (850, 1100, 3)
    assert meta['resolution'] == 100 and abs(meta['x_grid'] - 100 / 25.4 * 5) < 1e-9
    leads = meta['leads']
    assert len(leads) == 13 == len(meta['baseline_rows'])
    assert sorted(entry['lead_name'] for entry in leads[:12]) == sorted(sim.LEADS)
    for entry in leads:
        assert len(entry['plotted_pixels']) == entry['end_sample'] - entry['start_sample']
        assert set(entry['lead_bounding_box']) == {'0', '1', '2', '3'}
    rhythm = [e for e in leads if e['lead_name'] == 'II']
    assert len(rhythm) == 2 and rhythm[1]['end_sample'] - rhythm[1]['start_sample'] == sig_len
    assert rhythm[0]['end_sample'] - rhythm[0]['start_sample'] == sig_len // 4


def test_unrotated_pixels_lie_on_trace_and_baselines(record):
    img, meta = sim.render_image(record, 500, np.random.default_rng(1), max_rotation=0, **CLEAN)
    assert meta['rotation_deg'] == 0.0
    ppmv, rng = 2 * meta['y_grid'], np.random.default_rng(0)
    for entry, base in zip(meta['leads'], meta['baseline_rows']):
        px = np.asarray(entry['plotted_pixels'])
        assert dark_fraction(img, px, rng) == 1.0, entry['lead_name']
        assert dark_fraction(img, px + [meta['y_grid'], 0], rng) < 0.5   # 0.5 mV lower is not on ink
        values = record[entry['lead_name']].to_numpy()[entry['start_sample']:entry['end_sample']]
        np.testing.assert_allclose(px[:, 0] - (base - values * ppmv), 0, atol=0.01)
        dx = np.diff(px[:, 1])
        np.testing.assert_allclose(dx, 5 * meta['x_grid'] / 500, atol=2e-3)   # px_per_s / fs
    cols = [np.asarray(e['plotted_pixels'])[0, 1] for e in meta['leads'][:4]]
    np.testing.assert_allclose(np.diff(cols), 2.5 * 5 * meta['x_grid'], atol=2e-3)   # contiguous columns


def test_rotated_pixels_lie_on_trace(record):
    for k in range(20):   # first image with a clearly visible angle
        img, meta = sim.render_image(record, 500, np.random.default_rng([2, k]), max_rotation=5, **CLEAN)
        if abs(meta['rotation_deg']) > 2:
            break
    assert abs(meta['rotation_deg']) > 2 and meta['rotate'] == 5
    rng = np.random.default_rng(0)
    for entry in meta['leads']:
        assert dark_fraction(img, entry['plotted_pixels'], rng) == 1.0, entry['lead_name']
    # undoing rotation_deg about rotation_center gives back the unrotated baseline geometry
    theta, (cy, cx) = np.deg2rad(meta['rotation_deg']), meta['rotation_center']
    for entry, base in zip(meta['leads'], meta['baseline_rows']):
        px = np.asarray(entry['plotted_pixels'])
        dy, dx = px[:, 0] - cy, px[:, 1] - cx
        row = cy - np.sin(theta) * dx + np.cos(theta) * dy    # inverse of a clockwise rotation
        values = record[entry['lead_name']].to_numpy()[entry['start_sample']:entry['end_sample']]
        np.testing.assert_allclose(row - (base - values * 2 * meta['y_grid']), 0, atol=0.01)


def test_grid_origin_marks_major_lines(record):
    img, meta = sim.render_image(record, 500, np.random.default_rng(4), max_rotation=0, **CLEAN)
    green = img[..., 1].astype(float)   # red grid lines are where green drops
    oy, ox = meta['grid_origin']
    step = meta['x_grid']
    band = slice(0, int(meta['baseline_rows'][-4] - 3 * step))  # paper above the top row: grid only
    k = np.arange(2, 20)
    on_major = green[band, np.rint(ox + k * step).astype(int)].mean()
    between = green[band, np.rint(ox + k * step + step / 10).astype(int)].mean()   # between minor lines
    assert on_major < between - 60
    rows = np.rint(oy + np.arange(1, 4) * step).astype(int)
    assert green[rows, 50:-50].mean() < green[rows + int(step / 10), 50:-50].mean() - 60


def test_nan_samples_not_drawn_but_listed(record):
    df = record.copy()
    df.loc[100:149, 'II'] = np.nan      # a gap in column 0 of lead II and in the rhythm strip
    img, meta = sim.render_image(df, 500, np.random.default_rng(3), max_rotation=0, **CLEAN)
    entry = next(e for e in meta['leads'] if e['lead_name'] == 'II' and e['end_sample'] == 5000)
    px = np.asarray(entry['plotted_pixels'])
    assert np.isfinite(px).all() and len(px) == 5000
    assert json.loads(json.dumps(meta, allow_nan=False))   # strict JSON


def test_determinism(tmp_path):
    a = sim.generate(tmp_path / 'a', n=2, seed=3, **SMALL)
    b = sim.generate(tmp_path / 'b', n=2, seed=3, **SMALL)
    c = sim.generate(tmp_path / 'c', n=2, seed=4, **SMALL)
    assert a == b and not set(a) & set(c)
    assert all_files(tmp_path / 'a') == all_files(tmp_path / 'b')
    ca, cc = (pd.read_csv(tmp_path / d / ids[0] / f'{ids[0]}.csv') for d, ids in (('a', a), ('c', c)))
    assert ca.shape != cc.shape or not np.allclose(ca.fillna(0), cc.fillna(0))


def test_cli_workers_match_inprocess(tmp_path):
    out = tmp_path / 'cli'
    cmd = [sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(out), '--n', '3', '--seed', '1',
           '--workers', '2', '--dpi_choices', '100']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids = pd.read_csv(out / 'train.csv', dtype={'id': str})['id'].tolist()
    assert ids == ['2000000', '2000001', '2000002']
    for rec_id in ids:
        names = sorted(p.name for p in (out / rec_id).iterdir())
        assert names == [f'{rec_id}-0001.json', f'{rec_id}-0001.png', f'{rec_id}.csv']
    sim.generate(tmp_path / 'inproc', n=3, seed=1, workers=1, **SMALL)
    assert all_files(out) == all_files(tmp_path / 'inproc')   # worker count does not matter


def test_csv_root_renders_fixture_signals(tmp_path):
    signals = FIXTURE / 'signals'
    out = tmp_path / 'kit'
    cmd = [sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(out), '--csv_root', str(signals),
           '--workers', '1', '--dpi_choices', '100', '--seed', '2']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / 'train.csv').read_text() == (signals / 'train.csv').read_text()
    for rec_id, fs, sig_len in [('fx1024', 256, 2560), ('fx2048', 512, 5120)]:
        assert (out / rec_id / f'{rec_id}.csv').read_bytes() == (signals / rec_id / f'{rec_id}.csv').read_bytes()
        meta = json.loads((out / rec_id / f'{rec_id}-0001.json').read_text())
        assert meta['sampling_frequency'] == float(fs)
        spans = [(e['start_sample'], e['end_sample']) for e in meta['leads']]
        assert spans[:4] == [(j * sig_len // 4, (j + 1) * sig_len // 4) for j in range(4)]
        assert spans[-1] == (0, sig_len)
        assert all(np.isfinite(np.asarray(e['plotted_pixels'])).all() for e in meta['leads'])
        assert read_png(out / rec_id / f'{rec_id}-0001.png').shape == (850, 1100, 3)
    # rendering in place (--sim_root OUT --csv_root OUT) leaves the signals alone
    before = (out / 'train.csv').read_bytes()
    sim.generate(out, csv_root=out, seed=9, images_per_id=1, n=1, **SMALL)
    assert (out / 'train.csv').read_bytes() == before


def test_csv_root_errors_name_the_file(tmp_path):
    root = tmp_path / 'bad'
    (root / 'r1').mkdir(parents=True)
    (root / 'train.csv').write_text('id,fs,sig_len\nr1,250,2500\n')
    with pytest.raises(FileNotFoundError, match='r1.csv'):
        sim.generate(tmp_path / 'o1', csv_root=root)
    pd.DataFrame({'I': [0.0] * 2500, 'II': [0.0] * 2500}).to_csv(root / 'r1' / 'r1.csv', index=False)
    with pytest.raises(ValueError, match='r1.csv'):
        sim.generate(tmp_path / 'o2', csv_root=root)
    cmd = [sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(tmp_path / 'o3'), '--csv_root',
           str(tmp_path / 'nowhere')]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and 'train.csv' in done.stderr


def test_unknown_knob_is_an_error(record):
    with pytest.raises(TypeError, match='max_rotaton'):
        sim.render_image(record, 500, np.random.default_rng(0), max_rotaton=3)


def test_findings_change_only_the_records_that_show_them():
    """A share of 0 leaves every record as it was; with findings the leads still obey Einthoven's and
    Goldberger's laws, and each finding shows what it names."""
    healthy = sim.synthesize_record(np.random.default_rng([7, 0]), 500)
    again = sim.synthesize_record(np.random.default_rng([7, 0]), 500, None)
    pd.testing.assert_frame_equal(healthy, again)
    for k, name in enumerate(sim.FINDINGS):
        for fs in (250, 1025):
            df = sim.synthesize_record(np.random.default_rng([1, k]), fs, np.random.default_rng([2, k]), (name,))
            assert len(df) == round(10 * fs) and np.isfinite(df.to_numpy()).all()
            assert_identities(df, 1e-9)
    tall = [sim.synthesize_record(np.random.default_rng([1, k]), 500, np.random.default_rng([2, k]), ('voltage',))
            for k in range(20)]
    peaks = [df.abs().max().max() for df in tall]
    assert max(peaks) > 4.0 and min(peaks) < 1.0      # LVH-tall and low-voltage records both drawn
    emg = sim.synthesize_record(np.random.default_rng([1, 0]), 500, np.random.default_rng([2, 0]), ('emg',))
    calm = sim.synthesize_record(np.random.default_rng([1, 0]), 500)
    assert np.abs(np.diff(emg['V5'].to_numpy())).mean() > 2 * np.abs(np.diff(calm['V5'].to_numpy())).mean()


def test_findings_af_beats_are_irregular():
    rng = np.random.default_rng(0)
    rr = np.diff(sim.irregular_beats(rng, 0.8))
    assert 0.12 < rr.std() / rr.mean() < 0.35
    regular = np.diff(sim.beat_times(np.random.default_rng(0), 0.8))
    assert regular.std() / regular.mean() < 0.08


def test_findings_prob_cli(tmp_path):
    """--findings_prob 0 writes the records it always wrote; 1 gives every record findings."""
    base = ['--n', '3', '--seed', '4', '--images_per_id', '0', '--workers', '1', '--nan_mask_prob', '0']
    subprocess.run([sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(tmp_path / 'a'), *base], check=True)
    subprocess.run([sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(tmp_path / 'b'), *base,
                    '--findings_prob', '0'], check=True)
    subprocess.run([sys.executable, str(ROOT / 'ecg_simulator.py'), '--out', str(tmp_path / 'c'), *base,
                    '--findings_prob', '1', '--findings', 'wander'], check=True)
    assert all_files(tmp_path / 'a') == all_files(tmp_path / 'b')
    for rec in pd.read_csv(tmp_path / 'a' / 'train.csv', dtype={'id': str})['id']:
        calm = pd.read_csv(tmp_path / 'a' / rec / f'{rec}.csv')
        wander = pd.read_csv(tmp_path / 'c' / rec / f'{rec}.csv')
        assert (wander - calm).abs().max().max() > 0.1   # the same heart, wandering
