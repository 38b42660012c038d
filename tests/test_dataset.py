"""production_dataset: resampling, targets on simulator and ecg-image-kit output, bad input, cache."""
import json
import math
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import ecg_cli
import ecg_signals
import page_image
from ecg_page import FS, LEADS, N_SAMPLES, RHYTHM
import production_dataset as pdx
from conftest import run_cli

RATES = [250, 256, 360, 500, 512, 1000, 1025]
SIZE = (128, 672)


@pytest.mark.parametrize('fs', RATES)
def test_sine_resampled_to_500hz_from_every_rate(fs):
    n = round(10 * fs)
    t = np.arange(n) / fs
    lead = np.sin(2 * np.pi * 7.3 * t) + 0.3 * np.sin(2 * np.pi * 23 * t)
    out = ecg_signals.resample_lead(lead, fs)
    m = np.arange(N_SAMPLES) / FS
    truth = np.sin(2 * np.pi * 7.3 * m) + 0.3 * np.sin(2 * np.pi * 23 * m)
    valid = np.isfinite(out)
    assert valid.all()
    error = np.abs(out - truth)
    recorded = m <= (n - 1) / fs          # past the last sample (< 1/fs) the value is extrapolated
    assert error[50:-50].max() < 1.5e-3, f'interior error {error[50:-50].max()} at {fs} Hz'
    assert error[recorded].max() < 3e-3, f'edge error {error[recorded].max()} at {fs} Hz'
    assert error.max() < 2e-2


@pytest.mark.parametrize('fs', [256, 1025])
def test_nan_runs_are_resampled_alone_and_stay_nan(fs):
    n = round(10 * fs)
    t = np.arange(n) / fs
    lead = np.sin(2 * np.pi * 5 * t)
    lead[n // 4: n // 2] = np.nan   # a masked column, as in Kaggle's training CSVs
    lead[3 * n // 4:] = np.nan
    out = ecg_signals.resample_lead(lead, fs)
    m = np.arange(N_SAMPLES) / FS
    assert np.isnan(out[1260:2490]).all() and np.isnan(out[3760:]).all()
    valid = np.isfinite(out)
    assert np.abs(out[valid] - np.sin(2 * np.pi * 5 * m[valid])).max() < 5e-3   # no smear into the gap
    assert valid[:1245].all() and valid[2505:3745].all()


def test_simulated_ecg_resampled_from_1000hz_matches_decimation():
    simulator = pytest.importorskip('ecg_simulator')
    record = simulator.synthesize_record(np.random.default_rng(3), 1000)
    # band-limit first (the simulator adds white noise up to 500 Hz) so decimation is the exact truth
    from scipy.signal import butter, filtfilt
    lead = filtfilt(*butter(6, 150, fs=1000), record['II'].to_numpy(np.float64))
    out = ecg_signals.resample_lead(lead, 1000)
    truth = lead[::2]
    rms_error = np.sqrt(np.mean((out[20:-20] - truth[20:-20]) ** 2))
    assert rms_error < 0.01 * np.sqrt(np.mean(truth ** 2))


def test_load_signal_masks_kaggle_layout(fixture_dirs):
    _, signals = fixture_dirs
    signal = ecg_signals.load_signal(signals / 'fx1024' / 'fx1024.csv', 256, 2560)
    assert signal.shape == (12, 5000)
    assert np.isfinite(signal[1]).all()                   # lead II: the full 10 s
    assert np.isfinite(signal[0, :1250]).all() and np.isnan(signal[0, 1251:]).all()
    assert np.isfinite(signal[3, 1250:2500]).all() and np.isnan(signal[3, :1249]).all()


def fixture_dataset(fixture_dirs, **kwargs):
    images, signals = fixture_dirs
    return pdx.ECGImageDataset.from_folders(images, signals, target_size=SIZE, **kwargs)


def test_fixture_seg_target_lies_on_dark_trace_pixels(fixture_dirs):
    dataset = fixture_dataset(fixture_dirs)
    assert len(dataset) == 4 and not dataset.problems
    for i in range(len(dataset)):
        sample = dataset[i]
        gray = page_image.denormalize(sample['image']).mean(axis=2)
        seg = sample['seg'].numpy()
        assert set(np.unique(seg)) == set(range(13))
        on_trace = gray[seg > 0]
        paper = np.median(gray[seg == 0])
        assert np.median(on_trace) < 0.8 * paper, f'{sample["record_id"]}: trace {np.median(on_trace)} vs paper {paper}'
        assert (on_trace < paper - 15).mean() > 0.75
        shifted = np.roll(seg, 6, axis=0) > 0          # the same strokes moved off the trace: no longer dark
        assert np.median(gray[shifted & (seg == 0)]) > np.median(on_trace) + 20
        assert float(sample['grid_valid']) == 0.0   # ecg-image-kit gives no grid geometry: never faked


def centroid_mv(sample, channel):
    """Signal read off the targets: (0 mV row - trace centre row) / px_per_mv, per column."""
    centre = (sample['trace_top'][channel] + sample['trace_bot'][channel]) / 2
    return ((sample['baseline_row'][channel] - centre) / sample['px_per_mv']).numpy()


@pytest.mark.parametrize('k, augment', [('0001', False), ('0002', False), ('0002', True)])
def test_fixture_baseline_and_theta_consistent_with_trace(fixture_dirs, k, augment):
    """Reading the per-column targets back in the de-rotated page frame gives the CSV signal; with
    augmentation the translated targets still do (they moved with the image)."""
    dataset = fixture_dataset(fixture_dirs, augment=augment)
    index = [i for i, r in enumerate(dataset.refs) if r.png.stem == f'fx2048-{k}'][0]
    torch.manual_seed(5)
    sample = dataset[index]
    theta = float(sample['theta'])
    assert float(sample['theta_valid']) == 1.0
    if k == '0001':
        assert abs(theta) < 0.05
    else:   # ecg-image-kit rotated by an unknown integer angle in [-6, 6]
        assert 1 <= abs(theta) <= 6.05 and abs(theta - round(theta)) < 0.1
    for channel in range(RHYTHM + 1):   # ecg-image-kit draws one rhythm strip: lead II
        lead = 1 if channel == RHYTHM else channel
        start, end = sample['trace_window'][channel].numpy()
        x0, x1 = sample['trace_span'][channel].numpy()
        cols = np.arange(math.ceil(x0), math.floor(x1))
        times = start + (cols - x0) / (x1 - x0) * (end - start)
        truth = sample['signal'][lead].numpy()[np.round(times * 500).astype(int)]
        read = centroid_mv(sample, channel)[cols]
        ok = np.isfinite(read)
        assert np.corrcoef(read[ok], truth[ok])[0, 1] > 0.97, f'channel {channel}'
        assert abs(np.median(read[ok] - truth[ok])) < 0.05, f'channel {channel}: 0 mV line off'


def test_augmentation_moves_targets_with_image_and_differs_per_seed(fixture_dirs):
    dataset = fixture_dataset(fixture_dirs, augment=True)
    torch.manual_seed(0)
    a = dataset[0]
    torch.manual_seed(0)
    b = dataset[0]
    torch.manual_seed(1)
    c = dataset[0]
    assert torch.equal(a['image'], b['image']) and torch.equal(a['seg'], b['seg'])
    assert not torch.equal(a['image'], c['image'])
    for sample in (a, c):
        gray = page_image.denormalize(sample['image']).mean(axis=2)
        seg = sample['seg'].numpy()
        assert np.median(gray[seg > 0]) < np.median(gray[seg == 0]) - 30


def test_photo_augmentation_changes_the_picture_and_no_target(fixture_dirs):
    """--photo_aug: the same seed draws the same moves with or without it; the photo look (light, shadows,
    creases, cast, focus, noise, JPEG) changes the picture only, and the trace stays darker than the paper."""
    plain = fixture_dataset(fixture_dirs, augment=True)
    photo = fixture_dataset(fixture_dirs, augment=True, photo_prob=1.0)
    for index in range(len(photo)):
        torch.manual_seed(index)
        a = plain[index]
        torch.manual_seed(index)
        b = photo[index]
        for name in pdx.ecg_heads.TARGET_FIELDS:
            assert torch.equal(torch.nan_to_num(a[name]), torch.nan_to_num(b[name])), name
        assert (a['image'] - b['image']).abs().mean() > 0.05
        gray = page_image.denormalize(b['image']).mean(axis=2)
        seg = b['seg'].numpy()
        assert np.median(gray[seg > 0]) < np.median(gray[seg == 0]) - 8


def test_creases_shade_one_flank_and_light_the_other():
    page = np.full((128, 672, 3), 200, np.uint8)
    creased = pdx.draw_creases(page, np.random.default_rng(0))
    assert creased.shape == page.shape and creased.dtype == np.uint8
    assert creased.min() < 190 and creased.max() > 210           # both flanks of some crease
    assert np.mean(creased != 200) < 0.2                         # thin lines, not a wash


def test_dataloader_workers_get_different_augmentations(fixture_dirs):
    dataset = fixture_dataset(fixture_dirs, augment=True)
    repeated = torch.utils.data.Subset(dataset, [0, 0, 0, 0])
    loader = torch.utils.data.DataLoader(repeated, batch_size=1, num_workers=2)
    images = [batch['image'] for batch in loader]
    assert not torch.equal(images[0], images[1])   # worker 0 and worker 1 each draw their own


def test_cache_matches_uncached_and_is_one_shared_block(fixture_dirs):
    plain = fixture_dataset(fixture_dirs)
    cached = fixture_dataset(fixture_dirs, cache=True)
    assert len(cached) == len(plain)
    assert cached.cache['image'].is_shared() and cached.cache['image'].is_contiguous()
    assert cached.cache['image'].shape == (4, *SIZE, 3)
    for key in ('image', 'seg', 'signal', 'trace_top', 'baseline', 'theta'):
        x, y = plain[2][key], cached[2][key]
        assert torch.allclose(x.float(), y.float(), equal_nan=True), key
    assert cached.cache_bytes() > 4 * SIZE[0] * SIZE[1] * 3


# ---------------------------------------------------------------- bad input

@pytest.fixture()
def broken_copy(tmp_path, fixture_dirs):
    images, signals = fixture_dirs
    shutil.copytree(images, tmp_path / 'images')
    shutil.copytree(signals, tmp_path / 'signals')
    return tmp_path / 'images', tmp_path / 'signals'


def problems_after(broken, break_it):
    images, signals = broken
    break_it(images, signals)
    dataset = pdx.ECGImageDataset.from_folders(images, signals, target_size=SIZE)
    return dataset, ' | '.join(f'{p}: {m}' for p, m in dataset.problems)


def test_missing_csv_is_reported_and_skipped(broken_copy):
    dataset, text = problems_after(broken_copy, lambda i, s: (s / 'fx1024' / 'fx1024.csv').unlink())
    assert len(dataset) == 2 and 'fx1024.csv: signal CSV not found' in text


def test_missing_json_is_reported(broken_copy):
    dataset, text = problems_after(broken_copy, lambda i, s: (i / 'fx2048-0001.json').unlink())
    assert len(dataset) == 3 and 'fx2048-0001.json: JSON beside the PNG not found' in text


def test_unreadable_png_is_reported(broken_copy):
    dataset, text = problems_after(broken_copy, lambda i, s: (i / 'fx2048-0002.png').write_bytes(b'not a png'))
    assert len(dataset) == 3 and 'fx2048-0002.png: unreadable PNG' in text


def test_malformed_json_is_reported(broken_copy):
    dataset, text = problems_after(broken_copy, lambda i, s: (i / 'fx1024-0001.json').write_text('{"width": 22'))
    assert len(dataset) == 3 and 'fx1024-0001.json: malformed JSON' in text


def test_wrong_columns_are_reported(broken_copy):
    def rename(images, signals):
        path = signals / 'fx2048' / 'fx2048.csv'
        pd.read_csv(path).rename(columns={'V6': 'V7'}).to_csv(path, index=False)
    dataset, text = problems_after(broken_copy, rename)
    assert len(dataset) == 2 and "fx2048.csv: missing lead columns ['V6']" in text


def test_all_nan_lead_is_reported(broken_copy):
    def blank(images, signals):
        path = signals / 'fx2048' / 'fx2048.csv'
        frame = pd.read_csv(path)
        frame['aVL'] = np.nan
        frame.to_csv(path, index=False)
    dataset, text = problems_after(broken_copy, blank)
    assert len(dataset) == 2 and "fx2048.csv: leads ['aVL'] are entirely NaN" in text


def test_fs_disagreeing_with_rows_is_reported(broken_copy):
    def wrong_fs(images, signals):
        (signals / 'train.csv').write_text('id,fs,sig_len\nfx1024,500,2560\nfx2048,512,5120\n')
    dataset, text = problems_after(broken_copy, wrong_fs)
    assert len(dataset) == 2
    assert 'fx1024.csv: 2560 rows disagree with fs=500 Hz' in text or 'sampling_frequency 256' in text


def test_id_without_images_and_image_without_id_are_reported(broken_copy):
    def extra_id(images, signals):
        with open(signals / 'train.csv', 'a') as handle:
            handle.write('fx4096,500,5000\n')
        shutil.copy(images / 'fx1024-0001.png', images / 'stray-0001.png')
    dataset, text = problems_after(broken_copy, extra_id)
    assert len(dataset) == 4
    assert "id 'fx4096' has no images" in text and "id 'stray' is not in" in text


def test_validation_cli_reports_counts_rates_and_writes_preview(tmp_path, fixture_dirs):
    images, signals = fixture_dirs
    preview = tmp_path / 'preview.png'
    result = run_cli('production_dataset.py', '--sim_root', images, '--csv_root', signals,
                     '--max_samples', 4, '--image_size', *SIZE, '--preview', preview)
    assert 'images found: 4   usable: 4   problems: 0' in result.stdout
    assert '256: 2, 512: 2' in result.stdout and 'seconds per sample' in result.stdout
    import cv2
    picture = cv2.imread(str(preview))
    assert picture.shape == (4 * SIZE[0], SIZE[1], 3) and picture.std() > 20


def test_padded_png_is_detected_and_coordinates_shifted(tmp_path, fixture_dirs):
    """ecg-image-kit with pad_inches > 0 borders the PNG by pad * dpi px but leaves the JSON unshifted."""
    import cv2
    images, signals = fixture_dirs
    pad = 40   # px: pad_inches 0.2 at 200 dpi
    (tmp_path / 'images').mkdir()
    png = cv2.imread(str(images / 'fx2048-0001.png'), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(tmp_path / 'images' / 'fx2048-0001.png'),
                cv2.copyMakeBorder(png, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(255, 255, 255, 255)))
    meta = json.loads((images / 'fx2048-0001.json').read_text())
    meta['pad_inches'] = pad / meta['resolution']
    (tmp_path / 'images' / 'fx2048-0001.json').write_text(json.dumps(meta))
    padded = pdx.ECGImageDataset.from_folders(tmp_path / 'images', signals, target_size=SIZE)
    assert len(padded) == 1 and not [p for p in padded.problems if 'fx2048-0001' in p[0]]
    sample = padded[0]
    gray = page_image.denormalize(sample['image']).mean(axis=2)
    seg = sample['seg'].numpy()
    assert np.median(gray[seg > 0]) < 0.8 * np.median(gray[seg == 0])
    meta['pad_inches'] = 0.05      # a border that does not match: a clear error, not a silent shift
    (tmp_path / 'images' / 'fx2048-0001.json').write_text(json.dumps(meta))
    wrong = pdx.ECGImageDataset.from_folders(tmp_path / 'images', signals, target_size=SIZE)
    assert len(wrong) == 0 and 'PNG is 2280x1780 but its JSON says 2200x1700' in wrong.problems[-1][1]


def test_rgba_pages_composite_over_white_and_contrast_matches_numpy(tmp_path):
    """Half-transparent ink becomes grey on white paper; an opaque RGBA page is read as its RGB; the
    blank-page check's contrast is numpy's std over every pixel and channel."""
    rgba = np.full((200, 300, 4), 255, np.uint8)
    rgba[50:60, :, :3] = 0                    # black ink ...
    rgba[50:55, :, 3] = 128                   # ... half of it half transparent
    path = tmp_path / 'page.png'
    cv2.imwrite(str(path), rgba)
    rgb = page_image.read_rgb(path)
    assert rgb[52, 10].tolist() == [127, 127, 127] and rgb[57, 10].tolist() == [0, 0, 0]
    assert rgb[0, 0].tolist() == [255, 255, 255]
    opaque = rgba.copy()
    opaque[..., 3] = 255
    opaque[100:110, :, 0] = 40                # a blue channel of its own: BGRA comes out RGB
    assert np.array_equal(page_image.over_white_paper(opaque[..., [2, 1, 0, 3]]), opaque[..., 2::-1])   # RGBA in
    noisy = np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8)
    assert page_image.pixel_std(noisy) == pytest.approx(float(noisy.std()), rel=1e-9)
    assert page_image.pixel_std(rgb) == pytest.approx(float(rgb.std()), rel=1e-9)


def test_a_record_longer_than_ten_seconds_is_refused_with_the_way_to_cut_it(tmp_path):
    """A real record of 20 s (ecg-image-kit renders its first 10 s) is named with what to do about it; a short
    one is not told to cut it."""
    for name, rows in (('long.csv', 10000), ('short.csv', 4000)):
        pd.DataFrame(np.zeros((rows, 12)), columns=LEADS).to_csv(tmp_path / name, index=False)
    with pytest.raises(ecg_cli.SampleError, match=r'long.csv: 10000 rows disagree with fs=500 Hz .*'
                                                      r'cut into 10 s windows by real_signals.py'):
        ecg_signals.read_signal_csv(tmp_path / 'long.csv', 500, 10000)
    with pytest.raises(ecg_cli.SampleError, match=r'short.csv: 4000 rows .*\(expected 5000\)$'):
        ecg_signals.read_signal_csv(tmp_path / 'short.csv', 500, 4000)
