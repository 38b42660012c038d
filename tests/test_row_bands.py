"""Row bands: a 12x1 page (12 rows of one column, 8 input rows apart at 128 px, where neighbouring traces
cross) is read a second time in three bands of four rows, each cut from the upright page and fed at the full
input size. Training shows the model those crops; inference and evaluation cut them where the first reading
put the rows and replace those leads."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ecg_checkpoint
import ecg_decode
import ecg_heads
import ecg_model
import ecg_trainer
import evaluate
from conftest import classic_pages, run_cli, run_in_process
import page_image
import page_json
import page_reader
import production_dataset as pdx
import production_trainer
import speed
from ecg_page import LAYOUTS, LEADS, N_LEADS, row_bands, whole_pages, with_cabrera

BANDS = ('rows 1-4', 'rows 5-8', 'rows 9-12')


def test_a_12_row_page_has_three_row_bands_and_other_pages_none():
    """12x1 and its Cabrera and 50 mm/s twins get rows 1-4, 5-8 and 9-12, each keeping the channels and signs
    its rows have on the whole page; a page's layout is never chosen among bands."""
    for name in ('12x1', '12x1-Cabrera', '12x1@50mm/s', '12x1-Cabrera@50mm/s'):
        bands = row_bands(LAYOUTS[name])
        assert [band.name for band in bands] == [f'{name} {rows}' for rows in BANDS]
        assert all(LAYOUTS[band.name] == band and band.band_of == name for band in bands)
        channel, sign = LAYOUTS[name].lead_channels()
        for k, band in enumerate(bands):
            band_channel, band_sign = band.lead_channels()
            shown = band.shown_mask().any(1)
            assert np.array_equal(band_channel[shown], channel[shown]) and np.array_equal(band_sign, sign)
            assert sorted(band_channel[shown].tolist()) == list(range(4 * k, 4 * k + 4))   # its four places
    assert [LEADS[i] for i in np.flatnonzero(row_bands(LAYOUTS['12x1'])[1].shown_mask().any(1))] == \
        ['aVL', 'aVF', 'V1', 'V2']
    assert all(not row_bands(layout) for name, layout in LAYOUTS.items() if '12x1' not in name)
    names = ['3x4+II', '12x1', '12x1 rows 1-4', '12x1 rows 5-8']
    assert whole_pages(with_cabrera(names)) == ['3x4+II', '12x1', '3x4+II-Cabrera', '12x1-Cabrera']


def test_band_pixels_turn_the_page_as_derotate_turns_points():
    """The crop is cut from the page turned upright by the same turn that brings the JSON's points into the
    page's frame: a dot lands where derotate puts it."""
    rgb = np.full((300, 400, 3), 255, np.uint8)
    rgb[200:203, 300:303] = 0
    for theta in (-4.0, 3.0):
        crop = page_image.band_pixels(rgb, (theta, 50, 280))
        rows, cols = np.nonzero(crop[..., 0] < 128)
        x, y = ecg_heads.derotate(np.array([[301.0, 201.0]]), theta, (400, 300))[0]
        assert abs(cols.mean() - x) < 0.6 and abs(rows.mean() + 50 - y) < 0.6
        assert crop.shape == (230, 400, 3) and crop[0, 0].tolist() == [255, 255, 255]   # white beyond the corners


@pytest.fixture(scope='module')
def twelve_row_pages(tmp_path_factory):
    """Simulator 12x1 pages, turned by up to 3 degrees (classic style, 100 dpi)."""
    return classic_pages(tmp_path_factory.mktemp('twelve_rows'), 3, 21, '--layouts', '12x1', max_rotation=3)


def test_row_band_samples_cut_their_four_strips_from_the_upright_page(twelve_row_pages):
    """Each 12x1 page brings its three bands: upright (theta 0), four strips each, the strips farther apart in
    input rows than on the whole page, and their true rows decode back to the signal of those leads only."""
    refs, problems = pdx.find_samples(twelve_row_pages, twelve_row_pages)
    assert not problems and len(refs) == 3
    dataset = pdx.ECGImageDataset(refs, target_size=(128, 672), row_bands=True)
    assert [ref.band for ref in dataset.refs] == [None, 0, 1, 2] * 3
    assert dataset.layouts == {'12x1': 3, **{f'12x1 {rows}': 3 for rows in BANDS}}
    cached = pdx.ECGImageDataset(refs, target_size=(128, 672), row_bands=True, cache=True)
    assert cached.refs == dataset.refs and cached.layouts == dataset.layouts
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    names = [page_json.layout_name(i) for i in batch['layout_id']]
    assert names == ['12x1', *(f'12x1 {rows}' for rows in BANDS)] * 3
    assert (batch['theta'][0::4].abs() > 0.2).any() and (batch['theta'][1::4] == 0).all()
    pitch = batch['baseline_row'][:, :N_LEADS].nanmean(-1).diff(dim=1).nanmean(1)
    shown = batch['signal_mask'].any(-1)
    for k in range(3):
        assert (pitch[k + 1::4] > 2 * pitch[0::4]).all()
        assert shown[k + 1::4, 4 * k:4 * k + 4].all() and shown[k + 1::4].sum(1).eq(4).all()
        band = {key: v[k + 1::4] if torch.is_tensor(v) else v for key, v in batch.items()}
        metrics = ecg_trainer.signal_metrics(evaluate.round_trip(band), band['signal'], band['signal_mask'])
        assert metrics['pearson'] > 0.95 and metrics['snr_db'] > 10


def test_trained_bands_are_read_again_at_inference(twelve_row_pages, tmp_path):
    """The trainer trains the bands of 12x1 pages and its checkpoint names them; inference.py then reads a
    12x1 page a second time in them: the sidecar names both bands, every lead is written over the 10 s, and
    the bands' leads are the second reading's (they differ from a reading without the bands)."""
    run_cli('production_trainer.py', '--sim_root', twelve_row_pages, '--csv_root', twelve_row_pages,
            '--image_size', '64', '320', '--encoder', 'tu-regnetx_002', '--batch_size', '3', '--num_workers', '0',
            '--epochs', '1', '--val_fraction', '0', '--select_metric', 'latest', '--output_dir', tmp_path / 'runs')
    best = next((tmp_path / 'runs').glob('run_*')) / 'checkpoints' / 'best.pth'
    checkpoint = torch.load(best, map_location='cpu', weights_only=False)
    assert ecg_checkpoint.trained_layouts(checkpoint) == ['12x1', *(f'12x1 {rows}' for rows in BANDS)]
    assert ecg_checkpoint.readable_layouts(checkpoint) == ['12x1', '12x1-Cabrera']
    png = sorted(twelve_row_pages.rglob('*.png'))[0]
    run_cli('inference.py', '--image', png, '--checkpoint', best, '--output', tmp_path / 'banded.csv',
            '--layout', '12x1')
    sidecar = json.loads((tmp_path / 'banded.json').read_text())
    assert sidecar['layout'] == '12x1' and sidecar['row_bands'] == [f'12x1 {rows}' for rows in BANDS]
    banded = pd.read_csv(tmp_path / 'banded.csv')
    assert list(banded.columns) == LEADS and len(banded) == 5000 and banded.notna().all().all()
    checkpoint['layouts'] = ['12x1']
    torch.save(checkpoint, tmp_path / 'whole.pth')
    run_cli('inference.py', '--image', png, '--checkpoint', tmp_path / 'whole.pth', '--output', tmp_path / 'whole.csv',
            '--layout', '12x1')
    assert json.loads((tmp_path / 'whole.json').read_text())['row_bands'] == []
    whole = pd.read_csv(tmp_path / 'whole.csv')
    assert (banded - whole).abs().mean().gt(1e-4).all()      # every lead comes from a band's reading
    spreads = [{lead: v['row_spread_mv'] for lead, v in json.loads((tmp_path / f'{name}.json').read_text())['leads'].items()}
               for name in ('banded', 'whole')]
    assert all(spreads[0][lead] != spreads[1][lead] for lead in LEADS)   # and so does its confidence


def test_validation_evaluate_and_inference_read_the_same_signal(twelve_row_pages, tmp_path):
    """One page reader: the trainer's validation (what best.pth is chosen by), evaluate.py and inference.py
    read the same 12x1 pages to the same signals with the same checkpoint, row bands included (validation and
    evaluate to the last bit; inference.py's CSV to its 3 decimals, its batch norms folded); and the bands
    matter (a reading without them differs)."""
    refs, _ = pdx.find_samples(twelve_row_pages, twelve_row_pages)
    loader = torch.utils.data.DataLoader(pdx.ECGImageDataset(refs, target_size=(64, 320), read_scale=True, cache=True),
                                         batch_size=len(refs))
    torch.manual_seed(0)
    model = ecg_model.build_model('tu-regnetx_002').eval()
    trained = ['12x1', *(f'12x1 {rows}' for rows in BANDS)]
    cpu, no_amp = torch.device('cpu'), speed.amp_choice(torch.device('cpu'), 'off')

    def validate(bands):
        reader = page_reader.Reader(model, (64, 320), cpu, ['12x1'], bands)
        return production_trainer.validate(model, reader, loader, ecg_trainer.CompositeLoss(), no_amp)

    (banded, (batch, read)), (once, _) = validate(trained), validate(['12x1'])
    frame, stats, _ = evaluate.score_batches(page_reader.Reader(model, (64, 320), cpu, ['12x1'], trained), loader)
    scores = ecg_trainer.per_record(ecg_trainer.record_stats(read['signal'], batch['signal'], batch['signal_mask']))
    assert all(frame[name].tolist() == values.tolist() for name, values in scores.items())
    assert banded['pearson'] == pytest.approx(ecg_trainer.summarize(stats)['pearson'], abs=1e-6)
    assert abs(banded['pearson'] - once['pearson']) > 1e-3
    tuned = production_trainer.start_weight_scores(page_reader.Reader(model, (64, 320), cpu, ['12x1'], trained),
                                                   loader, no_amp)   # decoding is tuned on that same reading
    assert tuned[ecg_decode.PULSE_START_WEIGHT]['pearson'] == pytest.approx(banded['pearson'], abs=1e-6)

    checkpoint = {'model': model.state_dict(), 'model_args': model.model_args, 'layouts': trained,
                  'config': {'image_size': [64, 320]}}
    ecg_checkpoint.save(tmp_path / 'model.pth', checkpoint)
    run_in_process('inference.py', '--image', twelve_row_pages, '--checkpoint', tmp_path / 'model.pth',
                   '--output', f'{tmp_path / "csv"}/', '--layout', '12x1', check=True)
    for i, png in enumerate(batch['png']):
        written = pd.read_csv(tmp_path / 'csv' / f'{Path(png).stem}.csv').to_numpy().T
        shown = batch['signal_mask'][i].numpy()
        assert np.abs(written - read['signal'][i].numpy())[shown].max() < 2e-3
        assert json.loads((tmp_path / 'csv' / f'{Path(png).stem}.json').read_text())['row_bands'] == list(trained[1:])
