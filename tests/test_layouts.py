"""Page layouts as data (ecg_page.LAYOUTS) and reading them back: which strips each layout draws, where
it places them and which seconds they show; the layout and the rhythm strips' leads found from the model's
presence maps and from what the strips show; each rhythm strip (up to three) filling its own lead."""
import json
from dataclasses import replace
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

import ecg_decode
import ecg_trainer
import evaluate
import inference
import page_json
from conftest import classic_pages, run_cli
import production_dataset as pdx
from ecg_page import (FS, LAYOUTS, LEADS, N_SAMPLES, N_TRACES, RHYTHM, STANDARD, page_layout, whole_pages,
                      with_cabrera)

WIDTH = 672
PX_PER_S = 60.0          # input columns per second of a test page



def read_from_truth(batch):
    """The geometry a page shows (its scale, speed, shape) to choose among every layout, for decoding the true
    rows of its targets."""
    return ecg_decode.Geometry(layouts=list(LAYOUTS), px_per_mv=batch['read_px_per_mv'],
                               page_aspect=batch['page_aspect'], px_per_s=batch['read_px_per_s'],
                               paper_speed=batch['read_speed_mm_s'])

def test_ecg_image_kit_two_column_page_restarts_each_column_at_zero():
    """ecg-image-kit --num_columns 2 draws V1 I V2 II V3 III | V4 aVR V5 aVL V6 aVF, both columns from t = 0."""
    six = LAYOUTS['6x2+II']
    windows, places = six.strip_seconds()
    v4 = LEADS.index('V4')
    assert windows[v4].tolist() == pytest.approx([0.0, 5.0 - 1 / FS])      # shows the first 5 s ...
    assert places[v4].tolist() == pytest.approx([5.0, 10.0 - 1 / FS])     # ... in the right half of the page
    mask = six.shown_mask()
    assert mask[v4, :int(5 * FS)].all() and not mask[v4, int(5 * FS):].any()
    assert mask[LEADS.index('II')].all()
    assert LAYOUTS['12x1'].shown_mask().all() and not np.isfinite(LAYOUTS['12x1'].strip_seconds()[0][RHYTHM]).any()
    assert LAYOUTS['3x4'].rhythm_leads == [-1, -1, -1]
    assert LAYOUTS['3x4+V1'].rhythm_leads == [LEADS.index('V1'), -1, -1]
    three = LAYOUTS['3x4+II+V1+V5']
    assert three.rhythm_leads == [LEADS.index(lead) for lead in ('II', 'V1', 'V5')]
    assert np.isfinite(three.strip_seconds()[0]).all() and three.shown_mask()[[1, 6, 10]].all()


@pytest.mark.parametrize('name', ['3x4+II', '3x4', '3x4+V1', '3x4+II+V1+V5', '6x2+II', '12x1', '3x4+II@50mm/s',
                                  '12x1@50mm/s'])
def test_a_page_is_named_by_the_strips_it_draws(name):
    layout = LAYOUTS[name]
    windows, _ = layout.strip_seconds()
    strips = [(LEADS[c] if c < RHYTHM else layout.rhythm[c - RHYTHM], windows[c, 0], windows[c, 1], c >= RHYTHM)
              for c in range(N_TRACES) if np.isfinite(windows[c]).all()]
    assert page_layout(strips, layout.paper_speed_mm_s) == name
    assert page_layout(strips[:-1], layout.paper_speed_mm_s) != name   # one strip fewer is another page


def test_a_50_mm_s_page_shows_the_first_5_s_on_the_same_paper():
    """Twice the paper speed: the same places on the page, each strip half the seconds; 12x1 at 50 mm/s
    draws the windows 6x2 draws at 25 mm/s, and only the paper speed tells them apart."""
    slow, fast = LAYOUTS['3x4+II'], LAYOUTS['3x4+II@50mm/s']
    (w_slow, p_slow), (w_fast, p_fast) = slow.strip_seconds(), fast.strip_seconds()
    v4 = LEADS.index('V4')
    assert w_fast[v4].tolist() == pytest.approx([3.75, 5.0 - 1 / FS]) and w_fast[RHYTHM, 1] == pytest.approx(5 - 1 / FS)
    np.testing.assert_allclose(p_fast * fast.paper_speed_mm_s, p_slow * slow.paper_speed_mm_s, atol=0.1)  # mm
    mask = fast.shown_mask()
    assert mask[LEADS.index('II'), :int(5 * FS)].all() and not mask[:, int(5 * FS):].any()
    assert set(LAYOUTS['12x1@50mm/s'].strip_seconds()[0][:12, 1]) == set(LAYOUTS['6x2'].strip_seconds()[0][:12, 1])


def test_the_fixture_pages_are_the_standard_layout(fixture_dirs):
    sim_root, csv_root = fixture_dirs
    refs, _ = pdx.find_samples(sim_root, csv_root)
    assert {pdx.check_sample(ref) for ref in refs} == {STANDARD.name}


def drawn_presence(name, x0, batch=1):
    """(B, 13, W) presence logits of a page of layout `name` whose traces start at column x0."""
    _, places, _ = ecg_decode.layout_strips([LAYOUTS[name]] * batch, 'cpu')
    cols = torch.arange(WIDTH).float()
    first, last = (x0 + places[..., :1] * PX_PER_S).round(), (x0 + places[..., 1:] * PX_PER_S).round()
    inside = (cols >= first) & (cols <= last)           # NaN places compare False: no strip
    return torch.where(inside, 10.0, -10.0)


@pytest.mark.parametrize('name', ['3x4+II', '3x4', '3x4+II+V1+V5', '6x2+II', '6x2', '12x1'])
def test_layout_and_time_start_are_found_from_presence(name):
    x0 = 37.3
    presence = drawn_presence(name, x0)
    aspect, px_per_s = torch.tensor([11 / 8.5]), torch.tensor([PX_PER_S])
    chosen = ecg_decode.choose_layouts(presence, list(LAYOUTS), aspect, px_per_s)
    assert chosen[0].rows == LAYOUTS[name].rows and len(chosen[0].rhythm) == len(LAYOUTS[name].rhythm)
    _, places, _ = ecg_decode.layout_strips(chosen, 'cpu')
    start, _ = ecg_decode.fit_start(presence, places, aspect, px_per_s)
    assert float(start) == pytest.approx(x0, abs=0.6)


def test_layouts_at_a_speed_no_page_shows_are_left_out_of_the_fit():
    """choose_layouts fits only the layouts at a paper speed some page of the batch shows (the others lose by
    SPEED_MISMATCH anyway): the same choice as fitting them all, at half the cost. Where no candidate is at a
    page's speed, every candidate is fitted."""
    pages = ['6x2+II', '3x4+II', '12x1', '3x4+II@50mm/s']   # the last: 3x4+II paper with a pulse twice as wide
    presence = torch.cat([drawn_presence(name.split('@')[0], 30.0) for name in pages])
    aspect, px_per_s = torch.full((4,), 11 / 8.5), torch.tensor([PX_PER_S] * 3 + [2 * PX_PER_S])
    speeds = torch.tensor([25.0, 25.0, float('nan'), 50.0])
    fitted = []
    real_fit = ecg_decode.fit_start
    with patch.object(ecg_decode, 'fit_start', lambda presence, places, *a: fitted.append(places) or real_fit(
            presence, places, *a)):
        for batch in (slice(0, 3), slice(0, 4)):
            fitted.clear()
            chosen = ecg_decode.choose_layouts(presence[batch], whole_pages(LAYOUTS), aspect[batch], px_per_s[batch],
                                              speeds[batch])
            assert len(fitted) == (6 if batch.stop == 3 else 12)     # 12 plans: 6 at each speed
            with patch.object(ecg_decode, 'at_page_speeds', lambda layouts, page_speed: layouts):
                assert ecg_decode.choose_layouts(presence[batch], whole_pages(LAYOUTS), aspect[batch],
                                                px_per_s[batch], speeds[batch]) == chosen
            assert [layout.name for layout in chosen] == pages[batch]
    only_slow = ecg_decode.at_page_speeds([LAYOUTS['3x4+II']], torch.tensor([50.0]))
    assert [layout.name for layout in only_slow] == ['3x4+II']


def test_pages_of_a_layout_the_model_was_not_trained_on_are_named_and_warned_of(capsys):
    """untrained_fits names the page whose strips fit only an untrained layout (a rhythm lead of its own does
    not count: same strips); inference's auto mode puts a warning on stderr and in that page's sidecar."""
    pages = ['6x2+II', '3x4+II', '3x4+V1', '12x1']
    presence = torch.cat([drawn_presence(name, 30.0) for name in pages])
    aspect, px_per_s = torch.full((4,), 11 / 8.5), torch.full((4,), PX_PER_S)
    assert ecg_decode.untrained_fits(presence, ['3x4+II'], aspect, px_per_s) == ['6x2+II', None, None, '12x1']
    assert ecg_decode.untrained_fits(presence, ['3x4+II', '6x2+II', '12x1'], aspect, px_per_s) == [None] * 4
    # the same paper with a pulse twice as wide: 50 mm/s, a layout the model never saw (same columns per
    # second of the page: px_per_s is read at the page's own speed)
    fast = ecg_decode.untrained_fits(presence[1:2], ['3x4+II'], aspect[:1], 2 * px_per_s[:1], torch.tensor([50.0]))
    assert fast == ['3x4+II@50mm/s']
    reports = [{'image': f'{name}.png', 'layout': '3x4+II'} for name in pages]
    outputs = {'trace_rows': {'presence': presence}, 'signal': torch.zeros(4, 12, N_SAMPLES)}
    inference.warn_untrained_layouts(outputs, {'page_aspect': aspect, 'read_px_per_s': px_per_s}, reports, ['3x4+II'])
    assert 'fit 6x2+II best' in reports[0]['layout_warning'] and 'read as 3x4+II' in reports[0]['layout_warning']
    assert 'layout_warning' not in reports[1] and 'layout_warning' not in reports[2]
    err = capsys.readouterr().err
    assert 'warning: 6x2+II.png' in err and 'warning: 12x1.png' in err and '3x4+V1.png' not in err


def test_a_model_widened_from_one_rhythm_channel_warns_of_no_standard_page():
    """The starter (one rhythm channel, copied to three when loaded) sees its rhythm strip in all three rhythm
    channels: along a standard page's rhythm strip they fit three rhythm strips, yet a model never trained on
    such pages was never taught what those channels show. Every ecg-image-kit page read with the starter had
    been warned of as 3x4+II+V1+V5. A model taught three rhythm strips still tells their pages apart."""
    standard = drawn_presence('3x4+II', 30.0)
    widened = standard.clone()
    widened[:, RHYTHM + 1:] = standard[:, RHYTHM:RHYTHM + 1]
    aspect, px_per_s = torch.full((1,), 11 / 8.5), torch.full((1,), PX_PER_S)
    assert ecg_decode.choose_layouts(widened, list(LAYOUTS), aspect, px_per_s)[0].name == '3x4+II+V1+V5'
    assert ecg_decode.untrained_fits(widened, ['3x4+II'], aspect, px_per_s) == [None]
    assert ecg_decode.untrained_fits(widened, ['3x4+II', '3x4+II+V1+V5'], aspect, px_per_s) == [None]
    assert ecg_decode.untrained_fits(drawn_presence('3x4+II+V1+V5', 30.0), ['6x2+II', '3x4+II+V1+V5@50mm/s'], aspect,
                                    px_per_s) == ['3x4+II+V1+V5']


def test_the_rhythm_strips_lead_is_told_by_what_it_shows():
    """Same strips, rhythm strip of V1: the lead whose short strip matches it wins, and fills all 10 s."""
    rng = np.random.default_rng(0)
    t = np.arange(N_SAMPLES) / FS
    truth = np.stack([np.sin(2 * np.pi * (0.7 + 0.3 * k) * t + rng.uniform(0, 6)) for k in range(12)])
    windows, _ = STANDARD.strip_seconds()
    sampled = np.zeros((1, N_TRACES, N_SAMPLES), np.float32)
    valid = np.zeros((1, N_TRACES, N_SAMPLES), bool)
    for c in range(N_TRACES):
        lead = c if c < RHYTHM else LEADS.index('V1')
        valid[0, c] = (t >= windows[c, 0] - 1e-9) & (t <= windows[c, 1] + 1e-9)
        sampled[0, c] = np.where(valid[0, c], truth[lead], 0)
    sampled, valid = torch.from_numpy(sampled), torch.from_numpy(valid)
    names = ['3x4+II', '3x4+V1', '3x4+V5']
    found, _ = ecg_decode.pick_layouts(sampled, valid, [STANDARD], names)
    assert found[0].name == '3x4+V1'
    signal, shown = ecg_decode.channels_to_leads(sampled, valid, torch.tensor([found[0].rhythm_leads]))
    assert shown[0, LEADS.index('V1')].all() and not shown[0, LEADS.index('II'), int(2.5 * FS):].any()
    np.testing.assert_allclose(signal[0, LEADS.index('V1')].numpy(), truth[LEADS.index('V1')], atol=1e-6)
    _, no_rhythm = ecg_decode.channels_to_leads(sampled, valid, torch.tensor([[-1, -1, -1]]))
    assert not no_rhythm[0, LEADS.index('V1'), :int(5 * FS)].any()


def test_inference_layout_flag_masks_what_the_page_shows_and_warns_off_training(tmp_path, fixture_dirs):
    """--layout 6x2+II on a model trained on the standard page: a warning, and the CSV holds each lead's
    first 5 s (NaN after), II all 10 s; the sidecar names the layout."""
    sim_root, _ = fixture_dirs
    png = sorted(sim_root.rglob('*.png'))[0]
    out = tmp_path / 'six.csv'
    result = run_cli('inference.py', '--image', str(png), '--output', str(out), '--layout', '6x2+II')
    assert 'trained on 3x4+II only' in result.stderr
    signal = pd.read_csv(out).to_numpy()
    finite = np.isfinite(signal)
    assert finite[:, LEADS.index('II')].all()
    assert finite[:int(5 * FS), LEADS.index('V4')].all() and not finite[int(5 * FS):, LEADS.index('V4')].any()
    assert json.loads(out.with_suffix('.json').read_text())['layout'] == '6x2+II'


@pytest.fixture(scope='module')
def layout_pages(tmp_path_factory):
    """Simulator pages of the non-standard layouts and gains (classic style, 200 dpi, upright)."""
    return classic_pages(tmp_path_factory.mktemp('layouts'), 6, 3, '--gains', 5, 20, '--speeds', 25, 50,
                         '--layouts', '6x2+II', '12x1', '3x4', '3x4+V1', dpi=200)


def test_simulated_layouts_round_trip_through_the_layout_search(layout_pages):
    """Every simulated page is named by its JSON's layout; decoding its true rows with the layout found
    from its presence (the rhythm lead by content, the paper speed by the pulse) and the scale read from its
    grid and pulse (gain 5 or 20 mm/mV, 25 or 50 mm/s) gives the signal back."""
    refs, problems = pdx.find_samples(layout_pages, layout_pages)
    assert not problems and len(refs) == 6
    meta = {ref.record_id: json.loads(ref.json.read_text()) for ref in refs}
    dataset = pdx.ECGImageDataset(refs, target_size=(128, 672), read_scale=True)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert [page_json.layout_name(i) for i in batch['layout_id']] == [meta[r]['layout'] for r in batch['record_id']]
    assert {meta[r]['gain_mm_mv'] for r in batch['record_id']} == {5.0, 20.0}
    np.testing.assert_allclose(batch['read_px_per_mv'], batch['px_per_mv'], rtol=0.03)   # gain from the pulse
    assert torch.equal(batch['read_gain_mm_mv'], batch['gain_mm_mv'])
    assert torch.equal(batch['read_speed_mm_s'], batch['paper_speed_mm_s'])
    assert set(batch['paper_speed_mm_s'].tolist()) == {25.0, 50.0}
    # the traces start where the pulses end: lead I opens the first column on every one of these layouts
    np.testing.assert_allclose(batch['read_start'], batch['trace_span'][:, LEADS.index('I'), 0], atol=0.4)
    presence = torch.where(torch.isfinite(batch['trace_top']), 10.0, -10.0)
    centre = (batch['trace_top'] + batch['trace_bot']) / 2
    signal, _, used = ecg_decode.decode_layouts(centre, batch['baseline_row'], presence, read_from_truth(batch))
    assert used['layouts'] == [meta[r]['layout'] for r in batch['record_id']]
    metrics = ecg_trainer.signal_metrics(signal, batch['signal'], batch['signal_mask'])
    assert metrics['pearson'] > 0.9 and metrics['snr_db'] > 10


def test_a_cabrera_page_relabels_the_standard_places():
    """3x4+II-Cabrera draws aVL I -aVR down the first column and II aVF III down the second, in the places
    and channels of I II III and aVR aVL aVF; aVR is drawn inverted and labelled -aVR."""
    cabrera = LAYOUTS['3x4+II-Cabrera']
    assert [row[:2] for row in cabrera.rows] == [('aVL', 'II'), ('I', 'aVF'), ('aVR', 'III')]
    assert cabrera.label('aVR') == '-aVR' and cabrera.sign('aVR') == -1 and STANDARD.label('aVR') == 'aVR'
    channel, sign = cabrera.lead_channels()
    assert [LEADS[channel[LEADS.index(lead)]] for lead in ('aVL', 'I', 'aVR', 'II', 'aVF', 'III')] == \
        ['I', 'II', 'III', 'aVR', 'aVL', 'aVF']
    assert sign.tolist() == [-1.0 if lead == 'aVR' else 1.0 for lead in LEADS]
    np.testing.assert_array_equal(cabrera.strip_seconds()[0], STANDARD.strip_seconds()[0])   # same strips
    assert ecg_decode.strip_plan(cabrera) == ecg_decode.strip_plan(STANDARD)
    mask = cabrera.shown_mask()   # what the page shows of each lead: aVL now in the first 2.5 s
    assert mask[LEADS.index('aVL'), :int(2.5 * FS)].all() and not mask[LEADS.index('aVL'), int(2.5 * FS):].any()
    assert with_cabrera(['3x4+II', '6x2+II', '12x1@50mm/s']) == ['3x4+II', '6x2+II', '12x1@50mm/s',
                                                                '3x4+II-Cabrera', '12x1-Cabrera@50mm/s']


def channel_readings(layout, truth):
    """(1, 15, 5000) channels and their shown masks as a page of `layout` draws the leads `truth` (12, 5000)."""
    windows, _ = layout.strip_seconds()
    channel, sign = layout.lead_channels()
    t = np.arange(N_SAMPLES) / FS
    sampled = np.zeros((1, N_TRACES, N_SAMPLES), np.float32)
    valid = np.zeros((1, N_TRACES, N_SAMPLES), bool)
    for lead in range(12):
        c = channel[lead]
        valid[0, c] = (t >= windows[c, 0] - 1e-9) & (t <= windows[c, 1] + 1e-9)
        sampled[0, c] = np.where(valid[0, c], sign[lead] * truth[lead], 0)
    for k, lead in enumerate(layout.rhythm):
        valid[0, RHYTHM + k] = True
        sampled[0, RHYTHM + k] = truth[LEADS.index(lead)]
    return torch.from_numpy(sampled), torch.from_numpy(valid)


def heart_vector_leads(rng):
    """(12, 5000): six limb leads made from I and II by Einthoven's and Goldberger's laws, six chest leads."""
    t = np.arange(N_SAMPLES) / FS
    lead_i, lead_ii = (np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.3 * np.sin(2 * np.pi * 7 * f * t)
                       for f in (1.1, 1.3))
    limb = np.stack([lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2,
                     lead_ii - lead_i / 2])
    chest = np.stack([np.sin(2 * np.pi * (0.7 + 0.3 * k) * t + rng.uniform(0, 6)) for k in range(6)])
    return np.concatenate([limb, chest])


@pytest.mark.parametrize('name', ['3x4+II', '3x4+II-Cabrera', '3x4', '3x4-Cabrera', '12x1', '12x1-Cabrera'])
def test_the_lead_order_is_told_by_einthovens_law(name):
    """Limb leads from a heart vector (I, II and the four others they fix), with a little reading noise:
    the order whose leads obey Einthoven's and Goldberger's laws is the page's, and decoding with it puts
    every lead, -aVR turned back, where it belongs."""
    rng = np.random.default_rng(1)
    truth = heart_vector_leads(rng) + 0.03 * rng.standard_normal((12, N_SAMPLES))
    layout = LAYOUTS[name]
    sampled, valid = channel_readings(layout, truth)
    plan_mates = [n for n in LAYOUTS if ecg_decode.strip_plan(LAYOUTS[n]) == ecg_decode.strip_plan(layout)]
    assert len({LAYOUTS[n].rows for n in plan_mates}) == 2                    # the standard and the Cabrera order
    misfit = {n: ecg_decode.limb_misfit(ecg_decode.order_readings(sampled[0], valid[0], LAYOUTS[n])) for n in plan_mates
              if LAYOUTS[n].rhythm_leads == layout.rhythm_leads}
    assert misfit[name] < 0.01 and all(m > 0.1 for n, m in misfit.items() if LAYOUTS[n].rows != layout.rows)
    found, orders = ecg_decode.pick_layouts(sampled, valid, [layout], plan_mates)
    assert found[0].name == name and orders[0].chosen == name
    channel, sign = ecg_decode.lead_maps(found, 'cpu')
    signal, shown = ecg_decode.channels_to_leads(sampled, valid, torch.tensor([found[0].rhythm_leads]), channel, sign)
    assert shown.all(-1).sum() == (12 if name.startswith('12x1') else 1 if layout.rhythm else 0)
    np.testing.assert_allclose(signal[0][shown[0]].numpy(), truth[shown[0].numpy()], atol=1e-5)


@pytest.mark.parametrize('name, limb_error_ratio', [('3x4+II', 0.8), ('3x4+II-Cabrera', 0.8), ('6x2+II', 0.65),
                                                    ('12x1', 0.6)])
def test_limb_leads_are_the_least_squares_fit_of_every_limb_strip(name, limb_error_ratio):
    """Each strip read with its own noise: where three or more limb strips are shown at once, the six limb
    leads become their least-squares fit by I and II, which cuts the limb leads' error (4 readings of 2
    unknowns on the standard page, 7 on 6x2+II, 6 on 12x1) and leaves chest leads and the shown mask alone.
    Noiseless readings come back unchanged."""
    rng = np.random.default_rng(2)
    truth = heart_vector_leads(rng)
    layout = LAYOUTS[name]
    clean, valid = channel_readings(layout, truth)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)) * valid
    channel, sign = ecg_decode.lead_maps([layout], 'cpu')
    rhythm = torch.tensor([layout.rhythm_leads])
    for sampled in (clean, noisy):
        signal, shown = ecg_decode.channels_to_leads(sampled, valid, rhythm, channel, sign)
        fitted = ecg_decode.fit_limb_leads(signal, sampled, valid, [layout])
        assert torch.equal(fitted[~shown], signal[~shown]) and torch.equal(fitted[0, 6:], signal[0, 6:])
        error = {k: float(((v[0, :6] - torch.from_numpy(truth[:6]).float()) ** 2)[shown[0, :6]].mean())
                 for k, v in (('read', signal), ('fitted', fitted))}
        if sampled is clean:
            assert error['fitted'] < 1e-10
        else:
            assert error['fitted'] < limb_error_ratio ** 2 * error['read']


@pytest.fixture(scope='module')
def rhythm_pages(tmp_path_factory):
    """Simulator pages with three rhythm strips, II V1 V5 (classic style, 100 dpi, upright)."""
    return classic_pages(tmp_path_factory.mktemp('rhythm3'), 2, 5, '--layouts', '3x4+II+V1+V5')


def test_three_rhythm_strips_train_in_their_own_channels_and_read_back(rhythm_pages):
    """Clinics' page of three rhythm strips: each strip gets the rhythm channel of its row (top down: II, V1,
    V5), its channel's rows follow its lead over all 10 s, and decoding the true rows with the layout found
    from presence fills II, V1 and V5 over the whole 10 s."""
    refs, problems = pdx.find_samples(rhythm_pages, rhythm_pages)
    assert not problems and len(refs) == 2
    dataset = pdx.ECGImageDataset(refs, target_size=(128, 672), read_scale=True)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    three = [LEADS.index(lead) for lead in ('II', 'V1', 'V5')]
    assert batch['rhythm_leads'].tolist() == [three, three]
    assert [page_json.layout_name(i) for i in batch['layout_id']] == ['3x4+II+V1+V5'] * 2
    rows = batch['baseline_row'][:, RHYTHM:].nanmean(-1)
    assert (rows[:, 0] < rows[:, 1]).all() and (rows[:, 1] < rows[:, 2]).all()       # top down
    assert (batch['signal_mask'][:, three].float().mean(-1) > 0.99).all()              # 10 s of each
    presence = torch.where(torch.isfinite(batch['trace_top']), 10.0, -10.0)
    centre = (batch['trace_top'] + batch['trace_bot']) / 2
    signal, shown, used = ecg_decode.decode_layouts(centre, batch['baseline_row'], presence, read_from_truth(batch))
    assert used['layouts'] == ['3x4+II+V1+V5'] * 2 and used['rhythm_leads'].tolist() == [three, three]
    assert shown[:, three].all()
    for lead in three:
        metrics = ecg_trainer.signal_metrics(signal[:, lead:lead + 1], batch['signal'][:, lead:lead + 1],
                                             batch['signal_mask'][:, lead:lead + 1])
        assert metrics['pearson'] > 0.95, LEADS[lead]
    metrics = ecg_trainer.signal_metrics(evaluate.round_trip(batch), batch['signal'], batch['signal_mask'])
    assert metrics['pearson'] > 0.95 and metrics['snr_db'] > 10


def test_rhythm_strips_leads_are_told_apart_when_layouts_differ_only_in_them():
    """Two layouts of the same strips, rhythm strips II V1 V5 and II V1 V6 (this one made up for the test):
    the one whose rhythm leads' short strips the strips match is picked."""
    rng = np.random.default_rng(2)
    truth = np.stack([np.sin(2 * np.pi * (0.7 + 0.3 * k) * np.arange(N_SAMPLES) / FS + rng.uniform(0, 6))
                      for k in range(12)])
    clinic = LAYOUTS['3x4+II+V1+V5']
    other = replace(clinic, name='3x4+II+V1+V6', rhythm=('II', 'V1', 'V6'))
    sampled, valid = channel_readings(clinic, truth)
    names = {clinic.name: clinic, other.name: other}
    with patch.dict(LAYOUTS, names):
        found, _ = ecg_decode.pick_layouts(sampled, valid, [other], list(names))
    assert found[0].name == clinic.name
    signal, shown = ecg_decode.channels_to_leads(sampled, valid, torch.tensor([found[0].rhythm_leads]))
    np.testing.assert_allclose(signal[0, LEADS.index('V5')].numpy(), truth[LEADS.index('V5')], atol=1e-6)


@pytest.fixture(scope='module')
def cabrera_pages(tmp_path_factory):
    """Simulator pages in the Cabrera order (classic style, 100 dpi, upright)."""
    return classic_pages(tmp_path_factory.mktemp('cabrera'), 4, 11, '--layouts', '3x4+II-Cabrera', '12x1-Cabrera')


def test_cabrera_pages_train_in_the_standard_channels_and_read_back(cabrera_pages):
    """The JSON names its leads (aVR for the inverted strip) and its layout; the dataset puts each strip in
    the channel of its place (its seg label too) with its sign, and the true rows decode to the signal."""
    refs, problems = pdx.find_samples(cabrera_pages, cabrera_pages)
    assert not problems and len(refs) == 4
    meta = {ref.record_id: json.loads(ref.json.read_text()) for ref in refs}
    assert {m['layout'] for m in meta.values()} == {'3x4+II-Cabrera', '12x1-Cabrera'}
    for page in (m for m in meta.values() if m['layout'] == '3x4+II-Cabrera'):   # 12 short strips, plain names
        longest = max(e['end_sample'] - e['start_sample'] for e in page['leads'])
        assert sorted(e['lead_name'] for e in page['leads'] if e['end_sample'] - e['start_sample'] < longest) == \
            sorted(LEADS)
    dataset = pdx.ECGImageDataset(refs, target_size=(128, 672))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert [page_json.layout_name(i) for i in batch['layout_id']] == [meta[r]['layout'] for r in batch['record_id']]
    avl, lead_i = LEADS.index('aVL'), LEADS.index('I')
    assert (batch['lead_channel'][:, avl] == lead_i).all() and (batch['lead_sign'][:, LEADS.index('aVR')] == -1).all()
    labels = set(batch['seg'][0].unique().tolist())
    assert labels <= set(range(13)) and len(labels) == 13       # every place's label, aVR's included
    signal = evaluate.round_trip(batch)
    metrics = ecg_trainer.signal_metrics(signal, batch['signal'], batch['signal_mask'])
    assert metrics['pearson'] > 0.95 and metrics['pearson_per_lead'][LEADS.index('aVR')] > 0.9


def test_the_starter_reads_a_cabrera_page_by_the_places_it_knows(cabrera_pages, tmp_path):
    """inference.py --layout auto on a 3x4+II-Cabrera page with the starter (trained on the standard page
    only): the limb leads say Cabrera, the sidecar names it, and aVL, aVR (turned back) and aVF come out
    correlated with the truth; read as the standard page each reads worse, aVL far worse (the limb leads'
    fit by Einthoven's law mends part of the wrong order)."""
    png = next(p for p in sorted(cabrera_pages.rglob('*.png'))
               if json.loads(p.with_suffix('.json').read_text())['layout'] == '3x4+II-Cabrera')
    truth = pd.read_csv(png.parent / f'{png.parent.name}.csv')
    fs = pd.read_csv(cabrera_pages / 'train.csv').set_index('id').loc[int(png.parent.name), 'fs']
    r = {}
    for layout in ('auto', '3x4+II'):
        out = tmp_path / f'{layout}.csv'
        run_cli('inference.py', '--image', png, '--output', out, '--layout', layout, '--fs', fs)
        read = pd.read_csv(out)
        r[layout] = {lead: np.corrcoef(read[lead].dropna(), truth[lead][read[lead].notna()])[0, 1]
                     for lead in ('aVL', 'aVR', 'aVF')}
    sidecar = json.loads((tmp_path / 'auto.json').read_text())
    assert sidecar['layout'] == '3x4+II-Cabrera'
    order = sidecar['lead_order']   # the evidence: the Cabrera order fits the limb-lead laws far better
    assert order['verdict'] == 'relabelled' and order['chosen'] == '3x4+II-Cabrera'
    assert order['other_misfit'] < 0.3 and order['standard_misfit'] > 2 * order['other_misfit'], order
    assert 'lead_order' not in json.loads((tmp_path / '3x4+II.json').read_text())   # one order offered: none told
    assert min(r['auto'].values()) > 0.7, r
    assert all(r['auto'][lead] > r['3x4+II'][lead] for lead in r['auto']), r
    assert min(r['3x4+II'].values()) < min(r['auto'].values()) - 0.2, r


def test_the_standard_order_is_kept_when_the_limb_leads_fit_no_order():
    """A reading that obeys Einthoven's law in the standard order stays standard; one that is mostly noise (a
    poor reading of a small, padded page) fits neither order and keeps the standard order, 'unclear' and not
    Cabrera; a clean Cabrera page is relabelled."""
    rng = np.random.default_rng(3)
    truth = heart_vector_leads(rng)
    options = [LAYOUTS['3x4+II'], LAYOUTS['3x4+II-Cabrera']]

    def order_of(name, noise, seed):
        noisy = truth + noise * np.random.default_rng(seed).standard_normal(truth.shape)
        sampled, valid = channel_readings(LAYOUTS[name], noisy)
        return ecg_decode.pick_order(sampled[0], valid[0], options)
    clean = order_of('3x4+II', 0.02, 0)
    assert (clean.chosen, clean.verdict) == ('3x4+II', 'standard') and clean.standard_misfit < 0.1
    poor = [order_of('3x4+II', 2.0, seed) for seed in range(20)]
    assert {order.chosen for order in poor} == {'3x4+II'} and {order.verdict for order in poor} == {'unclear'}
    found = order_of('3x4+II-Cabrera', 0.02, 0)
    assert (found.chosen, found.verdict) == ('3x4+II-Cabrera', 'relabelled') and found.other_misfit < 0.1
