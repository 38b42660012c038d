"""The benchmark scripts stay working: their quick modes run and report sane numbers."""
import json

import numpy as np
import pytest

from conftest import ROOT, run_cli


def test_bench_quality_quick_reports_every_number(tmp_path):
    result = run_cli('bench_quality.py', '--quick', '--out', tmp_path / 'quality')
    report = json.loads((tmp_path / 'quality' / 'report_64x320.json').read_text())
    for block in ('heldout', 'fixture'):
        assert report[block]['n_images'] >= 1
        assert -1 <= report[block]['pearson'] <= 1 and report[block]['bound_pearson'] > 0.5
        assert set(report[block]['per_lead']) == {'I', 'II', 'III', 'aVR', 'aVL', 'aVF',
                                                  'V1', 'V2', 'V3', 'V4', 'V5', 'V6'}
    assert report['fixture']['n_images'] == 4
    assert report['train_images_per_s'] > 0 and report['epochs_done'] == 1
    assert '64x320' in report['bound_by_input_size']
    assert 'held-out simulator' in result.stdout and 'ecg-image-kit fixture' in result.stdout


def test_bench_quality_makes_a_data_folder_again_for_another_layout_mix(tmp_path):
    """The data folders are made once; one of the same name made with other simulator arguments (the layout
    mix grew) is made again rather than trained on as if it were the new mix."""
    import bench_quality

    def page_layouts(folder):
        return sorted(json.loads(p.read_text())['layout'] for p in folder.glob('*/*.json'))

    folder = tmp_path / 'train_data_layouts'
    bench_quality.simulate(folder, 2, 7, 1, bench_quality.PageMix(quick=True, layouts=('3x4',)))
    assert page_layouts(folder) == ['3x4', '3x4']
    made = (folder / 'train.csv').stat().st_mtime_ns
    bench_quality.simulate(folder, 2, 7, 1, bench_quality.PageMix(quick=True, layouts=('3x4',)))
    assert (folder / 'train.csv').stat().st_mtime_ns == made           # same arguments: kept
    bench_quality.simulate(folder, 2, 7, 1, bench_quality.PageMix(quick=True, layouts=('3x4+II+V1+V5',)))
    assert page_layouts(folder) == ['3x4+II+V1+V5'] * 2


def test_layouts_are_compared_on_the_same_records(tmp_path):
    """bench_quality draws every held-out record again in each layout of the mix (the same signals, its own
    layout on every page), and a layout's gap below the standard page is the dB of the two mean power ratios
    over the same records, with a bootstrap interval that keeps the pairs together."""
    import pandas as pd

    import bench_quality
    held = tmp_path / 'heldout_data_layouts'
    mix = bench_quality.PageMix(quick=True, layouts=('3x4+II', '12x1'))
    bench_quality.simulate(held, 3, 7, 1, mix)
    folders = bench_quality.layout_folders(held, 3, 1, mix)
    assert bench_quality.standard_of(list(folders)) == '3x4+II'
    for name, folder in folders.items():
        assert sorted(json.loads(p.read_text())['layout'] for p in folder.glob('*/*.json')) == [name] * 3
        for csv in held.glob('*/*.csv'):
            assert (folder / csv.parent.name / csv.name).read_bytes() == csv.read_bytes()

    records = list('abcd')
    standard = pd.DataFrame({'record_id': records, 'snr_db': [10.0, 12.0, 8.0, 10.0]})
    lower = pd.DataFrame({'record_id': records[::-1], 'snr_db': [8.0, 6.0, 10.0, 8.0]})   # 2 dB below, any order
    gap, interval = bench_quality.paired_gap(standard, lower)
    assert gap == pytest.approx(2.0) and interval == pytest.approx((2.0, 2.0))
    mixed = pd.DataFrame({'record_id': records, 'snr_db': [10.0, 9.0, 9.0, 10.0]})
    gap, (low, high) = bench_quality.paired_gap(standard, mixed)
    ratio = lambda db: np.mean(10 ** (np.array(db) / 10))
    assert gap == pytest.approx(10 * np.log10(ratio([10, 12, 8, 10]) / ratio([10, 9, 9, 10])))
    assert low < gap < high


def test_bench_dataset_quick(tmp_path):
    run_cli('bench_dataset.py', '--quick', '--n', '3', '--dpi', '100', '--image_size', '64', '320',
                     '--out', tmp_path / 'ds', '--report', tmp_path / 'report.json')
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['images'] == 3 and report['page_px'] == [1100, 850]
    assert 0 < report['simulator_render_s_per_image'] < 5
    assert report['dataset_s_per_sample_cache'] < report['dataset_s_per_sample_no_cache']
    assert report['cache_mib_per_sample'] > 64 * 320 * 3 / 2 ** 20


def test_bench_train_step_runs_each_precision(tmp_path):
    result = run_cli('bench_train_step.py', '--encoders', 'tu-regnetx_002', '--image_size', '64', '320',
                     '--batch_size', '2', '--steps', '1', '--data', tmp_path / 'data', '--report', tmp_path / 'r.json')
    report = json.loads((tmp_path / 'r.json').read_text())
    assert [r['precision'] for r in report['results']] == ['fp32', 'bf16']
    assert all(r['images_per_s'] > 0 and r['last_loss'] < 1e3 for r in report['results'])
    assert 'img/s' in result.stdout
    speeds = {r['precision']: r['images_per_s'] for r in report['results']}   # what --amp auto picks, and why
    assert abs(report['bf16_over_fp32']['tu-regnetx_002'] - speeds['bf16'] / speeds['fp32']) < 1e-9
    assert report['amp_auto']['reason'] and '--amp auto here:' in result.stdout and 'bf16 / fp32' in result.stdout


def test_bench_decoding_scores_each_variant_on_the_same_maps(tmp_path, fixture_dirs):
    """The starter's maps of the fixture decoded every way; 'current' is exactly what evaluate.py scores."""
    import evaluate
    sim_root, csv_root = fixture_dirs
    out = tmp_path / 'decoding.json'
    run_cli('bench_decoding.py', '--sim_root', sim_root, '--csv_root', csv_root, '--out', out)
    variants = json.loads(out.read_text())['variants']
    assert set(variants) == {'current', 'presence_start', 'pulse_weight_0.5', 'pulse_weight_2', 'pulse_weight_10',
                             'pulse_weight_50', 'start_box',
                             'topk_2', 'topk_5', 'topk_8', 'zero_per_strip', 'no_limb_fit', 'true_zero', 'true_trace',
                             'true_scale'}
    # the limb leads' fit changes the reading (the fixture is the standard page: 4 limb strips at once)
    assert variants['no_limb_fit']['pearson'] != variants['current']['pearson']
    # the oracles: the fixture's scale is read right, and its true trace rows read better than the network's
    assert variants['true_scale']['snr_db'] == pytest.approx(variants['current']['snr_db'], abs=0.05)
    assert variants['true_trace']['pearson'] > variants['current']['pearson'] + 0.02
    # the fixture's pages all print their pulses: holding the start near their end changes the reading
    assert variants['presence_start'] != variants['current']
    # 'current' reads with the starter's own weight (PULSE_START_WEIGHT where it names none); the others differ
    import ecg_checkpoint
    import ecg_decode
    own = ecg_checkpoint.load(ecg_checkpoint.STARTER).get('decoding', {}).get('pulse_start_weight',
                                                                              ecg_decode.PULSE_START_WEIGHT)
    assert variants[f'pulse_weight_{own:g}'] == variants['current']
    assert len({v['pearson'] for k, v in variants.items() if k.startswith('pulse_weight_')}) > 1
    # a column is ~8 samples; the old start (start_box: strip boxes over the presence maps, no pulse) is the weakest
    assert all(0 <= v['start_error_columns'] < 0.5 for k, v in variants.items() if k != 'start_box')
    assert variants['start_box']['start_error_columns'] < 2
    pulse = json.loads(out.read_text())['pulse_end']
    assert pulse['pages'] == 4 and 0 <= pulse['start_error_columns'] < 0.5
    assert all(-1 <= v['pearson'] <= 1 and abs(v['snr_db']) < 60 for v in variants.values())
    report, _ = evaluate.evaluate_checkpoint(ROOT / 'starter' / 'ecg_starter.pth', sim_root, csv_root, force_cpu=True)
    assert variants['current']['pearson'] == pytest.approx(report['pearson'], abs=1e-6)
    assert variants['current']['snr_db'] == pytest.approx(report['snr_db'], abs=1e-4)


def test_the_real_column_reports_each_styles_gap_below_its_bound(tmp_path):
    """bench_quality's real column on pages of real recordings (here two windows drawn by the simulator, where the
    benchmark has ecg-image-kit draw them all): each style's gap below its round-trip bound and the worst pages."""
    import bench_quality
    import ecg_checkpoint
    run_cli('real_signals.py', '--csv_root', ROOT.parent / 'shared' / 'real' / 'signals', '--out', tmp_path / 'win')
    run_cli('ecg_simulator.py', '--out', tmp_path / 'pages', '--csv_root', tmp_path / 'win', '--n', 2,
            '--workers', 1, '--dpi_choices', 100)
    report = bench_quality.real_report(ecg_checkpoint.STARTER, tmp_path / 'pages')
    assert report['n_images'] == 2 and report['gap_db'] == pytest.approx(report['bound_snr_db'] - report['snr_db'])
    for row in report['per_style'].values():
        assert row['gap_db'] == pytest.approx(row['bound_snr_db'] - row['snr_db'])
    worst = [page['snr_db'] for page in report['worst_pages']]
    assert worst == sorted(worst) and worst[0] == pytest.approx(report['worst_snr_db'])
    assert report['pages_below_0db'] == sum(snr < 0 for snr in worst)
