"""Metrics (Pearson, Kaggle-style SNR) and the composite loss for 12-lead ECG digitization.

Signals are (B, 12, T) tensors in mV at FS Hz (T = 5000 for 10 s), leads in LEADS order, with a
validity mask of the same shape (bool or 0/1 float): a sample counts only where the mask is set
and the truth is finite, i.e. only where the image shows that lead.

The SNR follows the Kaggle "PhysioNet - Digitization of ECG Images" metric:
  per lead: centre truth and prediction on their valid samples, pick the integer lag within
            +-int(fs * 0.2) samples that maximises their cross-correlation (ties: smallest |lag|,
            negative first), shift the prediction by it, add the constant that best fits it to the
            truth (mean of true - shifted over the samples both cover); a valid truth sample that
            the shifted prediction no longer covers is scored as a prediction of 0 (noise = truth);
  per record: ratio = sum over leads of signal power (sum true^2) / sum of noise power
            (sum (true - aligned)^2), noise 0 -> SNR_CAP, otherwise min(ratio, SNR_CAP);
  score:    10 * log10(mean ratio over records), floored at SNR_DB_FLOOR.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch

import ecg_heads
from ecg_page import FS

# ---- metrics ----

MAX_SHIFT_S = 0.2        # Kaggle forgives a time shift of up to 0.2 s per lead
SNR_CAP = 384.0          # Kaggle's cap on a record's power ratio: 10*log10(384) = 25.84 dB
SNR_DB_FLOOR = -384.0    # Kaggle floors the final dB at -cap, so a zero mean ratio is not -inf
TRUTH_VAR_EPS = 1e-12    # mV^2; a truth lead flatter than this has no defined Pearson r


def _prepare(pred, true, mask=None):
    """Clean inputs for scoring -> pred, true float64 (B, 12, T) and valid bool (B, 12, T).

    Invalid truth samples are zeroed so they drop out of every masked sum. float64 because
    power sums over 5000 samples and the cap test need it; MPS has no float64, so run on CPU.
    """
    device = true.device if true.device.type != 'mps' else torch.device('cpu')
    true = true.detach().to(device, torch.float64)
    pred = pred.detach().to(device, torch.float64)
    if mask is None:
        mask = torch.ones_like(true, dtype=torch.bool)
    valid = (mask.to(device) != 0) & torch.isfinite(true)
    true = torch.where(valid, true, 0.0)
    # A non-finite prediction is scored as 0, as Kaggle does, so it cannot poison a batch mean.
    pred = torch.where(torch.isfinite(pred), pred, 0.0)
    return pred, true, valid


def _masked_mean(x, w):
    """Mean of x over the last dim with 0/1 weights w -> x.shape[:-1]; 0 where w sums to 0."""
    return (x * w).sum(-1) / w.sum(-1).clamp(min=1)


def pearson_per_lead(pred, true, mask=None):
    """Pearson r between prediction and truth per lead over valid samples -> (B, 12).

    pred, true (B, 12, T); mask (B, 12, T) bool/float or None. No alignment (this is the plain r
    the guide quotes). NaN where a lead has < 2 valid samples or a flat truth; a flat prediction
    against a varying truth gets r = 0 (it explains nothing) rather than NaN, so it is not
    silently dropped from means.
    """
    pred, true, valid = _prepare(pred, true, mask)
    w = valid.to(true.dtype)
    n = w.sum(-1)
    dt = (true - _masked_mean(true, w)[..., None]) * w
    dp = (pred - _masked_mean(pred, w)[..., None]) * w
    var_t, var_p = (dt * dt).sum(-1), (dp * dp).sum(-1)
    r = (dt * dp).sum(-1) / (var_t * var_p).sqrt().clamp(min=1e-300)
    undefined = (n < 2) | (var_t <= TRUTH_VAR_EPS * n)
    return r.clamp(-1.0, 1.0).masked_fill(undefined, math.nan)


def _lag_order(max_lag, device):
    """Lags 0, -1, 1, -2, 2, ..., +-max_lag -> (2*max_lag+1,) long.

    torch.argmax returns the first maximum, so this order breaks ties towards the smallest |lag|,
    negative first, like Kaggle's metric (exact ties happen, e.g. a flat prediction: all zero).
    """
    k = torch.arange(1, max_lag + 1, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                      torch.stack([-k, k], dim=1).flatten()])


def _cross_correlation(true_c, pred_c, lags):
    """c[..., j] = sum_t true_c[t] * pred_c[t - lags[j]] -> (B, 12, len(lags)).

    true_c, pred_c (B, 12, T), centred and zero where invalid. Computed by FFT (one pass instead of
    201 shifted products); zero-padding to T + max|lag| keeps the circular wrap out of range.
    """
    T = true_c.shape[-1]
    n = T + int(lags.abs().max())
    spec = torch.fft.rfft(true_c, n=n) * torch.fft.rfft(pred_c, n=n).conj()
    circ = torch.fft.irfft(spec, n=n)
    return circ[..., lags % n]


def _shift(x, lag):
    """y[..., t] = x[..., t - lag] -> (y, inside) both (B, 12, T); inside False where t - lag
    falls off the array (y is then a clamped copy, to be masked out by the caller)."""
    T = x.shape[-1]
    src = torch.arange(T, device=x.device) - lag[..., None]
    inside = (src >= 0) & (src < T)
    return x.gather(-1, src.clamp(0, T - 1)), inside


def _align_prepared(pred, true, valid, max_lag):
    """align_lead on _prepare'd tensors -> aligned (B, 12, T), lag (B, 12), offset (B, 12)."""
    w = valid.to(true.dtype)
    true_c = (true - _masked_mean(true, w)[..., None]) * w
    pred_c = (pred - _masked_mean(pred, w)[..., None]) * w
    lags = _lag_order(max_lag, true.device)
    lag = lags[_cross_correlation(true_c, pred_c, lags).argmax(-1)]
    shifted, inside = _shift(pred, lag)
    src_valid, _ = _shift(valid, lag)
    # Only the lead's own shown samples may slide in: Kaggle's prediction is just that segment.
    covered = inside & src_valid & valid
    cw = covered.to(true.dtype)
    offset = _masked_mean(true - shifted, cw)
    aligned = torch.where(covered, shifted + offset[..., None], 0.0)
    return aligned, lag, offset


def align_lead(pred, true, mask=None, fs=FS, max_shift_s=MAX_SHIFT_S):
    """Align each lead of the prediction to the truth as the Kaggle metric does.

    pred, true (B, 12, T); mask (B, 12, T) or None. Returns
      aligned (B, 12, T) float64: pred shifted by the best lag plus the best constant offset on
              the valid samples it covers, 0 elsewhere (0 is what Kaggle scores an uncovered
              sample as);
      lag (B, 12) long: aligned[t] = pred[t - lag], |lag| <= int(fs * max_shift_s);
      offset (B, 12) float64 in mV: mean of (true - shifted pred) over covered valid samples.
    """
    pred, true, valid = _prepare(pred, true, mask)
    max_lag = min(int(fs * max_shift_s), true.shape[-1] - 1)
    return _align_prepared(pred, true, valid, max_lag)


def _lead_powers(pred, true, mask, fs):
    """Signal and noise power per lead after alignment -> p_signal, p_noise, n_valid (B, 12)."""
    pred, true, valid = _prepare(pred, true, mask)
    max_lag = min(int(fs * MAX_SHIFT_S), true.shape[-1] - 1)
    aligned, _, _ = _align_prepared(pred, true, valid, max_lag)
    w = valid.to(true.dtype)
    p_signal = (true * true * w).sum(-1)
    p_noise = ((true - aligned) ** 2 * w).sum(-1)
    return p_signal, p_noise, w.sum(-1)


def _capped_ratio(p_signal, p_noise, n_valid):
    """Kaggle's ratio rule, elementwise: noise 0 -> cap, else min(signal / noise, cap);
    NaN where there is nothing to score (n_valid 0), so it can be left out of means."""
    ratio = (p_signal / p_noise).clamp(max=SNR_CAP)
    ratio = torch.where(p_noise == 0, torch.full_like(ratio, SNR_CAP), ratio)
    return ratio.masked_fill(n_valid == 0, math.nan)


def _to_db(ratio):
    """10 * log10(ratio), floored at SNR_DB_FLOOR; NaN stays NaN."""
    return (10.0 * torch.log10(ratio)).clamp(min=SNR_DB_FLOOR)


def snr_per_record(pred, true, mask=None, fs=FS):
    """Capped power ratio per record, powers summed over its 12 leads -> (B,) float64.

    pred, true, mask (B, 12, T). NaN for a record with no valid sample at all (Kaggle never has
    one; here it is left out of means rather than counted as a perfect score).
    """
    p_signal, p_noise, n_valid = _lead_powers(pred, true, mask, fs)
    return _capped_ratio(p_signal.sum(-1), p_noise.sum(-1), n_valid.sum(-1))


def snr_db(pred, true, mask=None, fs=FS):
    """The Kaggle score of a batch: 10 * log10(mean ratio over records) -> float (NaN if none)."""
    ratio = snr_per_record(pred, true, mask, fs)
    return float(_to_db(ratio.nanmean()))


def snr_db_per_lead(pred, true, mask=None, fs=FS):
    """Per-lead SNR in dB for reports, same alignment and cap as the score -> (B, 12) float64.

    NaN where a lead has no valid sample. (The score is not a mean of these: it pools powers.)
    """
    return _to_db(_capped_ratio(*_lead_powers(pred, true, mask, fs)))


def record_stats(pred, true, mask=None, fs=FS):
    """Per-record numbers that signal metrics are built from, detached, on the CPU.

    -> {'pearson': (B, 12), 'snr_ratio': (B,), 'lead_ratio': (B, 12)}; concatenate these over
    batches (or gather them across ranks) and pass to summarize() for exact epoch metrics:
    averaging per-batch dB values would not equal the dB of the mean ratio.
    """
    p_signal, p_noise, n_valid = _lead_powers(pred, true, mask, fs)
    return {
        'pearson': pearson_per_lead(pred, true, mask).cpu(),
        'snr_ratio': _capped_ratio(p_signal.sum(-1), p_noise.sum(-1), n_valid.sum(-1)).cpu(),
        'lead_ratio': _capped_ratio(p_signal, p_noise, n_valid).cpu(),
    }


@dataclass(frozen=True)
class Metric:
    """A signal metric of the registry (METRICS): read per record and over a set of records from record_stats,
    and which way is better. Validation, evaluate.py's reports and --select_metric (best.pth) take every entry."""
    name: str
    per_record: Callable    # record_stats -> (B,) one value per record
    overall: Callable       # record_stats of a set (concat_stats) -> float
    higher_is_better: bool = True


METRICS = {metric.name: metric for metric in (
    # mean r over all defined (record, lead) pairs; a record's: over its leads
    Metric('pearson', lambda stats: stats['pearson'].nanmean(1), lambda stats: float(stats['pearson'].nanmean())),
    # the Kaggle score: dB of the mean capped power ratio (not the mean of the records' dB)
    Metric('snr_db', lambda stats: _to_db(stats['snr_ratio']), lambda stats: float(_to_db(stats['snr_ratio'].nanmean()))),
)}


def per_record(stats):
    """record_stats output -> {metric name: (B,) value of each record} for every metric of METRICS."""
    return {name: metric.per_record(stats) for name, metric in METRICS.items()}


def summarize(stats):
    """record_stats output (possibly concatenated) -> JSON/TensorBoard-ready dict of floats: every metric of
    METRICS over the set, and 'pearson_per_lead' / 'snr_db_per_lead': 12 floats in LEADS order, each over the
    records where that lead is defined (dB of the mean capped per-lead ratio). NaN where nothing counts."""
    r, lead_ratio = stats['pearson'], stats['lead_ratio']
    return {
        **{name: metric.overall(stats) for name, metric in METRICS.items()},
        'pearson_per_lead': [float(v) for v in r.nanmean(0)],
        'snr_db_per_lead': [float(v) for v in _to_db(lead_ratio.nanmean(0))],
    }


def signal_metrics(pred, true, mask=None, fs=FS):
    """All signal metrics of one batch: pred, true, mask (B, 12, T) -> dict, see summarize()."""
    return summarize(record_stats(pred, true, mask, fs))


def concat_stats(stats_list):
    """Join record_stats dicts of several batches along the record axis -> one dict."""
    return {k: torch.cat([s[k] for s in stats_list]) for k in stats_list[0]}


# ---- composite loss ----

class CompositeLoss(torch.nn.Module):
    """Weighted sum of the head losses (ecg_heads.HEADS), each honouring its per-sample validity.

    forward(outputs, batch) -> dict with 'total', each head's term ('seg', 'grid', 'baseline', 'theta', 'signal')
    and the parts the heads name ('trace_ce', 'zero_ce', 'presence_bce', 'signal_l1', 'signal_snr_db')."""

    def __init__(self, weights=None):
        super().__init__()
        self.weights = {**ecg_heads.DEFAULT_LOSS_WEIGHTS, **(weights or {})}

    def forward(self, outputs, batch):
        terms = {}
        for head in ecg_heads.HEADS:
            terms[head.name], parts = head.loss(outputs, batch)
            terms.update(parts)
        terms['total'] = sum(self.weights[head.name] * terms[head.name] for head in ecg_heads.HEADS)
        return terms
