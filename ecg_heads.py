"""The network's heads, one entry each in HEADS: the channels it takes, the target fields it learns from (drawn from
the page's geometry at the input size), its loss term and default weight (DESIGN.md):

    head      channels                  target                                  loss                     weight
    seg       13 maps                   lead label per pixel (0 background)     CE + soft Dice           1.0
    grid      1 map                     major (5 mm) grid lines                 BCE                      0.5
    baseline  1 map                     each plotted lead's 0 mV line           BCE                      0.8
    theta     1 pooled                  page rotation in degrees                smooth L1                0.3
    signal    45 maps named 'trace'     12 x 5000 mV and the rows it is drawn   row CE + L1 + SNR-style  2.0
                                        at per column (ecg_decode reads them)

A head is one entry: ecg_model.py gives it its channels (maps of the U-Net's last layer, or of smp's pooled
auxiliary head), production_dataset.py builds, caches and moves its target fields with the image,
ecg_trainer.CompositeLoss weighs its loss (--loss_weight_NAME), the trainer logs it as {split}/{name}_loss and its
parts as {split}/{name}_parts/{part}, and checkpoints name its channels (ecg_checkpoint, format 3).
"""
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ecg_page import FS, N_LEADS, N_SAMPLES, N_TRACES, RHYTHM


@dataclass(frozen=True)
class Field:
    """One target array of a sample: its shape given the input (H, W), the dtype it is cached in, the dtype the
    loss reads it in (None: as cached), and how a translation of the image moves it: 'pixels' (a map of the image,
    by whole pixels), 'page_rows' (per-column rows of the de-rotated page frame), 'page_columns' (columns of that
    frame) or None (it does not move)."""
    shape: Callable
    cached: torch.dtype
    batched: torch.dtype = None
    moves: str = None


@dataclass
class DrawnPage:
    """What a sample's targets are drawn from: the page's geometry (page_json.parse_page, in the pixels of the picture
    read, png_wh as (w, h)), its signal as the CSV holds it (values (n, 12) at fs Hz) and at 500 Hz (signal (12, 5000)),
    the page rotation in degrees
    (theta_known: from the JSON or the 0 mV lines) and the network's input size (H, W)."""
    page: dict
    values: np.ndarray
    signal: np.ndarray
    fs: float
    theta_deg: float
    theta_known: bool
    png_wh: tuple
    size_hw: tuple

    @property
    def scale_xy(self):
        """Input pixels per picture pixel, (x, y)."""
        return np.array([self.size_hw[1] / self.png_wh[0], self.size_hw[0] / self.png_wh[1]])

    @cached_property
    def strips(self):
        """Its plotted strips at the input size (page_strips), fitted once for every head."""
        return page_strips(self)


@dataclass(frozen=True)
class Head:
    """One head: `name` is its loss term, --loss_weight_NAME and TensorBoard tag. `maps` names its per-pixel output
    (`channels` maps of the U-Net's last layer), `pooled` its channels of the pooled head (values per image, output
    `name`; checkpoints name and match map heads only, so a new pooled head does not load older checkpoints).
    `targets(DrawnPage)` -> {field: numpy array} of `fields`; `loss(outputs, batch)` -> (scalar, {part: scalar})
    with the `parts` it is made of (logged, to see which part stalls)."""
    name: str
    weight: float
    fields: dict
    targets: Callable
    loss: Callable
    maps: str = None
    channels: int = 0
    pooled: int = 0
    parts: tuple = ()


# ---------------------------------------------------------------- drawing targets at the input size

def to_input(xy, scale_xy):
    """Picture pixel coordinates -> input pixel coordinates (pixel centres kept aligned, as cv2.resize does)."""
    return (xy + 0.5) * scale_xy - 0.5


def densify(xy, factor=4):
    """Linearly interpolate `factor` points per segment so per-column extents see every column crossed."""
    if len(xy) < 2:
        return xy
    t = np.arange((len(xy) - 1) * factor + 1) / factor
    return np.stack([np.interp(t, np.arange(len(xy)), xy[:, k]) for k in (0, 1)], axis=1)


def column_extent(xy, width):
    """Per column of the input, the min and max row the polyline passes through there (NaN elsewhere)."""
    top = np.full(width, np.inf)
    bot = np.full(width, -np.inf)
    dense = densify(xy[np.isfinite(xy).all(axis=1)])
    cols = np.round(dense[:, 0]).astype(np.int64)
    inside = (cols >= 0) & (cols < width)
    np.minimum.at(top, cols[inside], dense[inside, 1])
    np.maximum.at(bot, cols[inside], dense[inside, 1])
    top[~np.isfinite(top)] = np.nan
    bot[~np.isfinite(bot)] = np.nan
    return top, bot


def draw_polyline(canvas, xy, value, thickness=1):
    """Rasterize a polyline (input px, sub-pixel precise) onto a uint8 canvas."""
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) >= 2:
        points = np.round(xy * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [points], False, int(value), thickness, cv2.LINE_8, shift=4)


def derotate(xy, theta_deg, png_wh):
    """Picture pixels -> the page's own frame: undo a clockwise turn by theta about the picture centre
    (the centre that the model's decoder turns about, so targets and decoding share one frame)."""
    centre = (np.asarray(png_wh, np.float64) - 1) / 2
    t = math.radians(theta_deg)
    inverse = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return (xy - centre) @ inverse.T + centre


def zero_mv_points(entry, values, px_per_mv, theta_deg):
    """0 mV point of each plotted sample: plotted + value * px_per_mv along the page's downward vertical."""
    theta = math.radians(theta_deg)
    down = np.array([-math.sin(theta), math.cos(theta)])   # (x, y) of the page's "down" after a clockwise turn
    v = values[entry['start']:entry['end'], entry['lead']] * entry.get('sign', 1.0)   # -aVR is drawn as drawn
    return entry['xy'] + v[:, None] * px_per_mv * down[None, :]


def fit_line(xy):
    """Least-squares y = a + b x over finite points -> (a, b), or None."""
    ok = np.isfinite(xy).all(axis=1)
    if ok.sum() < 2 or np.ptp(xy[ok, 0]) < 1:
        return None
    b, a = np.polyfit(xy[ok, 0], xy[ok, 1], 1)
    return a, b


@dataclass
class Strip:
    """One plotted strip at the input size: its JSON entry, its points in the input's image frame (xy) and in the
    de-rotated page frame (page_xy), and its 0 mV line y = a + b x in each frame (None where none fits)."""
    entry: dict
    xy: np.ndarray
    page_xy: np.ndarray
    image_zero: tuple
    page_zero: tuple

    @property
    def has_zero_line(self):
        return (self.image_zero is not None and self.page_zero is not None
                and np.isfinite(self.page_xy).all(axis=1).sum() >= 2)


def page_strips(drawn):
    """The page's strips (Strip), rhythm strips first: a short lead's pixels are drawn over a rhythm strip's."""
    strips = []
    for entry in sorted(drawn.page['entries'], key=lambda e: e['channel'] < RHYTHM):
        px_per_mv, scale_xy = drawn.page['px_per_mv'], drawn.scale_xy
        page_entry = dict(entry, xy=derotate(entry['xy'], drawn.theta_deg, drawn.png_wh))
        image_zero = zero_mv_points(entry, drawn.values, px_per_mv, drawn.theta_deg)
        page_zero = zero_mv_points(page_entry, drawn.values, px_per_mv, 0.0)
        strips.append(Strip(entry, to_input(entry['xy'], scale_xy), to_input(page_entry['xy'], scale_xy),
                            fit_line(to_input(image_zero, scale_xy)), fit_line(to_input(page_zero, scale_xy))))
    return strips


# ---------------------------------------------------------------- losses

GRID_POS_WEIGHT = 3.0       # grid lines cover a few % of the pixels
BASELINE_POS_WEIGHT = 10.0  # 0 mV lines cover about 1 % of the pixels
SNR_LOSS_WEIGHT = 0.05      # per dB: an SNR-style term beside L1 tracks the metric (worth 1-2 dB to top teams)
SNR_LOSS_CLAMP_DB = 40.0
PRESENCE_EDGE_WEIGHT = 4.0  # extra weight of the columns near a strip's ends in the presence loss
EDGE_REACH = 2              # columns each side of a presence change that count as its edge


def masked_mean(values, mask):
    """Mean of values where mask is set; 0 (with a gradient path) when nothing is valid."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def map_bce(logits, target, valid, pos_weight):
    """Per-pixel BCE of a (B, 1, H, W) map, averaged over the samples whose target is valid."""
    per_pixel = F.binary_cross_entropy_with_logits(
        logits[:, 0].float(), target.float(), reduction='none',
        pos_weight=torch.tensor(pos_weight, device=logits.device))
    return masked_mean(per_pixel.mean((1, 2)), valid)


def row_band_ce(log_prob, top, bot):
    """Column-wise cross-entropy of page-frame row log-probabilities (B, C, H, W) against the rows each
    column's trace spans (top..bot, (B, C, W), NaN where absent): the target mass of row r is the
    overlap of [r - 0.5, r + 0.5] with [top - 0.5, bot + 0.5], so its soft-argmax is the trace's centre.
    Only the K rows a band can touch are gathered (K = widest band + 2), not all H."""
    height = log_prob.shape[2]
    present = torch.isfinite(top) & torch.isfinite(bot)
    if not present.any():
        return log_prob.sum() * 0
    lo = torch.nan_to_num(top, nan=0.0) - 0.5
    hi = torch.nan_to_num(bot, nan=0.0) + 0.5
    k = int(torch.ceil((hi - lo)[present].max()).item()) + 2
    first = torch.floor(lo + 0.5).clamp(0, height - 1)
    rows = first.unsqueeze(2) + torch.arange(k, device=log_prob.device).view(1, 1, -1, 1)
    overlap = (torch.minimum(hi.unsqueeze(2), rows + 0.5) - torch.maximum(lo.unsqueeze(2), rows - 0.5)).clamp(min=0)
    overlap = overlap * (rows <= height - 1)          # rows past the bottom edge hold no mass
    target = overlap / overlap.sum(2, keepdim=True).clamp(min=1e-6)
    picked = log_prob.gather(2, rows.clamp(max=height - 1).long())
    ce = -(target * picked).sum(2)
    return masked_mean(ce, present)


def snr_style_loss(pred, true, mask):
    """-SNR in dB per record (noise / signal power over the valid samples), clamped, averaged."""
    mask = mask.to(pred.dtype)
    signal_power = (true ** 2 * mask).sum((1, 2))
    noise_power = ((pred - true) ** 2 * mask).sum((1, 2))
    db = 10 * torch.log10((signal_power + 1e-6) / (noise_power + 1e-6))
    has = mask.sum((1, 2)) > 0
    return -masked_mean(db.clamp(-SNR_LOSS_CLAMP_DB, SNR_LOSS_CLAMP_DB), has)


def presence_bce(logits, present):
    """BCE of the (B, 15, W) column presence logits, the columns within EDGE_REACH of a strip's end weighted
    1 + PRESENCE_EDGE_WEIGHT: decoding times every strip by where its presence starts and stops, and the
    interior columns, easy and many, would otherwise drown them."""
    change = (present[..., 1:] != present[..., :-1]).float()
    edge = F.pad(change, (0, 1)) + F.pad(change, (1, 0))   # the columns on both sides of each change
    near = F.max_pool1d(edge.clamp(max=1), 2 * EDGE_REACH + 1, stride=1, padding=EDGE_REACH)
    weight = 1 + PRESENCE_EDGE_WEIGHT * near
    per_column = F.binary_cross_entropy_with_logits(logits.float(), present, reduction='none')
    return (per_column * weight).sum() / weight.sum()


# ---------------------------------------------------------------- seg: which lead each pixel's trace is

def seg_targets(drawn):
    """seg (H, W) uint8: 0 background, 1..12 the lead whose trace covers the pixel (a rhythm strip: its lead)."""
    seg = np.zeros(drawn.size_hw, np.uint8)
    for strip in drawn.strips:
        lead_place = strip.entry['lead'] if strip.entry['channel'] >= RHYTHM else strip.entry['channel']
        draw_polyline(seg, strip.xy, lead_place + 1)
    return {'seg': seg}


def seg_loss(outputs, batch):
    """Cross-entropy + soft Dice over the lead classes (traces are a sliver of the page)."""
    logits, target = outputs['seg'].float(), batch['seg']
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)[:, 1:]
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    inter = (prob * one_hot).sum((0, 2, 3))
    union = prob.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    present = one_hot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (union + 1)
    return ce + (dice[present].mean() if present.any() else dice.sum() * 0), {}


# ---------------------------------------------------------------- grid: the major grid lines

def grid_lines(grid, theta_deg, page_wh, scale_xy, size_hw):
    """Major (5 mm) grid lines of the page, rotated as the page was, at the input size -> (H, W) uint8."""
    canvas = np.zeros(size_hw, np.uint8)
    rotation = cv2.getRotationMatrix2D(tuple(grid['center_xy']), -theta_deg, 1.0)
    reach = math.hypot(*page_wh)   # lines long enough to cross the page at any angle
    step = grid['spacing']
    for axis in (0, 1):   # 0: vertical lines at x = pos, 1: horizontal lines at y = pos
        origin = grid['origin_xy'][axis]
        k = np.arange(math.floor((-reach - origin) / step), math.ceil((reach - origin) / step) + 1)
        pos = origin + k * step
        a = np.zeros((len(pos), 2))
        a[:, axis] = pos
        b = a.copy()
        a[:, 1 - axis] = -reach
        b[:, 1 - axis] = 2 * reach
        ends = [to_input(np.c_[e, np.ones(len(e))] @ rotation.T, scale_xy) for e in (a, b)]
        for p, q in zip(*ends):
            draw_polyline(canvas, np.stack([p, q]), 1)
    return canvas


def grid_targets(drawn):
    """grid (H, W) uint8 and grid_valid: 0 where the JSON gives no grid geometry (ecg-image-kit), never faked."""
    grid = drawn.page['grid']
    lines = (np.zeros(drawn.size_hw, np.uint8) if grid is None else
             grid_lines(grid, drawn.theta_deg, drawn.png_wh, drawn.scale_xy, drawn.size_hw))
    return {'grid': lines, 'grid_valid': np.float32(drawn.page['has_grid_info'])}


def grid_loss(outputs, batch):
    return map_bce(outputs['grid'], batch['grid'], batch['grid_valid'], GRID_POS_WEIGHT), {}


# ---------------------------------------------------------------- baseline: each lead's 0 mV line

def baseline_targets(drawn):
    """baseline (H, W) uint8: the 0 mV line of each plotted strip, over the columns the strip spans."""
    baseline = np.zeros(drawn.size_hw, np.uint8)
    for strip in drawn.strips:
        if strip.has_zero_line:
            ends_x = strip.xy[np.isfinite(strip.xy).all(axis=1), 0][[0, -1]]
            a, b = strip.image_zero
            draw_polyline(baseline, np.stack([ends_x, a + b * ends_x], axis=1), 1)
    return {'baseline': baseline}


def baseline_loss(outputs, batch):
    return map_bce(outputs['baseline'], batch['baseline'], torch.ones_like(batch['theta']), BASELINE_POS_WEIGHT), {}


# ---------------------------------------------------------------- theta: the page rotation

def theta_targets(drawn):
    return {'theta': np.float32(drawn.theta_deg), 'theta_valid': np.float32(drawn.theta_known)}


def theta_loss(outputs, batch):
    per_page = F.smooth_l1_loss(outputs['theta'].float(), batch['theta'], reduction='none')
    return masked_mean(per_page, batch['theta_valid']), {}


# ---------------------------------------------------------------- signal: the 12 x 5000 mV and its trace rows

SIGNAL_PARTS = ('trace_ce', 'zero_ce', 'presence_bce', 'signal_l1', 'signal_snr_db')


def signal_shown_mask(page, signal, fs):
    """(12, 5000) bool: finite in the CSV and inside a window that the picture plots for that lead."""
    shown = np.zeros((N_LEADS, N_SAMPLES), bool)
    for entry in page['entries']:
        first = math.ceil(entry['start'] / fs * FS - 1e-9)
        last = math.floor((entry['end'] - 1) / fs * FS + 1e-9)
        shown[entry['lead'], first:last + 1] = True
    return shown & np.isfinite(signal)


def signal_targets(drawn):
    """signal (12, 5000) mV at 500 Hz (NaN as 0) and signal_mask; and per channel (15: the 12 leads, then the rhythm
    strips top down) in the de-rotated page frame at the input size, where one column is one instant: trace_top /
    trace_bot (15, W) the rows the trace spans, baseline_row (15, W) its 0 mV row, trace_window (15, 2) the seconds
    of its first and last sample, trace_span (15, 2) their columns. NaN where not plotted."""
    width = drawn.size_hw[1]
    top, bot, base = (np.full((N_TRACES, width), np.nan, np.float32) for _ in range(3))
    window, span = (np.full((N_TRACES, 2), np.nan, np.float32) for _ in range(2))
    for strip in drawn.strips:
        if not strip.has_zero_line:
            continue
        entry, page_xy = strip.entry, strip.page_xy
        channel, finite = entry['channel'], np.isfinite(page_xy).all(axis=1)
        top[channel], bot[channel] = column_extent(page_xy, width)
        cols = np.flatnonzero(np.isfinite(top[channel]))
        base[channel, cols] = strip.page_zero[0] + strip.page_zero[1] * cols
        window[channel] = (entry['start'] / drawn.fs, (entry['end'] - 1) / drawn.fs)
        span[channel] = (page_xy[finite, 0][0], page_xy[finite, 0][-1])
    signal = drawn.signal
    return dict(signal=np.nan_to_num(signal).astype(np.float32),
                signal_mask=signal_shown_mask(drawn.page, signal, drawn.fs),
                trace_top=top, trace_bot=bot, baseline_row=base, trace_window=window, trace_span=span)


def signal_loss(outputs, batch):
    """Where each lead's trace and 0 mV line lie per column, where the trace is present, and the decoded signal itself
    (L1 in mV + SNR-style)."""
    rows = outputs['trace_rows']
    trace_ce = row_band_ce(rows['trace_log_prob'], batch['trace_top'], batch['trace_bot'])
    zero_ce = row_band_ce(rows['zero_log_prob'], batch['baseline_row'], batch['baseline_row'])
    presence = presence_bce(rows['presence'], torch.isfinite(batch['trace_top']).float())
    mask = batch['signal_mask']
    l1 = masked_mean((outputs['signal'].float() - batch['signal']).abs(), mask)
    snr = snr_style_loss(outputs['signal'].float(), batch['signal'], mask)
    total = trace_ce + zero_ce + presence + l1 + SNR_LOSS_WEIGHT * snr
    return total, dict(zip(SIGNAL_PARTS, (trace_ce, zero_ce, presence, l1, -snr)))


# ---------------------------------------------------------------- the registry

def pixel_map(dtype):
    return Field(lambda h, w: (h, w), torch.uint8, dtype, 'pixels')


def per_image(dtype=torch.float32):
    return Field(lambda h, w: (), dtype)


def per_trace(moves, columns=None):
    """(15, W) per column, or (15, columns)."""
    return Field(lambda h, w: (N_TRACES, columns or w), torch.float32, None, moves)


SIGNAL_FIELDS = {
    'signal': Field(lambda h, w: (N_LEADS, N_SAMPLES), torch.float32),
    'signal_mask': Field(lambda h, w: (N_LEADS, N_SAMPLES), torch.bool, torch.bool),
    'trace_top': per_trace('page_rows'), 'trace_bot': per_trace('page_rows'), 'baseline_row': per_trace('page_rows'),
    'trace_window': per_trace(None, 2), 'trace_span': per_trace('page_columns', 2),
}

HEADS = (
    Head('seg', 1.0, {'seg': pixel_map(torch.long)}, seg_targets, seg_loss, maps='seg', channels=13),
    Head('grid', 0.5, {'grid': pixel_map(torch.float32), 'grid_valid': per_image()}, grid_targets, grid_loss,
         maps='grid', channels=1),
    Head('baseline', 0.8, {'baseline': pixel_map(torch.float32)}, baseline_targets, baseline_loss,
         maps='baseline', channels=1),
    Head('theta', 0.3, {'theta': per_image(), 'theta_valid': per_image()}, theta_targets, theta_loss, pooled=1),
    # the trace maps of 15 channels (12 leads + up to 3 rhythm strips): trace rows, 0 mV rows and presence
    Head('signal', 2.0, SIGNAL_FIELDS, signal_targets, signal_loss, maps='trace', channels=3 * N_TRACES,
         parts=SIGNAL_PARTS),
)
HEAD_CHANNELS = {head.maps: head.channels for head in HEADS if head.maps}      # the U-Net's last layer, in order
POOLED_CHANNELS = {head.name: head.pooled for head in HEADS if head.pooled}   # smp's pooled head, in order
DEFAULT_LOSS_WEIGHTS = {head.name: head.weight for head in HEADS}
TARGET_FIELDS = {name: field for head in HEADS for name, field in head.fields.items()}
