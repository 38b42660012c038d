"""Metrics of ecg_trainer.py against hand-computed values (Kaggle-style SNR and Pearson)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecg_page  # noqa: E402
import ecg_trainer as E  # noqa: E402

T = 5000
CAP_DB = 10 * math.log10(384)  # 25.843 dB


def beats(n_rec=1, T=T, fs=E.FS):
    """ECG-like truth (n_rec, 12, T): sharp R peaks and broad T waves every 0.8 s, ~0 mV within
    0.3 s of both ends, so a time-shifted copy loses nothing at the edges."""
    t = torch.arange(T, dtype=torch.float64) / fs
    x = torch.zeros(T, dtype=torch.float64)
    for c in torch.arange(0.6, T / fs - 0.5, 0.8):
        x += torch.exp(-0.5 * ((t - c) / 0.008) ** 2)
        x += 0.3 * torch.exp(-0.5 * ((t - c - 0.25) / 0.04) ** 2)
    gains = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)[:, None]
    return (gains * x).expand(n_rec, 12, T).clone()


def zero_mean_sine(n_rec=1):
    """(n_rec, 12, T) 5 Hz sine, whole periods: mean exactly ~0, so offset removal is a no-op."""
    t = torch.arange(T, dtype=torch.float64) / E.FS
    return torch.sin(2 * math.pi * 5 * t).expand(n_rec, 12, T).clone()


def full_mask(x):
    return torch.ones_like(x, dtype=torch.bool)


def test_constants():
    assert ecg_page.LEADS == ['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']
    assert E.FS == 500 and E.SNR_CAP == 384


def test_perfect_prediction_hits_cap_exactly():
    y = beats(2)
    assert E.snr_db(y.clone(), y, full_mask(y)) == pytest.approx(CAP_DB, abs=1e-12)
    assert torch.equal(E.snr_per_record(y.clone(), y, full_mask(y)),
                       torch.full((2,), 384.0, dtype=torch.float64))


@pytest.mark.parametrize('shift', [50, -50, 100, -100])
def test_shift_within_0p2s_is_forgiven(shift):
    y = beats()
    pred = torch.roll(y, shift, dims=-1)  # pred[t] = y[t - shift]
    aligned, lag, offset = E.align_lead(pred, y, full_mask(y))
    assert torch.all(lag == -shift)
    assert E.snr_db(pred, y, full_mask(y)) > CAP_DB - 1e-6


def test_shift_of_0p3s_is_not_forgiven():
    y = beats()
    pred = torch.roll(y, 150, dims=-1)
    assert E.snr_db(pred, y, full_mask(y)) < 5.0


def test_shift_just_past_0p2s_is_not_fully_forgiven():
    y = beats()
    pred = torch.roll(y, 101, dims=-1)  # best allowed lag is 100: one sample off
    assert E.snr_db(pred, y, full_mask(y)) < CAP_DB - 3


def test_constant_offset_is_forgiven():
    y = beats()
    offsets = torch.linspace(-2, 2, 12, dtype=torch.float64)[None, :, None]
    aligned, lag, offset = E.align_lead(y + offsets, y, full_mask(y))
    assert torch.allclose(offset, -offsets[..., 0], atol=1e-12)
    assert E.snr_db(y + offsets, y, full_mask(y)) == pytest.approx(CAP_DB, abs=1e-9)


def test_half_scale_is_not_forgiven():
    # noise = (y - y/2)^2 = 0.25 * signal power -> ratio 4 -> 6.0206 dB
    y = zero_mean_sine()
    assert E.snr_db(0.5 * y, y, full_mask(y)) == pytest.approx(10 * math.log10(4), abs=1e-6)


def test_white_noise_of_known_power():
    # truth: unit-power white noise; error: white noise of power 0.01 -> 20 dB
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 12, T, generator=g, dtype=torch.float64)
    pred = y + 0.1 * torch.randn(2, 12, T, generator=g, dtype=torch.float64)
    assert E.snr_db(pred, y, full_mask(y)) == pytest.approx(20.0, abs=0.15)


def test_score_is_db_of_mean_ratio_over_records():
    # record 0: ratio 4, record 1: perfect (cap) -> 10*log10((4 + 384) / 2) = 22.878 dB
    y = zero_mean_sine(2)
    pred = y.clone()
    pred[0] *= 0.5
    assert E.snr_per_record(pred, y, full_mask(y)).tolist() == pytest.approx([4.0, 384.0])
    assert E.snr_db(pred, y, full_mask(y)) == pytest.approx(10 * math.log10(194), abs=1e-6)


def test_powers_are_summed_over_leads_of_a_record():
    # lead I perfect, lead II at half scale, equal power, others not shown:
    # ratio = (S + S) / (0 + S/4) = 8 -> 9.03 dB; per lead: cap and 6.02 dB
    y = zero_mean_sine()
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[:, :2] = True
    pred = y.clone()
    pred[:, 1] *= 0.5
    pred[:, 2:] = 7.0  # wrong everywhere the image shows nothing
    assert E.snr_db(pred, y, mask) == pytest.approx(10 * math.log10(8), abs=1e-6)
    per_lead = E.snr_db_per_lead(pred, y, mask)[0]
    assert per_lead[:2].tolist() == pytest.approx([CAP_DB, 10 * math.log10(4)], abs=1e-6)
    assert torch.isnan(per_lead[2:]).all()


def test_masked_out_samples_do_not_count():
    y = zero_mean_sine()
    pred = y.clone()
    pred[..., 2500:] = 100.0  # garbage in the hidden half
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[..., :2500] = True
    assert E.snr_db(pred, y, mask) == pytest.approx(CAP_DB, abs=1e-9)
    assert E.snr_db(pred, y, full_mask(y)) < 0
    # float masks work the same
    assert E.snr_db(pred, y, mask.float()) == pytest.approx(CAP_DB, abs=1e-9)


def test_nan_truth_is_treated_as_invalid():
    y = beats()
    pred = y.clone()
    y_nan = y.clone()
    y_nan[:, 3, 1000:3000] = math.nan
    pred[:, 3, 1000:3000] = 5.0
    assert E.snr_db(pred, y_nan, full_mask(y)) == pytest.approx(CAP_DB, abs=1e-9)
    m = E.signal_metrics(pred, y_nan, full_mask(y))
    assert not any(math.isnan(v) for v in [m['pearson'], m['snr_db']])


def test_hidden_samples_do_not_slide_in_when_shifting():
    # Kaggle's prediction is only the shown segment: a lag that pulls in samples from outside it
    # scores those positions as 0 (noise = truth), however good the hidden prediction is.
    y = zero_mean_sine()
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[..., 1000:2000] = True
    pred = torch.roll(y, 25, dims=-1)  # 5 Hz sine, 100 samples a period: lag -25 wins
    _, lag, _ = E.align_lead(pred, y, mask)
    assert torch.all(lag == -25)
    # covered: 975 of 1000 shown samples; the last 25 (1975..1999) are noise = truth
    S = (y[0, 0, 1000:2000] ** 2).sum()
    N = (y[0, 0, 1975:2000] ** 2).sum()
    assert float(S / N) < 384
    expected = 10 * math.log10(min(float(S / N), 384.0))
    assert E.snr_db(pred, y, mask) == pytest.approx(expected, abs=1e-6)


def test_pearson_hand_cases():
    y = beats()[0]
    mask = full_mask(y)
    pred = torch.stack([y[0], -y[1], 3 * y[2] + 1] + [y[i] for i in range(3, 12)])
    r = E.pearson_per_lead(pred[None], y[None], mask[None])[0]
    assert r[0].item() == pytest.approx(1.0, abs=1e-12)
    assert r[1].item() == pytest.approx(-1.0, abs=1e-12)
    assert r[2].item() == pytest.approx(1.0, abs=1e-12)


def test_pearson_known_value():
    # x = [0, 1, 2, 3], y = [0, 1, 3, 2]: cov 4, var 5 and 5 -> r = 0.8
    t = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(1, 12, 4)
    p = torch.tensor([0.0, 1.0, 3.0, 2.0]).expand(1, 12, 4)
    assert E.pearson_per_lead(p, t, None)[0].tolist() == pytest.approx([0.8] * 12)


def test_pearson_undefined_cases_are_nan_and_excluded_from_mean():
    y = beats()
    y[:, 0] = 0.3  # flat truth
    mask = full_mask(y)
    mask[:, 1, 1:] = False  # a single valid sample
    r = E.pearson_per_lead(y.clone(), y, mask)[0]
    assert math.isnan(r[0]) and math.isnan(r[1])
    assert r[2:].tolist() == pytest.approx([1.0] * 10)
    m = E.signal_metrics(y.clone(), y, mask)
    assert m['pearson'] == pytest.approx(1.0)
    assert math.isnan(m['pearson_per_lead'][0])


def test_pearson_flat_prediction_is_zero():
    y = beats()
    r = E.pearson_per_lead(torch.zeros_like(y), y, None)
    assert torch.all(r == 0)


def test_signal_metrics_is_plain_python():
    y = beats(3).float()
    pred = y + 0.05
    pred[1] *= 0.5
    m = E.signal_metrics(pred, y, full_mask(y))
    assert set(m) == {'pearson', 'snr_db', 'pearson_per_lead', 'snr_db_per_lead'}
    assert isinstance(m['pearson'], float) and isinstance(m['snr_db'], float)
    assert len(m['pearson_per_lead']) == 12 and len(m['snr_db_per_lead']) == 12
    assert all(type(v) is float for v in m['pearson_per_lead'] + m['snr_db_per_lead'])
    # records 0, 2 perfect after offset removal, record 1 at ratio 4 (beats have nonzero mean,
    # so check only the bounds) -> score between 6 and the cap, Pearson exactly 1
    assert m['pearson'] == pytest.approx(1.0)
    assert 10 * math.log10((2 * 384 + 4) / 3) <= m['snr_db'] < CAP_DB


def test_accumulated_stats_equal_one_big_batch():
    g = torch.Generator().manual_seed(1)
    y = beats(4)
    pred = y + 0.2 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    whole = E.signal_metrics(pred, y)
    parts = E.concat_stats([E.record_stats(pred[:1], y[:1]), E.record_stats(pred[1:], y[1:])])
    merged = E.summarize(parts)
    for key in whole:
        assert merged[key] == pytest.approx(whole[key], rel=1e-12)


def test_a_metric_is_one_entry_of_the_registry(monkeypatch):
    """Every metric of ecg_trainer.METRICS is summarized over a set (validation, evaluate.py), scored per record,
    and can choose best.pth (--select_metric) the way it is better; an entry added to the registry is in
    evaluate.py's per-group reports too."""
    import evaluate
    import pandas as pd
    import production_trainer
    y = beats(3).float()
    pred = y + 0.05 * torch.arange(3).view(3, 1, 1)
    stats = E.record_stats(pred, y, full_mask(y))
    for name, metric in E.METRICS.items():
        assert E.summarize(stats)[name] == metric.overall(stats)
        assert E.per_record(stats)[name].shape == (3,)
        assert production_trainer.SELECT_METRICS[name] is (max if metric.higher_is_better else min)
    rmse = E.Metric('rmse_mv', lambda s: s['pearson'].nanmean(1) * 0 + 1.5, lambda s: 1.5, higher_is_better=False)
    monkeypatch.setitem(E.METRICS, 'rmse_mv', rmse)
    assert E.summarize(stats)['rmse_mv'] == 1.5 and E.per_record(stats)['rmse_mv'].tolist() == [1.5] * 3
    groups = evaluate.group_report(pd.DataFrame({'style': ['a', 'a', 'b']}), stats, stats, 'style')
    assert groups['a']['rmse_mv'] == 1.5 and groups['b']['bound_rmse_mv'] == 1.5


def test_batch_of_16_is_fast_enough():
    import time
    y = torch.randn(16, 12, T)
    t0 = time.perf_counter()
    E.signal_metrics(y + 0.1, y)
    assert time.perf_counter() - t0 < 3.0  # ~0.25 s here; generous for shared cores
