"""evaluate.py --images: real pages without simulator JSON (photos, scans) scored against their true signals as
inference.py reads them, with the shipped starter weights."""
import json
import math
import shutil

import pandas as pd
import pytest

import ecg_checkpoint
from conftest import ROOT, classic_pages, run_cli, run_in_process

PHOTOS = ROOT.parent / 'shared' / 'real' / 'photos'


def mean_db(snr_db):
    """The Kaggle score of a set of pages from their own dB: the dB of the mean power ratio."""
    return 10 * math.log10((10 ** (snr_db / 10)).mean())


@pytest.fixture(scope='module')
def both_paths(tmp_path_factory):
    """Two simulator pages scored twice with the starter: with their JSON (evaluate's usual path) and as
    bare PNGs in a folder of their own, as a user's scans come (--images). In this process: the photos' test
    runs the real CLI."""
    sim = classic_pages(tmp_path_factory.mktemp('sim'), 2, 11)
    bare = tmp_path_factory.mktemp('bare')
    for png in sim.glob('*/*.png'):
        shutil.copy(png, bare)
    out = tmp_path_factory.mktemp('reports')
    run_in_process('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--sim_root', sim, '--csv_root', sim,
                   '--output', out / 'json', check=True)
    result = run_in_process('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--images', bare,
                            '--csv_root', sim, '--output', out / 'bare', check=True)
    return out, result


def read_reports(out, stem):
    return json.loads((out / f'{stem}_eval.json').read_text()), pd.read_csv(out / f'{stem}_eval.csv')


def test_pages_without_json_score_as_with_it(both_paths):
    out, result = both_paths
    with_json, json_frame = read_reports(out, 'json')
    bare, bare_frame = read_reports(out, 'bare')
    assert bare['n_images'] == 2 == with_json['n_images'] and bare['layout_scored'] == '3x4+II'
    assert 'real pages' in result.stdout and 'below 0 dB' in result.stdout
    # the same reading of the same pixels, scored over the standard windows instead of the JSON's lead ranges
    assert bare['snr_db'] == pytest.approx(with_json['snr_db'], abs=0.1)
    assert bare['pearson'] == pytest.approx(with_json['pearson'], abs=0.01)
    merged = json_frame.merge(bare_frame, on='record_id', suffixes=('_json', '_bare'))
    assert len(merged) == 2
    assert (merged.snr_db_json - merged.snr_db_bare).abs().max() < 0.2
    assert bare['snr_db'] > 5 and bare['pearson'] > 0.8          # the starter reads clean pages well
    assert bare['pages_below_0db'] == 0 and bare['per_artefact'] == {}   # no manifest beside these
    assert bare['worst_page']['snr_db'] == pytest.approx(bare_frame.snr_db.min())


def test_two_real_photos_per_artefact(tmp_path):
    """The first two dev photos (sorted: 00012_hr, a rotated page, and 01032_hr, a wrinkled one); the manifest
    beside the images folder names their artefacts."""
    result = run_cli('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--images', PHOTOS / 'images',
                     '--csv_root', PHOTOS / 'csv', '--max_samples', 2, '--output', tmp_path / 'photos')
    assert 'artefact wrinkle' in result.stdout
    report, frame = read_reports(tmp_path, 'photos')
    assert frame.image.tolist() == ['00012_hr-0001.jpg', '01032_hr-0001.jpg']
    assert frame.record_id.tolist() == ['00012_hr', '01032_hr']
    assert report['manifest'] == str(PHOTOS / 'manifest.csv')
    assert {name: row['n'] for name, row in report['per_artefact'].items()} == {'rotation': 1, 'wrinkle': 1}
    assert report['per_artefact']['wrinkle']['snr_db'] == pytest.approx(frame.snr_db[1], abs=1e-6)
    assert report['snr_db'] == pytest.approx(mean_db(frame.snr_db), abs=1e-3)
    assert report['pearson'] == pytest.approx(frame.pearson.mean(), abs=1e-5)
    assert report['pages_below_0db'] == int((frame.snr_db < 0).sum())
    assert report['worst_page']['image'] == frame.image[frame.snr_db.idxmin()]
    assert -1 < report['pearson'] < 1 and -30 < report['snr_db'] < 26


def test_images_need_their_signals(tmp_path):
    result = run_in_process('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--images', PHOTOS / 'images')
    assert result.returncode == 1 and '--images needs --csv_root' in result.stderr
    stranger = tmp_path / 'stranger-0001.jpg'
    shutil.copy(PHOTOS / 'images' / '00012_hr-0001.jpg', stranger)
    result = run_in_process('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--images', tmp_path,
                            '--csv_root', PHOTOS / 'csv')
    assert result.returncode == 1
    assert "id 'stranger' is not in" in result.stdout and 'no image with a true signal' in result.stderr


WANDERING = ['02100_hr', '03156_hr']   # real records whose baseline wanders by 0.2-0.3 mV over the 10 s


@pytest.fixture(scope='module')
def wandering_pages(tmp_path_factory):
    """Simulator pages (classic style, 100 dpi, upright) of two real records with baseline wander, bare PNGs."""
    signals = tmp_path_factory.mktemp('signals')
    table = pd.read_csv(PHOTOS / 'csv' / 'train.csv', dtype={'id': str})
    table[table['id'].isin(WANDERING)].to_csv(signals / 'train.csv', index=False)
    for record in WANDERING:
        shutil.copytree(PHOTOS / 'csv' / record, signals / record)
    pages = classic_pages(tmp_path_factory.mktemp('pages'), len(WANDERING), 3, '--csv_root', signals,
                          '--layouts', '3x4+II', '--noise_prob', 0, '--blur_prob', 0, '--jpeg_prob', 0)
    bare = tmp_path_factory.mktemp('bare')
    for png in pages.glob('*/*.png'):
        shutil.copy(png, bare)
    return bare, signals


def test_a_real_baseline_wander_is_read_not_taken_out(wandering_pages, tmp_path, monkeypatch):
    """Each strip's 0 mV row is read as one line (ecg_decode.straight_zero_rows): read column by column it follows
    the wander, and the decoder took the wander out of the signal."""
    import ecg_decode
    pages, signals = wandering_pages
    scores = {}
    for straight in (False, True):
        monkeypatch.setattr(ecg_decode, 'ZERO_LINE', straight)
        run_in_process('evaluate.py', '--checkpoint', ecg_checkpoint.STARTER, '--images', pages, '--csv_root',
                       signals, '--output', tmp_path / str(straight), check=True)
        scores[straight] = pd.read_csv(tmp_path / f'{straight}_eval.csv').set_index('record_id')['snr_db']
    assert (scores[True] > scores[False] + 1.5).all(), scores
