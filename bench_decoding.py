"""Decoding ablations on one trained checkpoint: the same network maps decoded several ways, scored side by
side on held-out pages (Pearson, Kaggle SNR), so each row of the README's ablation table costs no training.

    python bench_decoding.py --checkpoint bench_out/quality/runs/RUN/checkpoints/best.pth \
        --sim_root bench_out/quality/heldout_data --csv_root bench_out/quality/heldout_data

Variants:
    current             what evaluate.py and inference.py do
    presence_start      the time start from the presence maps alone, not held near where the pulses end
    pulse_weight_W      the start held near the pulses' end with W per column (ecg_decode.PULSE_START_WEIGHTS_TRIED)
                        instead of the checkpoint's own weight (the trainer's pick; older ones: PULSE_START_WEIGHT)
    start_box           the time start of the earlier decoder (commit 79676fc): one 10 s box over the columns
                        where any strip is present, instead of every strip's two ends
    topk_K              top-k soft-argmax: each column's row read from the K rows either side of its argmax
                        (Kaggle 2025 teams gained 0.28 dB), instead of the full softmax
    zero_per_strip      each strip's 0 mV row is the median of its columns' rows (the line is straight in the
                        page frame), instead of read column by column
    no_limb_fit         each limb lead as its own strip shows it, without the least-squares fit of all limb strips
                        shown at once by Einthoven's and Goldberger's laws (ecg_decode.fit_limb_leads)
    true_zero, true_trace, true_scale
                        oracles, not decoders: the true 0 mV rows, trace rows or px per mV put in place of
                        the read ones, so the table shows which reading the remaining error comes from
Each variant also reports how far its time start lies from the truth (mean, in input columns), and the
calibration pulses' end is scored alone. Writes bench_out/bench_decoding.json.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import ecg_checkpoint
import ecg_cli
import ecg_decode
import ecg_trainer
import production_dataset as pdx
from ecg_page import LEADS, SECONDS

TOPK = (2, 5, 8)
LEAD_I = LEADS.index('I')  # trace channel of lead I, which opens the first column of every layout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', type=Path, default=ecg_checkpoint.STARTER)
    p.add_argument('--sim_root', type=Path, required=True)
    p.add_argument('--csv_root', type=Path, required=True)
    p.add_argument('--max_samples', type=int, default=None)
    p.add_argument('--out', type=Path, default=Path('bench_out/bench_decoding.json'))
    return p.parse_args(argv)


def box_start_spans(presence, place, page_aspect, px_per_s=None, start=None, start_weight=None):
    """The earlier time start (commit 79676fc): where one 10 s box of whole columns best covers the columns
    in which any strip is present, refined by a parabola through the best three starts (no pulse start)."""
    batch, _, width = presence.shape
    px_per_s = ecg_decode.page_px_per_s(width, page_aspect, px_per_s)
    box = torch.round(SECONDS * px_per_s).long().clamp(1, width)
    covered = presence.sigmoid().amax(1) - 0.5
    cumulative = F.pad(covered.cumsum(-1), (1, 0))
    starts = torch.arange(width)
    ends = (starts[None] + box[:, None]).clamp(max=width)
    score = cumulative.gather(1, ends) - cumulative[:, :width]
    score = score - ecg_decode.START_PRIOR_WEIGHT * (starts[None] - ecg_decode.TRACE_START * width).abs()
    best = score.argmax(1)
    left, mid, right = (score.gather(1, (best + d).clamp(0, width - 1)[:, None])[:, 0] for d in (-1, 0, 1))
    curvature = left - 2 * mid + right   # sub-column start: the vertex of the parabola through three scores
    shift = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-6), torch.zeros_like(mid))
    x0 = (best.float() + shift.clamp(-0.5, 0.5)).view(-1, 1, 1)
    return x0 + torch.nan_to_num(place, nan=0.0) * px_per_s.view(-1, 1, 1)


def topk_soft_argmax(k, full=ecg_decode.column_soft_argmax):
    """column_soft_argmax restricted to the 2k + 1 rows around each column's argmax."""
    def read(logits):
        _, log_prob = full(logits)
        centre = logits.float().argmax(2, keepdim=True)
        rows = (centre + torch.arange(-k, k + 1).view(1, 1, -1, 1)).clamp(0, logits.shape[-2] - 1)
        weight = torch.softmax(log_prob.gather(2, rows), dim=2)
        return (weight * rows.float()).sum(2), log_prob
    return read


def without_pulse_start(prior=ecg_decode.start_prior):
    """start_prior as if no page showed a pulse."""
    return lambda start, batch, width, device, start_weight=None: prior(None, batch, width, device)


def strip_median(rows, span):
    """(B, 15, W) rows -> each channel's median over the columns of its span, broadcast back (B, 15, W)."""
    columns = torch.arange(rows.shape[-1], device=rows.device).view(1, 1, -1)
    inside = (columns >= span[..., :1]) & (columns <= span[..., 1:]) & torch.isfinite(rows)
    median = torch.nanquantile(torch.where(inside, rows, torch.nan), 0.5, dim=-1, keepdim=True)
    return torch.where(torch.isfinite(median), median, rows).expand_as(rows)


def with_zero_per_strip(read=ecg_decode.read_channels):
    return lambda trace_rows, zero_rows, window, span, px_per_mv: read(
        trace_rows, strip_median(zero_rows, span), window, span, px_per_mv)


def oracle(part, read=ecg_decode.read_channels):
    """read_channels with one reading replaced by the truth of the batch being decoded."""
    def read_with_truth(batch):
        def patched(trace_rows, zero_rows, window, span, px_per_mv):
            if part == 'zero':
                zero_rows = torch.where(torch.isfinite(batch['baseline_row']), batch['baseline_row'], zero_rows)
            elif part == 'trace':
                centre = (batch['trace_top'] + batch['trace_bot']) / 2
                trace_rows = torch.where(torch.isfinite(centre), centre, trace_rows)
            else:
                px_per_mv = batch['px_per_mv'].to(px_per_mv.dtype)
            return read(trace_rows, zero_rows, window, span, px_per_mv)
        return {'read_channels': patched}
    return read_with_truth


VARIANTS = {'current': {}, 'presence_start': {'start_prior': without_pulse_start()},
            **{f'pulse_weight_{w:g}': {'start_weight': w} for w in ecg_decode.PULSE_START_WEIGHTS_TRIED},
            'start_box': {'layout_spans': box_start_spans},
            **{f'topk_{k}': {'column_soft_argmax': topk_soft_argmax(k)} for k in TOPK},
            'zero_per_strip': {'read_channels': with_zero_per_strip()}, 'no_limb_fit': {'LIMB_FIT': False},
            **{f'true_{part}': oracle(part) for part in ('zero', 'trace', 'scale')}}


@torch.no_grad()
def network_maps(model, loader, layouts):
    """One forward per batch: (batch, raw outputs) kept, so every variant decodes the very same maps."""
    return [(batch, model(batch['image'], ecg_decode.read_geometry(batch, layouts))) for batch in loader]


def score_variant(maps, patches, own):
    """Decode every batch with ecg_decode's functions patched (patches: a dict, or batch -> dict for the
    oracles; its 'start_weight' replaces the checkpoint's own) -> Pearson, SNR dB. own: the checkpoint's
    trained layouts and start weight, as evaluate.py decodes with them."""
    stats, start_errors = [], []
    for batch, out in maps:
        decoded = decode_patched(out, batch, patches(batch) if callable(patches) else patches, own)
        stats.append(ecg_trainer.record_stats(decoded['signal'], batch['signal'], batch['signal_mask']))
        start_errors.append(start_error(decoded['trace_rows']['span'], batch))
    summary = ecg_trainer.summarize(ecg_trainer.concat_stats(stats))
    return {'pearson': summary['pearson'], 'snr_db': summary['snr_db'],
            'start_error_columns': mean_finite(torch.cat(start_errors))}


def decode_patched(out, batch, patches, own):
    patches = dict(patches)
    start_weight = patches.pop('start_weight', own['start_weight'])
    saved = {name: getattr(ecg_decode, name) for name in patches}
    try:
        for name, function in patches.items():
            setattr(ecg_decode, name, function)
        geometry = replace(ecg_decode.read_geometry(batch, own['layouts']), theta=out['decode_theta'],
                        start_weight=start_weight)
        return ecg_decode.decode_outputs(out, geometry)
    finally:
        for name, function in saved.items():
            setattr(ecg_decode, name, function)


def start_error(columns, batch):
    """(B,) |decoded - true| time start in input columns: where lead I's strip begins, at t = 0 of the page's
    time axis on every layout of ecg_page.LAYOUTS. columns: (B, 15, 2) spans, or (B,) starts."""
    found = columns[:, LEAD_I, 0] if columns.dim() == 3 else columns
    return (found.float() - batch['trace_span'][:, LEAD_I, 0]).abs()


def mean_finite(values):
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float('nan')


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, checkpoint = ecg_checkpoint.load_model(args.checkpoint, torch.device('cpu'))
    refs, problems = pdx.find_samples(args.sim_root, args.csv_root, args.max_samples)
    dataset = pdx.ECGImageDataset(refs, target_size=ecg_checkpoint.input_size(checkpoint), read_scale=True)
    if len(dataset) == 0:
        raise ecg_cli.InputError(f'{args.sim_root}: no usable held-out page')
    own = {'layouts': ecg_checkpoint.readable_layouts(checkpoint), 'start_weight': model.pulse_start_weight}
    maps = network_maps(model, DataLoader(dataset, batch_size=4), own['layouts'])
    results = {name: score_variant(maps, patches, own) for name, patches in VARIANTS.items()}
    pulse_ends = torch.cat([start_error(batch['read_start'], batch) for batch, _ in maps])
    pulse = {'pages': int(torch.isfinite(pulse_ends).sum()), 'start_error_columns': mean_finite(pulse_ends)}
    print(f'{len(dataset)} pages, checkpoint {args.checkpoint} (its pulse start weight: '
          f'{model.pulse_start_weight or ecg_decode.PULSE_START_WEIGHT:g})')
    for name, row in results.items():
        print(f'{name:16s} pearson {row["pearson"]:.3f}  SNR {row["snr_db"]:.2f} dB  '
              f'time start off by {row["start_error_columns"]:.2f} columns')
    print(f'the calibration pulses\' end alone, on the {pulse["pages"]} pages where one was found: '
          f'off by {pulse["start_error_columns"]:.2f} columns')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({'checkpoint': str(args.checkpoint), 'pages': len(dataset), 'variants': results,
                                    'pulse_end': pulse}, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
