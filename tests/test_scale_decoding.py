"""The scale comes from the page, not its border: the ecg-image-kit fixture padded, cropped to its content and
rescaled, decoded through the model's decoding path (the round trip) with the scale read_scale finds."""
import json
import math

import cv2
import numpy as np
import pytest
import torch

import ecg_decode
import ecg_signals
import page_image
import production_dataset as pdx
from conftest import FIXTURE
from ecg_page import RHYTHM

SIZE = (256, 1344)


def write_page(rgb, meta, folder, name, shift_xy=(0.0, 0.0), factor=1.0):
    """The page as a new image whose JSON follows it: coordinates moved by shift and scaled by factor."""
    meta = json.loads(json.dumps(meta))
    meta.update(width=rgb.shape[1], height=rgb.shape[0], x_grid=meta['x_grid'] * factor,
                y_grid=meta['y_grid'] * factor, pad_inches=0)
    for lead in meta['leads']:
        lead['plotted_pixels'] = [[(r + 0.5) * factor - 0.5 + shift_xy[1], (c + 0.5) * factor - 0.5 + shift_xy[0]]
                                  for r, c in lead['plotted_pixels']]
    cv2.imwrite(str(folder / f'{name}.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / f'{name}.json').write_text(json.dumps(meta))
    return folder / f'{name}.png'


def variants(stem, folder):
    """plain, padded by 12 % of the page on every side, cropped to its traces + 3 %, rescaled 0.7 and 1.3."""
    rgb = page_image.read_rgb(FIXTURE / 'images' / f'{stem}.png')
    meta = json.loads((FIXTURE / 'images' / f'{stem}.json').read_text())
    height, width = rgb.shape[:2]
    pad = round(0.12 * height)
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    points = np.concatenate([np.asarray(lead['plotted_pixels']) for lead in meta['leads']])
    margin = round(0.03 * height)
    top, left = (np.floor(points.min(0)) - margin).astype(int).clip(0)
    bottom, right = (np.ceil(points.max(0)) + margin).astype(int)
    cropped = np.ascontiguousarray(rgb[top:bottom, left:right])
    pages = {'plain': write_page(rgb, meta, folder, f'{stem}-plain'),
             'padded': write_page(padded, meta, folder, f'{stem}-padded', (pad, pad)),
             'cropped': write_page(cropped, meta, folder, f'{stem}-cropped', (-left, -top))}
    for factor in (0.7, 1.3):
        resized = cv2.resize(rgb, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)
        pages[f'x{factor}'] = write_page(resized, meta, folder, f'{stem}-x{factor}', factor=factor)
    return pages


def decoded(png, scale_from):
    """Round trip of one page: truth rows decoded by the model's path, the span found from presence as the
    model does (layout_spans), the scale from the page (read_scale), its border or the JSON (truth) ->
    (amplitude ratio decoded / true signal, time start error in ms, px per mV used / true)."""
    signals = FIXTURE / 'signals'
    stem = png.stem.split('-')[0]
    fs, sig_len = ecg_signals.read_train_csv(signals)[stem]
    ref = pdx.SampleRef(stem, png, png.with_suffix('.json'), signals / stem / f'{stem}.csv', fs, sig_len)
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in pdx.build_sample(ref, SIZE, scale=True).items()
             if k != 'style'}
    presence = torch.where(torch.isfinite(batch['trace_top']), 10.0, -10.0)
    centre = (batch['trace_top'] + batch['trace_bot']) / 2
    true_px_per_s = float((batch['trace_span'][0, RHYTHM, 1] - batch['trace_span'][0, RHYTHM, 0]) /
                          (batch['trace_window'][0, RHYTHM, 1] - batch['trace_window'][0, RHYTHM, 0]))
    geometry = {'read': vars(ecg_decode.read_geometry(batch)), 'border': {'page_aspect': batch['page_aspect']},
                'truth': {'page_aspect': batch['page_aspect'], 'px_per_mv': batch['px_per_mv'],
                          'px_per_s': torch.tensor([true_px_per_s])}}[scale_from]
    px_per_mv = ecg_decode.page_px_per_mv(SIZE[0], 1, 'cpu', geometry.get('px_per_mv'))
    told = ecg_decode.Geometry(px_per_mv=px_per_mv, page_aspect=batch['page_aspect'], px_per_s=geometry.get('px_per_s'))
    signal, _ = ecg_decode.decode_rows(centre, batch['baseline_row'], presence, told)
    mask = batch['signal_mask']
    truth = batch['signal']
    ratio = float((signal * truth * mask).sum() / (truth * truth * mask).sum())
    px_per_s = ecg_decode.page_px_per_s(SIZE[1], batch['page_aspect'], geometry.get('px_per_s'))
    window = ecg_decode.default_windows(1, 'cpu')
    span = ecg_decode.layout_spans(presence, window, batch['page_aspect'], geometry.get('px_per_s'))
    start_ms = 1000 * float(span[0, RHYTHM, 0] - batch['trace_span'][0, RHYTHM, 0]) / true_px_per_s
    assert math.isfinite(float(px_per_s[0]))
    return ratio, start_ms, float(px_per_mv[0] / batch['px_per_mv'][0])


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp('scaled')
    return {stem: variants(stem, folder) for stem in ('fx2048-0001', 'fx1024-0002')}


@pytest.mark.parametrize('kind', ['plain', 'padded', 'cropped', 'x0.7', 'x1.3'])
def test_amplitude_and_time_start_come_from_the_page(pages, kind):
    """Amplitude within 3 % of what the true scale gives (the round trip's own bias aside), time start
    within 20 ms."""
    for stem, by_kind in pages.items():
        ratio, start_ms, scale = decoded(by_kind[kind], 'read')
        bound_ratio, _, _ = decoded(by_kind[kind], 'truth')
        assert scale == pytest.approx(1.0, abs=0.03), (stem, kind, scale)
        assert ratio / bound_ratio == pytest.approx(1.0, abs=0.03), (stem, kind, ratio, bound_ratio)
        assert abs(start_ms) <= 20, (stem, kind, start_ms)


def test_the_page_border_gets_cropped_pages_wrong_and_padding_is_cut_off(pages):
    """What the scale read from the page fixes: the border's scale is off on a page cropped to its traces. A
    page padded with paper is read cut back to its grid (crop_to_grid), so there even the border is right."""
    ratio, _, scale = decoded(pages['fx2048-0001']['cropped'], 'border')
    bound_ratio, _, _ = decoded(pages['fx2048-0001']['cropped'], 'truth')
    assert abs(scale - 1) > 0.15 and abs(ratio / bound_ratio - 1) > 0.15
    _, _, scale = decoded(pages['fx2048-0001']['padded'], 'border')
    assert scale == pytest.approx(1.0, abs=0.03)
