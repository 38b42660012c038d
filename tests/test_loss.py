"""ecg_trainer.CompositeLoss: every term, the weights, per-sample validity, and that it rewards right maps."""
import pytest
import torch

import ecg_decode
import ecg_heads
import ecg_trainer as et
import production_dataset as pdx

SIZE = (64, 336)


@pytest.fixture(scope='module')
def batch(fixture_dirs):
    images, signals = fixture_dirs
    dataset = pdx.ECGImageDataset.from_folders(images, signals, target_size=SIZE)
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


def random_outputs(batch, seed=0):
    torch.manual_seed(seed)
    n, (h, w) = len(batch['image']), SIZE
    out = {'seg': torch.randn(n, 13, h, w), 'grid': torch.randn(n, 1, h, w), 'baseline': torch.randn(n, 1, h, w),
           'trace': torch.randn(n, ecg_heads.HEAD_CHANNELS['trace'], h, w), 'theta': torch.randn(n)}
    return ecg_decode.decode_outputs(out, ecg_decode.true_geometry(batch))


def outputs_from_targets(batch):
    """Maps that put all their mass on the targets: what a perfect network would emit."""
    h = SIZE[0]
    rows = torch.arange(h).view(1, 1, h, 1).float()

    def band(top, bot):   # log of the row mass a trace from top to bot leaves in each column
        lo = torch.nan_to_num(top, nan=-9).unsqueeze(2) - 0.5
        hi = torch.nan_to_num(bot, nan=-9).unsqueeze(2) + 0.5
        overlap = (torch.minimum(hi, rows + 0.5) - torch.maximum(lo, rows - 0.5)).clamp(min=0)
        return torch.log(overlap + 1e-4) + 6   # offset sets the presence logit (logsumexp over rows)

    trace = band(batch['trace_top'], batch['trace_bot'])
    page = torch.cat([trace, band(batch['baseline_row'], batch['baseline_row']), trace], 1)   # presence fires on the trace
    # the maps live in the image frame: turn the page-frame targets back by the true angle
    back = ecg_decode.to_page_frame_batch(page, -batch['theta'], batch['page_aspect'])
    seg = torch.nn.functional.one_hot(batch['seg'], 13).permute(0, 3, 1, 2).float() * 20 - 10
    out = {'seg': seg, 'grid': batch['grid'].unsqueeze(1) * 20 - 10, 'baseline': batch['baseline'].unsqueeze(1) * 20 - 10,
           'trace': back, 'theta': batch['theta'].clone()}
    return ecg_decode.decode_outputs(out, ecg_decode.true_geometry(batch))


def test_every_term_is_returned_and_weighted(batch):
    losses = et.CompositeLoss()(random_outputs(batch), batch)
    for name in ['total', 'seg', 'grid', 'baseline', 'theta', 'signal', 'trace_ce', 'zero_ce', 'presence_bce',
                 'signal_l1', 'signal_snr_db']:
        assert torch.isfinite(losses[name]), name
    expected = sum(w * losses[k] for k, w in ecg_heads.DEFAULT_LOSS_WEIGHTS.items())
    assert torch.allclose(losses['total'], expected)
    heavier = et.CompositeLoss({'signal': 3.0})(random_outputs(batch), batch)
    assert torch.allclose(heavier['total'] - losses['total'], losses['signal'])


def test_invalid_targets_are_skipped_not_faked(batch):
    out = random_outputs(batch)
    assert float(et.CompositeLoss()(out, batch)['grid']) == 0.0      # ecg-image-kit: no grid geometry
    no_theta = dict(batch, theta_valid=torch.zeros_like(batch['theta_valid']))
    assert float(et.CompositeLoss()(out, no_theta)['theta']) == 0.0
    with_grid = dict(batch, grid_valid=torch.ones_like(batch['grid_valid']))
    assert float(et.CompositeLoss()(out, with_grid)['grid']) > 0.1


def test_maps_on_the_targets_score_far_better_than_random(batch):
    good = et.CompositeLoss()(outputs_from_targets(batch), batch)
    bad = et.CompositeLoss()(random_outputs(batch), batch)
    for name in ['seg', 'baseline', 'theta', 'trace_ce', 'zero_ce', 'presence_bce', 'signal_l1']:
        assert good[name] < 0.5 * bad[name], name
    assert good['signal_snr_db'] > bad['signal_snr_db'] + 10   # 64 rows: 1 mV is 3 px, so not the cap


def test_row_band_ce_gather_matches_the_dense_definition():
    """The K-row gather equals the plain sum over every row, bands at the edges and gaps included."""
    torch.manual_seed(0)
    log_prob = torch.log_softmax(torch.randn(2, 13, 40, 50), 2)
    top = torch.rand(2, 13, 50) * 45 - 2           # some bands run off the top and bottom edges
    bot = top + torch.rand(2, 13, 50) * 6
    top[0, 0, :10] = bot[0, 0, :10] = float('nan')
    rows = torch.arange(40).float().view(1, 1, -1, 1)
    for b in (bot, top):
        lo, hi = torch.nan_to_num(top).unsqueeze(2) - 0.5, torch.nan_to_num(b).unsqueeze(2) + 0.5
        overlap = (torch.minimum(hi, rows + 0.5) - torch.maximum(lo, rows - 0.5)).clamp(min=0)
        target = overlap / overlap.sum(2, keepdim=True).clamp(min=1e-6)
        dense = ecg_heads.masked_mean(-(target * log_prob).sum(2), torch.isfinite(top))
        assert torch.allclose(ecg_heads.row_band_ce(log_prob, top, b), dense, atol=1e-6)


def test_presence_loss_weighs_the_columns_at_a_strips_ends():
    """The same wrong column costs 1 + PRESENCE_EDGE_WEIGHT times more beside a strip's end than inside it;
    with no edge weight it is plain BCE."""
    present = torch.zeros(1, 13, 100)
    present[0, 0, 20:60] = 1
    right = torch.where(present > 0, 8.0, -8.0)
    at_edge, inside = right.clone(), right.clone()
    at_edge[0, 0, 20] = -8.0          # the strip's first column read absent
    inside[0, 0, 40] = -8.0           # a column in its middle read absent
    base = float(ecg_heads.presence_bce(right, present))
    extra_edge, extra_inside = (float(ecg_heads.presence_bce(maps, present)) - base for maps in (at_edge, inside))
    assert extra_edge == pytest.approx((1 + ecg_heads.PRESENCE_EDGE_WEIGHT) * extra_inside, rel=1e-3)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(at_edge, present)
    old, ecg_heads.PRESENCE_EDGE_WEIGHT = ecg_heads.PRESENCE_EDGE_WEIGHT, 0.0
    try:
        assert float(ecg_heads.presence_bce(at_edge, present)) == pytest.approx(float(plain), rel=1e-6)
    finally:
        ecg_heads.PRESENCE_EDGE_WEIGHT = old
