"""inference.py CLI on tiny simulator images: Kaggle CSV layout, NaN where not shown, --fs, folder mode, --wfdb,
images without JSON, RGBA and JPEG input, clear errors."""
import json
import re
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import wfdb

from conftest import run_cli
from ecg_page import LAYOUTS

LEADS = ['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']


def expected_finite(n_rows, csv):
    """(n_rows, 12) bool: the rhythm strip's lead for all 10 s, every other lead only in its quarter of the
    layout the sidecar beside csv names (the standard page, or its Cabrera twin: a 1-epoch model's noise may fit
    either lead order)."""
    layout = LAYOUTS[json.loads(csv.with_suffix('.json').read_text())['layout']]
    assert layout.name in ('3x4+II', '3x4+II-Cabrera')
    quarter = n_rows // layout.n_columns
    finite = np.zeros((n_rows, 12), bool)
    for lead in LEADS:
        column = layout.column_of(lead)
        finite[column * quarter:(column + 1) * quarter, LEADS.index(lead)] = True
    for lead in layout.rhythm:
        finite[:, LEADS.index(lead)] = True
    return finite


def first_png(sim_data):
    return sorted(sim_data.glob('*/*-0001.png'))[0]


@pytest.fixture(scope='module')
def single(sim_data, tiny_checkpoint, tmp_path_factory):
    """One PNG copied alone (no JSON beside it, as in real use), digitized at the default 500 Hz."""
    folder = tmp_path_factory.mktemp('lone')
    image = shutil.copy(first_png(sim_data), folder / 'scan.png')
    csv = folder / 'out' / 'result.csv'
    result = run_cli('inference.py', '--image', image, '--checkpoint', tiny_checkpoint, '--output', csv)
    return csv, result


@pytest.fixture(scope='module')
def folder(sim_data, tiny_checkpoint, tmp_path_factory):
    """A folder of a plain PNG, an opaque RGBA PNG of the same page and a JPEG in a subfolder (no JSONs),
    plus a non-image file to be ignored; digitized at 250 Hz with --wfdb, two images a batch."""
    root = tmp_path_factory.mktemp('scans')
    source = first_png(sim_data)
    shutil.copy(source, root / 'plain.png')
    bgr = cv2.imread(str(source), cv2.IMREAD_COLOR)
    cv2.imwrite(str(root / 'rgba.png'), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    (root / 'sub').mkdir()
    cv2.imwrite(str(root / 'sub' / 'photo.jpg'), cv2.imread(str(sorted(sim_data.glob('*/*-0001.png'))[1])))
    (root / 'notes.txt').write_text('not an image')
    out = tmp_path_factory.mktemp('signals')
    result = run_cli('inference.py', '--image', root, '--checkpoint', tiny_checkpoint, '--output', out,
                     '--fs', '250', '--wfdb', '--batch_size', '2')
    return out, result


def test_single_image_writes_kaggle_csv(single):
    csv, result = single
    frame = pd.read_csv(csv)
    assert list(frame.columns) == LEADS
    assert len(frame) == 5000
    assert str(csv) in result.stdout


def test_single_image_nan_layout_and_values(single):
    frame = pd.read_csv(single[0])
    finite = np.isfinite(frame.to_numpy())
    assert finite[:, 1].all()                                            # II: the rhythm strip, 10 s
    assert np.flatnonzero(finite[:, 0]).tolist() == list(range(1250))   # I: first column only
    assert np.flatnonzero(finite[:, 11]).tolist() == list(range(3750, 5000))
    assert (finite == expected_finite(5000, single[0])).all()
    values = frame.to_numpy()[finite]
    assert np.abs(values).max() < 20                                     # mV
    assert np.abs(values).max() > 0                                      # not an all-zero placeholder


def test_folder_mode_one_csv_per_image_named_by_stem(folder):
    out, result = folder
    assert sorted(p.name for p in out.glob('*.csv')) == ['photo.csv', 'plain.csv', 'rgba.csv']
    assert 'wrote 3 signal(s)' in result.stdout


def test_fs_250_rows_and_layout_scaled(folder):
    out, _ = folder
    for csv in out.glob('*.csv'):
        frame = pd.read_csv(csv)
        assert list(frame.columns) == LEADS and len(frame) == 2500
        finite = np.isfinite(frame.to_numpy())
        assert (finite == expected_finite(2500, csv)).all(), csv.name
        assert np.abs(frame.to_numpy()[finite]).max() < 20


def test_rgba_reads_as_the_same_page_and_jpeg_works(folder):
    out, _ = folder
    plain, rgba = pd.read_csv(out / 'plain.csv'), pd.read_csv(out / 'rgba.csv')
    # an opaque alpha channel changes nothing the model sees
    np.testing.assert_allclose(rgba.to_numpy(), plain.to_numpy(), atol=1e-3, equal_nan=True)
    assert np.isfinite(pd.read_csv(out / 'photo.csv')['II']).all()


def test_wfdb_record_reads_back(folder):
    out, _ = folder
    assert (out / 'plain.hea').is_file() and (out / 'plain.dat').is_file()
    record = wfdb.rdrecord(str(out / 'plain'))
    assert record.n_sig == 12 and record.fs == 250 and record.sig_name == LEADS and record.units == ['mV'] * 12
    csv = pd.read_csv(out / 'plain.csv').to_numpy()
    assert record.p_signal.shape == csv.shape
    assert (np.isnan(record.p_signal) == np.isnan(csv)).all()           # not shown stays NaN
    np.testing.assert_allclose(record.p_signal, csv, atol=2e-3, equal_nan=True)


@pytest.mark.parametrize('case', ['missing image', 'not an image', 'missing checkpoint'])
def test_bad_inputs_fail_naming_the_file(case, tiny_checkpoint, tmp_path):
    image, checkpoint = tmp_path / 'nope.png', tiny_checkpoint
    if case == 'not an image':
        image.write_text('this is text, not a PNG')
    if case == 'missing checkpoint':
        image.write_text('unused')
        checkpoint = tmp_path / 'missing.pth'
    result = run_cli('inference.py', '--image', image, '--checkpoint', checkpoint, '--output', tmp_path / 'o.csv',
                     check=False)
    assert result.returncode != 0
    named = checkpoint if case == 'missing checkpoint' else image
    assert str(named) in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'o.csv').exists()


def test_sidecar_json_tells_the_scale_found_and_per_lead_confidence(single, sim_data):
    csv, _ = single
    report = json.loads(csv.with_suffix('.json').read_text())
    truth = json.loads(first_png(sim_data).with_suffix('.json').read_text())
    assert list(report['leads']) == LEADS
    assert all(0 < lead['confidence'] <= 1 and lead['row_spread_mv'] >= 0 for lead in report['leads'].values())
    if truth['gridlines']:   # the simulator's JSON knows the grid: 5 mm = x_grid px
        assert report['scale']['source'] == 'grid'
        assert report['scale']['px_per_mm_x'] == pytest.approx(truth['x_grid'] / 5, rel=0.03)
    assert report['px_per_mv_input'] > 0 and abs(report['rotation_deg']) < 10


def test_gain_and_paper_speed_flags_override_the_pulse(single, tiny_checkpoint):
    """--gain 20 on a page whose pulse says 10 mm/mV halves every amplitude; --paper_speed 50 on a model
    trained on 25 mm/s pages warns that the page fits a layout it never saw (test_layouts checks what a
    NAME@50mm/s layout shows)."""
    csv, _ = single
    base = pd.read_csv(csv).to_numpy()
    out = csv.with_name('flags.csv')
    result = run_cli('inference.py', '--image', csv.parent.parent / 'scan.png', '--checkpoint', tiny_checkpoint,
                     '--output', out, '--gain', '20', '--paper_speed', '50')
    halved = pd.read_csv(out).to_numpy()
    finite = np.isfinite(base) & np.isfinite(halved)
    assert finite.sum() > 5000 and np.abs(halved[finite] - base[finite] / 2).max() < 0.01
    # which 50 mm/s twin (with or without its rhythm strip) a barely trained model's presence fits is chance
    assert re.search(r'fit 3x4\S*@50mm/s best', result.stderr)
    report = json.loads(out.with_suffix('.json').read_text())
    assert report['scale']['gain_from_flag'] == 20 and report['scale']['speed_from_flag'] == 50
    assert re.search(r'3x4\S*@50mm/s', report['layout_warning'])


def test_pages_are_read_one_by_one_ahead_of_the_model_and_batched_in_order(monkeypatch):
    """read_batches yields each batch's pages in order, unreadable ones reported in their own batch, while
    the reader threads take page after page (a slow page does not stop the other thread at a batch's end),
    never more than READ_AHEAD batches beyond the next."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    import page_reader
    started = []

    def read_page(path, size_hw):
        started.append(path)
        time.sleep(0.05 if path % 4 == 0 else 0.005)        # the first page of every batch is slow
        return (None, f'{path}: bad') if path in (5, 9) else ((path, size_hw), None)

    monkeypatch.setattr(page_reader, 'read_page', read_page)
    monkeypatch.setattr(page_reader, 'stack_inputs', lambda rows: [path for path, _ in rows])
    pages, batch = list(range(14)), 4
    with ThreadPoolExecutor(2) as pool:
        batches = []
        for inputs, read, problems in page_reader.read_batches(pages, (128, 672), batch, pool):
            batches.append((inputs, read, problems))
            assert len(started) <= (len(batches) + page_reader.READ_AHEAD + 1) * batch
            queued = min(len(pages), (len(batches) + page_reader.READ_AHEAD + 1) * batch)
            deadline = time.monotonic() + 10
            while len(started) < queued and time.monotonic() < deadline:   # the model's turn: the readers go on
                time.sleep(0.01)
            time.sleep(0.02)
            assert len(started) == queued
    assert [read for _, read, _ in batches] == [[0, 1, 2, 3], [4, 6, 7], [8, 10, 11], [12, 13]]
    assert [inputs for inputs, _, _ in batches] == [read for _, read, _ in batches]
    assert [problems for _, _, problems in batches] == [[], ['5: bad'], ['9: bad'], []]
