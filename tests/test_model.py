"""ecg_model: heads and shapes, the decoding path (round-trip bound, de-rotation, rotation estimate),
and encoder weights (offline --pretrained fails fast, a local file loads)."""
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import ecg_checkpoint
import ecg_decode
import ecg_heads
import ecg_model as em
import ecg_trainer as et
import production_dataset as pdx

SIZE = (128, 672)
ENCODER = 'tu-regnetx_002'


@pytest.fixture(scope='module')
def fixture_batch(fixture_dirs):
    images, signals = fixture_dirs
    dataset = pdx.ECGImageDataset.from_folders(images, signals, target_size=SIZE)
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


def test_the_models_own_pulse_start_weight_decodes_its_maps(fixture_dirs):
    """forward reads the time start with the model's pulse_start_weight (a checkpoint's tuned one), exactly as
    decode_outputs given that weight; the starter's maps read with a weight of 50 and one of 0.5 put the
    fixture's strips at other columns."""
    images, signals = fixture_dirs
    dataset = pdx.ECGImageDataset.from_folders(images, signals, target_size=SIZE, read_scale=True)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert torch.isfinite(batch['read_start']).all()          # every fixture page prints its pulses
    model, _ = ecg_checkpoint.load_model(ecg_checkpoint.STARTER)   # trained: its presence maps have edges
    spans = {}
    with torch.no_grad():
        for weight in (0.5, 50.0):
            model.pulse_start_weight = weight
            out = model(batch['image'], ecg_decode.read_geometry(batch))
            again = ecg_decode.decode_outputs(out, replace(ecg_decode.read_geometry(batch), theta=out['decode_theta'],
                                                           start_weight=weight))
            assert torch.equal(out['signal'], again['signal'])
            spans[weight] = out['trace_rows']['span']
    assert not torch.equal(spans[0.5], spans[50.0])


def test_forward_returns_every_head_at_input_size():
    model = em.build_model(ENCODER).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 320))
    assert out['seg'].shape == (2, 13, 64, 320)
    assert out['grid'].shape == (2, 1, 64, 320) and out['baseline'].shape == (2, 1, 64, 320)
    assert out['theta'].shape == (2,) and out['signal'].shape == (2, 12, 5000)
    assert torch.isfinite(out['signal']).all()


def test_a_model_from_before_three_rhythm_strips_loads_with_its_rhythm_channel_widened(one_rhythm_checkpoint):
    """A checkpoint of one rhythm channel (54 head channels, as the starter of 2026-11-30); loading copies that
    channel's trace, 0 mV and presence rows to the two new rhythm channels and keeps every other row as it was."""
    checkpoint = ecg_checkpoint.load(one_rhythm_checkpoint)
    old = checkpoint['model']['unet.segmentation_head.0.weight'].float()
    assert old.shape[0] == 54
    model = ecg_checkpoint.build_model(checkpoint, one_rhythm_checkpoint)
    new = model.unet.segmentation_head[0].weight
    assert new.shape[0] == sum(ecg_heads.HEAD_CHANNELS.values()) == 60
    first = 15   # seg, grid, baseline
    assert torch.equal(new[:first], old[:first])
    for kind in range(3):   # trace, 0 mV line, presence
        for channel in range(15):
            assert torch.equal(new[first + 15 * kind + channel], old[first + 13 * kind + min(channel, 12)])
    assert checkpoint['format'] == 2 and ecg_checkpoint.head_channels(checkpoint) == em.ONE_RHYTHM_HEADS
    state = model.state_dict()
    assert em.fit_heads(state, ecg_heads.HEAD_CHANNELS, state) is state        # a model of today passes unchanged


def test_checkpoint_formats_name_their_heads(tmp_path):
    """Format 3 names its head channels and loads by them; a format-2 checkpoint of today's heads (60 channels,
    no names) loads as it is; heads this toolkit does not know are refused naming the file."""
    model = em.ECGDigitizer('tu-regnetx_002')
    state = model.state_dict()
    today = {'format': ecg_checkpoint.FORMAT, 'model': state, 'model_args': model.model_args, 'config': {},
             'head_channels': dict(ecg_heads.HEAD_CHANNELS)}
    format2 = {key: value for key, value in today.items() if key != 'head_channels'} | {'format': 2}
    for checkpoint in (today, format2):
        assert ecg_checkpoint.head_channels(checkpoint) == ecg_heads.HEAD_CHANNELS
        loaded = ecg_checkpoint.build_model(checkpoint, tmp_path / 'x.pth').state_dict()
        assert all(torch.equal(loaded[key], state[key]) for key in state)
    unknown = today | {'head_channels': {**ecg_heads.HEAD_CHANNELS, 'trace': 30}}
    with pytest.raises(ecg_checkpoint.CheckpointError, match='x.pth.*head channels'):
        ecg_checkpoint.build_model(unknown, tmp_path / 'x.pth')


def test_round_trip_bound_of_true_targets_is_high(fixture_batch):
    """Decoding the targets themselves through the model's decoding path recovers the signal."""
    b = fixture_batch
    centre = (b['trace_top'] + b['trace_bot']) / 2
    told = ecg_decode.Geometry(trace_window=b['trace_window'], trace_span=b['trace_span'], px_per_mv=b['px_per_mv'])
    signal, shown = ecg_decode.decode_rows(centre, b['baseline_row'], None, told)
    metrics = et.signal_metrics(signal, b['signal'], b['signal_mask'])
    assert metrics['pearson'] > 0.97 and metrics['snr_db'] > 15
    assert bool((shown | ~b['signal_mask']).all())      # every scored sample is decoded


def test_layout_windows_and_page_time_axis_match_truth(fixture_batch):
    b = fixture_batch
    windows = ecg_decode.default_windows(len(b['image']), 'cpu')
    assert torch.allclose(windows, b['trace_window'], atol=0.005, equal_nan=True)
    assert torch.isnan(windows[:, 13:]).all()                   # one rhythm strip: the other two are not drawn
    presence = torch.where(torch.isfinite(b['trace_top']), 10.0, -10.0)
    spans = ecg_decode.layout_spans(presence, windows, b['page_aspect'])
    assert (spans - b["trace_span"])[:, :13].abs().max() < 0.5   # start to half a column, scale from the page
    flat = ecg_decode.layout_spans(torch.zeros_like(presence), windows, b['page_aspect'])   # nothing learned yet
    assert (flat - b['trace_span'])[:, :13].abs().max() < 2.0    # the usual start of an ecg-image-kit page


def test_derotation_puts_image_frame_traces_on_page_frame_targets(fixture_batch):
    b = fixture_batch
    one_hot = F.one_hot(b['seg'], 13).permute(0, 3, 1, 2).float()[:, 1:] * 20 - 10
    page = ecg_decode.to_page_frame_batch(one_hot, b['theta'], b['page_aspect'])
    rows, _ = ecg_decode.column_soft_argmax(page)
    presence = ecg_decode.column_presence(page)
    centre = (b['trace_top'] + b['trace_bot']) / 2
    for i in range(len(rows)):
        assert abs(float(b['theta'][i])) < 0.1 or abs(float(b['theta'][i])) > 1   # both kinds present
        for lead in (0, 6, 11):
            ok = torch.isfinite(centre[i, lead]) & (presence[i, lead].sigmoid() > 0.5)
            assert ok.sum() > 50
            assert (rows[i, lead][ok] - centre[i, lead][ok]).abs().median() < 0.75


def test_rotation_estimated_from_zero_mv_lines(fixture_batch):
    b = fixture_batch
    logits = (b['baseline'].unsqueeze(1) * 20 - 10)
    theta = ecg_decode.estimate_theta(logits, torch.zeros(len(logits)), b['page_aspect'])
    assert (theta - b['theta']).abs().max() < 0.1


def test_pretrained_offline_fails_fast_with_clear_message():
    if em.hub_reachable():
        pytest.skip('the weights hub is reachable here')
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match='--pretrained_path'):
        em.build_model('resnet18', pretrained=True)
    assert time.perf_counter() - start < 15


def test_pretrained_path_loads_local_encoder_file(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / 'resnet18.pth'
    torch.save(reference.state_dict(), path)
    model = em.build_model('resnet18', pretrained_path=path)
    first = model.unet.encoder.conv1.weight          # RGB + x, y coordinates in
    assert torch.equal(first[:, :3], reference.conv1.weight) and not first[:, 3:].any()
    assert torch.equal(model.unet.encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    torch.save({'something': torch.zeros(3)}, tmp_path / 'wrong.pth')
    with pytest.raises(ValueError, match='wrong.pth: only 0 of'):
        em.build_model('resnet18', pretrained_path=tmp_path / 'wrong.pth')


def test_each_strips_zero_row_is_one_line_at_the_pages_slope():
    """The 0 mV row read per column follows a real trace's baseline wander; the decoder reads each strip's as
    one line: its own mean height, one slope for the page (a leftover turn), so the wander stays in the signal."""
    column = torch.arange(200, dtype=torch.float32)
    zero, presence = torch.zeros(1, 3, 200), torch.full((1, 3, 200), -5.0)
    wander = 1.5 * torch.cos((column - 49.5) * 2 * torch.pi / 50)   # two periods, even about strip 0's middle
    zero[0, 0], presence[0, 0, :100] = 30 + 0.02 * column + wander, 5.0
    zero[0, 1], presence[0, 1, 100:] = 60 + 0.02 * column, 5.0
    zero[0, 2], presence[0, 2, :ecg_decode.MIN_ZERO_COLUMNS - 1] = 90 + torch.sin(column), 5.0   # too short to fit
    line = ecg_decode.straight_zero_rows(zero, presence)
    slope = (line[0, :2, 1:] - line[0, :2, :-1]).mean(-1)
    assert torch.allclose(slope, torch.full((2,), 0.02), atol=0.005)
    assert (line[0, 0] - (30 + 0.02 * column)).abs().max() < 0.5            # the 1.5-px wander is gone
    assert (line[0, 0, :100].mean() - zero[0, 0, :100].mean()).abs() < 1e-4   # at the strip's own height
    assert (line[0, 1, 100:] - zero[0, 1, 100:]).abs().max() < 0.3
    assert torch.equal(line[0, 2], zero[0, 2])
