"""A rectified photo's time axis (ecg_decode.layout_spans with a time_slack): its px per s is fitted within
PHOTO_TIME_SLACK and each strip moved on its own, while a render (no slack) keeps the scale its grid gives, to the
bit; inference gives the slack to photos it rectified only."""
import numpy as np
import pytest
import torch

import ecg_decode
import page_image
import page_reader
from conftest import FIXTURE, ROOT

WIDTH = 672
PHOTO = ROOT.parent / 'shared' / 'real' / 'photos' / 'images' / '00012_hr-0001.jpg'


def presence_of(spans):
    """(1, 15, W) presence logits: +6 inside each strip's column span (15, 2), -6 elsewhere."""
    cols = torch.arange(WIDTH, dtype=torch.float32)
    inside = (cols >= spans[:, :1].round()) & (cols <= spans[:, 1:].round())   # False where no strip (NaN)
    return torch.where(inside, 6.0, -6.0)[None]


def standard_places():
    return ecg_decode.layout_strips([ecg_decode.LAYOUT], torch.device('cpu'))[1]   # (1, 15, 2) seconds


def test_a_photos_seconds_and_a_moved_strip_are_fitted():
    """The page's strips lie at 4 % more columns per second than its grid read, and one short strip (V1's place)
    sits 0.15 s right of the page's time axis: both are found, to half a column."""
    place, aspect = standard_places(), torch.tensor([ecg_decode.PAGE_ASPECT])
    read_px_per_s = torch.tensor([55.0])
    truth = 40.0 + place[0] * read_px_per_s * 1.04
    v1 = ecg_decode.LEADS.index('V1')
    truth[v1] += 0.15 * 55.0 * 1.04
    presence = presence_of(truth)
    photo = ecg_decode.layout_spans(presence, place, aspect, read_px_per_s, time_slack=torch.tensor([0.06]))
    shown = torch.isfinite(truth).all(1)                               # 13 strips: 12 short, one rhythm
    assert int(shown.sum()) == 13
    assert photo[0, shown].numpy() == pytest.approx(truth[shown].numpy(), abs=0.6)
    render = ecg_decode.layout_spans(presence, place, aspect, read_px_per_s)
    lengths = render[0, shown, 1] - render[0, shown, 0]
    assert lengths.numpy() == pytest.approx((place[0, shown, 1] - place[0, shown, 0]).numpy() * 55.0)   # the grid's
    assert (render[0, shown] - truth[shown]).abs().max() > 5


def test_no_slack_is_the_read_scale_to_the_bit():
    """A page with slack 0 beside a photo in one batch reads exactly as without any slack."""
    place, aspect = standard_places().expand(2, -1, -1), torch.full((2,), ecg_decode.PAGE_ASPECT)
    read_px_per_s = torch.tensor([55.0, 58.0])
    rng = np.random.default_rng(0)
    presence = torch.tensor(rng.normal(0, 3, (2, 15, WIDTH)), dtype=torch.float32)
    before = ecg_decode.layout_spans(presence, place, aspect, read_px_per_s, torch.tensor([30.0, np.nan]))
    mixed = ecg_decode.layout_spans(presence, place, aspect, read_px_per_s, torch.tensor([30.0, np.nan]),
                                    time_slack=torch.tensor([0.06, 0.0]))
    np.testing.assert_array_equal(mixed[1].numpy(), before[1].numpy())     # NaN where no strip, as before
    np.testing.assert_array_equal(
        ecg_decode.layout_spans(presence, place, aspect, read_px_per_s, time_slack=torch.zeros(2)).numpy(),
        ecg_decode.layout_spans(presence, place, aspect, read_px_per_s).numpy())


def test_inference_gives_the_slack_to_rectified_photos_only():
    size = (128, 672)
    rows = []
    for path in (PHOTO, FIXTURE / 'images' / 'fx1024-0001.png'):
        page, page_found = page_reader.find_page(page_image.read_rgb(path))
        rows.append(page_reader.page_input_row(page, size, page_found))
    inputs = page_reader.stack_inputs(rows)
    assert inputs['page_found'][0]['action'] == 'rectified'
    assert inputs['page_found'][1]['action'].startswith('untouched')
    assert inputs['time_slack'].tolist() == pytest.approx([ecg_decode.PHOTO_TIME_SLACK, 0.0])
    assert ecg_decode.read_geometry(inputs).time_slack is inputs['time_slack']
