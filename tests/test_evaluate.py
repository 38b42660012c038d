"""evaluate.py on a tiny trained checkpoint: the run's validation split by default, any data set on request."""
import json
import math

import pandas as pd
import pytest

import production_dataset as pdx
from conftest import run_cli, run_in_process


def test_evaluate_scores_the_runs_validation_split(tiny_checkpoint):
    result = run_cli('evaluate.py', '--checkpoint', tiny_checkpoint)
    report = json.loads(tiny_checkpoint.with_name('best_eval.json').read_text())
    frame = pd.read_csv(tiny_checkpoint.with_name('best_eval.csv'))
    assert report['n_images'] == 1 == len(frame)          # 12 records, val_fraction 0.1
    assert 'overall' in result.stdout and 'lead V6' in result.stdout and 'reports:' in result.stdout
    assert set(report['per_lead']) == set(pdx.LEADS)
    assert -1 <= report['pearson'] <= 1 and report['snr_db'] < report['bound_snr_db']
    assert 0.5 < report['bound_pearson'] <= 1 and report['bound_snr_db'] > 2
    assert 0 <= report['seg_dice'] <= 1 and report['baseline_error_px'] >= 0
    assert math.isfinite(report['theta_error_deg'])


def test_evaluate_on_the_ecg_image_kit_fixture(tiny_checkpoint, fixture_dirs, tmp_path):
    images, signals = fixture_dirs
    run_cli('evaluate.py', '--checkpoint', tiny_checkpoint, '--sim_root', images, '--csv_root', signals,
                     '--output', tmp_path / 'fx')
    report = json.loads((tmp_path / 'fx_eval.json').read_text())
    assert report['n_images'] == 4
    # the per-image table adds up to the report: every fixture page shows all 12 leads, and SNR is the dB of
    # the mean power ratio
    frame = pd.read_csv(tmp_path / 'fx_eval.csv')
    assert frame.pearson.mean() == pytest.approx(report['pearson'], abs=1e-5)
    assert 10 * math.log10((10 ** (frame.snr_db / 10)).mean()) == pytest.approx(report['snr_db'], abs=1e-3)
    assert report['pulse_start_weight'] > 0
    assert set(report['per_fs']) == {'256.0', '512.0'} and set(report['per_style']) == {'eik-plain', 'eik+augment'}
    assert report['per_fs']['256.0']['n'] == 2
    # the rotated fixture pages are among the scored ones
    assert report['theta_error_deg_rotated'] is not None and report['theta_error_deg_rotated'] >= 0
    assert report['bound_pearson'] > 0.8
    # every fixture page prints its 1 mV x 0.2 s pulse: gain and speed are read, not assumed
    assert report['gain_found_share'] == 1.0 == report['speed_found_share']
    assert report['per_gain'] == {'10 mm/mV': 1.0}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_in_process('evaluate.py', '--checkpoint', tmp_path / 'none.pth')
    assert result.returncode != 0 and 'none.pth: checkpoint not found' in result.stderr


def test_untrained_baseline_is_scored_and_written_apart(tiny_checkpoint):
    result = run_cli('evaluate.py', '--checkpoint', tiny_checkpoint, '--untrained')
    report = json.loads(tiny_checkpoint.with_name('best_untrained_eval.json').read_text())
    assert report['untrained'] is True and report['n_images'] == 1
    assert abs(report['pearson']) < 0.5 and 'overall' in result.stdout
