"""Decoding: the network's maps (ecg_model.ECGDigitizer) read into the 12-lead signal, as the best Kaggle
digitizers do. Turn the trace maps into the page's own frame (undo the rotation), then per column a softmax
over rows gives the trace's row with sub-pixel precision (soft-argmax) and the 0 mV row likewise;
(0 mV row - trace row) / px_per_mv is the value; each channel's columns map linearly onto its time window.
Every step is differentiable in the maps, so the signal loss trains the head end to end.

Beside the values, decoding finds what the page does not say: its rotation (estimate_theta_batch), its time
start and layout (choose_layouts: which strips are present where), and the order of its limb leads
(pick_order: standard or Cabrera, by Einthoven's law).

    decode_outputs(maps, geometry) -> maps + 'signal' (B, 12, 5000) mV, 'trace_rows', 'decode_theta'
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ecg_page import (FS, LAYOUTS, LEADS, MM_PER_MV, MM_PER_S, N_LEADS, N_SAMPLES, N_TRACES, PAGE_ASPECT, PAGE_HEIGHT_MM,
                      RHYTHM, STANDARD, whole_pages)

LAYOUT = STANDARD                   # the page read when nothing says otherwise
TRACE_START = 118 / 2200            # where ecg-image-kit starts the traces (after the 1 mV pulse), page widths
START_PRIOR_WEIGHT = 0.01           # per column off the usual start: only breaks ties of a flat presence
PULSE_START_WEIGHT = 2.0            # per column off where the calibration pulse ends (the traces start there):
                                    # read to ~0.1 column on the page itself; a model with sharp presence edges
                                    # (the starter of 2026-11-30) reads best with its own edges weighing in too
PULSE_START_WEIGHTS_TRIED = (0.5, 2.0, 10.0, 50.0)   # the trainer keeps the one its validation pages read best
START_STEP = 0.05                   # columns: resolution of the time-start search
SPEED_MISMATCH = 1e4                # fit-score cost of a layout at another paper speed than the page's pulse shows
START_REACH = 0.5                   # a start can lie this far left of the first column (a strip drawn from x = 0)
LINE_PIXELS_PER_COLUMN = 4          # the rotation search reads as many pixels as four page-wide 0 mV lines
SHARPER_BY = 1.05                   # the searched angle must sharpen the 0 mV profile this much to win
# below the rotation search's own error (about 0.1 deg): such a turn moves a trace row and its 0 mV row alike
# (their difference is the signal), and the top and bottom strips' columns by a quarter of a column at 128 x 672
NEGLIGIBLE_TURN_DEG = 0.05
SUBROW_OFFSETS = torch.tensor([-0.375, -0.125, 0.125, 0.375])
PRESENCE_THRESHOLD = 0.5
ZERO_LINE = True                    # each strip's 0 mV row read as one straight line (straight_zero_rows)
MIN_ZERO_COLUMNS = 8                # columns a strip must be drawn in for its line to be fitted


@dataclass
class Geometry:
    """What decoding is told about a batch of B pages; a field left None is read from the maps (rotation,
    layout, time start) or falls back to the page border (scale). Scales are in input pixels; NaN in one page's
    entry of px_per_mv, px_per_s, paper_speed or start: not known for that page."""
    theta: torch.Tensor = None          # (B,) rotation in degrees (estimate_theta_batch)
    trace_window: torch.Tensor = None   # (B, 15, 2) seconds each trace channel shows (None: the layout is read)
    trace_span: torch.Tensor = None     # (B, 15, 2) the columns it spans
    px_per_mv: torch.Tensor = None      # (B,)
    page_aspect: torch.Tensor = None    # (B,) width / height of the page (default: a letter page)
    px_per_s: torch.Tensor = None       # (B,)
    rhythm_leads: torch.Tensor = None   # (B, 3) the lead of each rhythm strip, top down (-1: none)
    layouts: list = None                # names the layout is chosen among (default: the standard page)
    paper_speed: torch.Tensor = None    # (B,) mm/s the pages' pulses show
    start: torch.Tensor = None          # (B,) input column where the pulses end and the traces start
    start_weight: float = None          # fit_start's pull towards start (None: PULSE_START_WEIGHT)
    lead_channel: torch.Tensor = None   # (B, 12) which trace channel holds each lead (channels_to_leads)
    lead_sign: torch.Tensor = None      # (B, 12)

    def pages(self, first, end):
        """The same geometry for pages [first, end) of the batch."""
        return replace(self, **{name: value[first:end] for name, value in vars(self).items() if torch.is_tensor(value)})


def decode_outputs(out, geometry=None):
    """(Re)decode the signal of a forward's maps, with given (Geometry) or estimated geometry (adds 'signal',
    'trace_rows', 'decode_theta' to out). Cheap next to the U-Net, so evaluation decodes twice."""
    geometry = geometry or Geometry()
    theta = geometry.theta
    if theta is None:   # NaN maps of a diverged model must give a (useless) angle, not a crash
        theta = estimate_theta_batch(torch.nan_to_num(out['baseline'].float(), nan=-1e4, posinf=1e4, neginf=-1e4),
                                     torch.nan_to_num(out['theta'].float()), geometry.page_aspect)
    out = dict(out)
    out['signal'], out['trace_rows'] = decode_signal(out['trace'], replace(geometry, theta=theta))
    out['decode_theta'] = theta
    return out


def with_start_weight(geometry, own):
    """geometry (or an empty Geometry) with a model's own tuned start weight where it names none."""
    geometry = geometry or Geometry()
    return geometry if geometry.start_weight is not None else replace(geometry, start_weight=own)


def true_geometry(batch):
    """The decoding geometry a dataset batch knows (the trainer's: the signal loss teaches the maps, not a
    geometry guess)."""
    return Geometry(theta=batch['theta'], trace_window=batch['trace_window'], trace_span=batch['trace_span'],
                    px_per_mv=batch['px_per_mv'], page_aspect=batch['page_aspect'],
                    rhythm_leads=batch['rhythm_leads'], lead_channel=batch['lead_channel'],
                    lead_sign=batch['lead_sign'])


def read_geometry(batch, layouts=None):
    """The decoding geometry an image shows by itself (evaluation, inference): its shape and the scale
    its grid and pulse give (NaN: not found, the page border is used) with the paper speed its pulse shows
    (NaN: 25 mm/s); rotation, time start and, among `layouts` (names; default the standard page), the
    layout are read from the model's maps."""
    return Geometry(page_aspect=batch['page_aspect'], px_per_mv=batch.get('read_px_per_mv'),
                    px_per_s=batch.get('read_px_per_s'), paper_speed=batch.get('read_speed_mm_s'),
                    start=batch.get('read_start'), layouts=list(layouts or [LAYOUT.name]))


def default_px_per_mv(height):
    """Input rows per mV of a full page: 10 mm per mV on an 8.5 in tall page."""
    return height * MM_PER_MV / PAGE_HEIGHT_MM


def read_or(values, fallback):
    """(B,) values read from the page where they are known (finite and positive), else fallback (B,); and
    where they were known (B,) bool. values may be None (nothing read)."""
    if values is None:
        return fallback, torch.zeros_like(fallback, dtype=torch.bool)
    values = values.to(fallback.device).float().view(-1)
    known = torch.isfinite(values) & (values > 0)
    return torch.where(known, values, fallback), known


def page_px_per_mv(height, batch, device, px_per_mv=None):
    """(B,) input rows per mV: the scale read from the page where it is known (finite), else the page
    border's (a padded or cropped page gets that wrong: read_scale in production_dataset reads the grid)."""
    return read_or(px_per_mv, torch.full((batch,), default_px_per_mv(height), device=device))[0]


def border_px_per_s(width, page_aspect):
    """(B,) input columns per second of a full page at 25 mm/s, from its border: 8.5 in tall, page_aspect wide."""
    return MM_PER_S * width / (PAGE_HEIGHT_MM * page_aspect.float().view(-1))


def page_px_per_s(width, page_aspect, px_per_s=None):
    """(B,) input columns per second: read from the page where known, else 25 mm/s on the page border."""
    return read_or(px_per_s, border_px_per_s(width, page_aspect))[0]


def page_speeds(paper_speed, batch, device):
    """(B,) mm/s of each page: what its calibration pulse shows where known, else the standard 25 mm/s."""
    return read_or(paper_speed, torch.full((batch,), MM_PER_S, device=device))[0]


def layout_px_per_s(width, page_aspect, px_per_s, page_speed, layouts):
    """(B,) input columns per second of each page if it were drawn at its layout's paper speed: the page's
    own px_per_s (at page_speed, the speed its pulse shows; the border's guess is at 25 mm/s) rescaled, so a
    25 mm/s layout laid over a 50 mm/s page covers the same paper, showing twice the seconds."""
    speeds = torch.tensor([layout.paper_speed_mm_s for layout in layouts], device=page_speed.device)
    base, read = read_or(px_per_s, border_px_per_s(width, page_aspect).to(page_speed.device))
    base_speed = torch.where(read, page_speed, torch.full_like(page_speed, MM_PER_S))   # the border's: 25 mm/s
    return base * speeds / base_speed


def layout_strips(layouts, device):
    """Per page, what its layout draws: windows and places (B, 15, 2) in seconds (NaN: no such strip; see
    ecg_page.Layout.strip_seconds) and the rhythm strips' leads (B, 3) (-1: none). layouts: Layout per page."""
    seconds = [layout.strip_seconds() for layout in layouts]
    windows = torch.tensor(np.stack([w for w, _ in seconds]), dtype=torch.float32, device=device)
    places = torch.tensor(np.stack([p for _, p in seconds]), dtype=torch.float32, device=device)
    return windows, places, rhythm_lead_tensor(layouts, device)


def rhythm_lead_tensor(layouts, device):
    """(B, 3) lead of each page's rhythm strips, top down (-1: none)."""
    return torch.tensor([layout.rhythm_leads for layout in layouts], dtype=torch.long, device=device)


def lead_maps(layouts, device):
    """(B, 12) trace channel of each lead's short strip and (B, 12) its sign (ecg_page.Layout.lead_channels)."""
    maps = [layout.lead_channels() for layout in layouts]
    return (torch.tensor(np.stack([c for c, _ in maps]), dtype=torch.long, device=device),
            torch.tensor(np.stack([s for _, s in maps]), dtype=torch.float32, device=device))


def default_windows(batch, device):
    """(B, 15, 2) seconds [first, last sample] each channel shows on the standard page (LAYOUT)."""
    return layout_strips([LAYOUT] * batch, device)[0]


def column_soft_argmax(logits):
    """(B, C, H, W) -> expected row per column (B, C, W) under a softmax over rows, and the
    log-probabilities (B, C, H, W) the loss reuses."""
    rows = torch.arange(logits.shape[-2], device=logits.device, dtype=torch.float32).view(1, 1, -1, 1)
    log_prob = torch.log_softmax(logits.float(), dim=2)
    return (log_prob.exp() * rows).sum(dim=2), log_prob


def straight_zero_rows(zero_rows, presence):
    """(B, C, W) 0 mV row per column, (B, C, W) presence logits -> each strip's 0 mV row as one straight line:
    its own height (the mean over the columns where it is drawn) and one slope shared by the page's strips.
    An upright page draws each strip's 0 mV level straight; read column by column, the zero map follows a real
    trace's slow baseline wander (0.1-0.3 mV) and the decoder would take it out of the signal. A page's leftover
    turn tilts all its strips alike, so the slope is pooled over them. A strip drawn in fewer than
    MIN_ZERO_COLUMNS columns keeps its own rows."""
    drawn = (presence > 0).to(zero_rows.dtype)
    count = drawn.sum(-1, keepdim=True)
    fitted = count >= MIN_ZERO_COLUMNS                                            # (B, C, 1)
    drawn = drawn * fitted
    column = torch.arange(zero_rows.shape[-1], device=zero_rows.device, dtype=zero_rows.dtype)
    rows = torch.nan_to_num(zero_rows)
    mean_column = (drawn * column).sum(-1, keepdim=True) / count.clamp(min=1)
    height = (drawn * rows).sum(-1, keepdim=True) / count.clamp(min=1)
    off = (column - mean_column) * drawn
    slope = (off * (rows - height)).sum((1, 2), keepdim=True) / (off * off).sum((1, 2), keepdim=True).clamp(min=1e-6)
    return torch.where(fitted, height + slope * (column - mean_column), zero_rows)


def column_presence(logits):
    """(B, C, H, W) presence maps -> (B, C, W) logit that the strip is drawn in each column: a smooth
    max over rows, so a column is present where the map fires near the trace. Its own channels: the
    softmax of the trace maps cannot say whether a column holds a trace at all."""
    return torch.logsumexp(logits.float(), dim=2) - math.log(logits.shape[-2])


def continuous_cumsum(values, at):
    """Integral of a per-column step function (B, C, W) from the left edge of column 0 (x = -0.5) to the
    positions `at` (B, C, K), in columns -> (B, C, K). Column j covers [j - 0.5, j + 0.5)."""
    width = values.shape[-1]
    cumulative = F.pad(values.cumsum(-1), (1, 0))                                  # (B, C, W + 1)
    u = (at + 0.5).clamp(0, width)
    whole = u.floor().long().clamp(max=width - 1)
    partial = values.gather(-1, whole) * (u - whole)
    return cumulative.gather(-1, whole) + partial


def fit_start(presence, place, page_aspect, px_per_s=None, start=None, start_weight=None):
    """Where t = 0 of the page's time axis lies, and how well the layout fits: (B,) start column and
    (B,) score. place (B, 15, 2): page seconds of each strip's first and last sample (NaN: not drawn).

    The page's own scale fixes the pixels per second (px_per_s (B,) read from the grid, else 25 mm/s on a
    page 8.5 in tall and page_aspect wide), so no strip can come out stretched; only the start is read from
    the image, to a twentieth of a column: the start at which every strip's box best covers the columns
    where that strip is present (columns outside every box, or a box over absent columns, cost). Each
    strip's two ends vote, so the start is far steadier than any one edge; a column's error is about 8
    samples, which costs Pearson more than any amplitude error. start (B,): where the page's calibration
    pulses end, in input columns (NaN: no pulse found); the fit is held near it with start_weight per column
    (None: PULSE_START_WEIGHT; a trained model carries its own, tuned on its validation pages)."""
    batch, _, width = presence.shape
    px_per_s = page_px_per_s(width, page_aspect, px_per_s).view(-1, 1)
    covered = presence.sigmoid() - 0.5                                            # (B, 15, W)
    shown = torch.isfinite(place).all(-1)                                         # (B, 15)
    place = torch.nan_to_num(place)
    prior = start_prior(start, batch, width, presence.device, start_weight)
    # whole columns first, then a twentieth of a column around the best: the score is piecewise linear in
    # the start with slopes of a few units per column, so the coarse best lies within a column of the fine one
    coarse = torch.arange(-START_REACH, width, 1.0, device=presence.device).expand(batch, -1)
    score = start_scores(covered, shown, place, px_per_s, coarse, prior)
    around = torch.arange(-1.0, 1.0 + START_STEP / 2, START_STEP, device=presence.device)
    fine = coarse.gather(1, score.argmax(1, keepdim=True)) + around                # (B, K)
    best, index = start_scores(covered, shown, place, px_per_s, fine, prior).max(1)
    return fine.gather(1, index[:, None])[:, 0], best


def start_prior(start, batch, width, device, start_weight=None):
    """(centre, weight per column) (B, 1) each of the start's prior: the pulse's end where it was found,
    else, barely, where ecg-image-kit starts its traces."""
    centre = torch.full((batch, 1), TRACE_START * width, device=device)
    weight = torch.full((batch, 1), START_PRIOR_WEIGHT, device=device)
    if start is None:
        return centre, weight
    start = start.to(device).float().view(-1, 1)
    known = torch.isfinite(start)
    pulse_weight = PULSE_START_WEIGHT if start_weight is None else start_weight
    return torch.where(known, start, centre), torch.where(known, torch.full_like(weight, pulse_weight), weight)


def start_scores(covered, shown, place, px_per_s, starts, prior):
    """fit_start's score (B, K) of each candidate start column (B, K); prior: start_prior's."""
    # a strip drawn from x0 to x1 fills columns round(x0) .. round(x1): the box is half a column wider each side
    left = starts[:, None] + place[..., :1] * px_per_s[..., None] - 0.5           # (B, 15, K)
    right = starts[:, None] + place[..., 1:] * px_per_s[..., None] + 0.5
    inside = continuous_cumsum(covered, right) - continuous_cumsum(covered, left)
    unexplained = covered.clamp(min=0).sum(-1, keepdim=True)                    # a strip the layout lacks
    score = torch.where(shown[..., None], inside, -unexplained).sum(1)          # (B, K)
    centre, weight = prior
    return score - weight * (starts - centre).abs()


def layout_spans(presence, place, page_aspect, px_per_s=None, start=None, start_weight=None):
    """(B, 15, W) presence logits -> (B, 15, 2) column spans of each strip on the page's one time axis
    (fit_start): the start plus each strip's place (B, 15, 2) in seconds at the page's px_per_s."""
    x0, _ = fit_start(presence, place, page_aspect, px_per_s, start, start_weight)
    px_per_s = page_px_per_s(presence.shape[-1], page_aspect, px_per_s).view(-1, 1, 1)
    return x0.view(-1, 1, 1) + place * px_per_s


def choose_layouts(presence, names, page_aspect, px_per_s=None, paper_speed=None, start=None, start_weight=None):
    """The layout of each page among `names` (ecg_page.LAYOUTS keys): the one whose strips best fit where
    the model sees strips (fit_start's score), among those at the paper speed the page's pulse shows
    (paper_speed (B,), NaN or None: 25 mm/s) where there are any. Layouts that differ only in the rhythm
    strips' leads draw the same strips; pick_layouts tells them apart by what the strips show.
    -> [Layout] per page."""
    distinct = {}
    for name in names:   # one fit per set of strips: 3x4+II and 3x4+V1 draw the same
        distinct.setdefault(strip_plan(LAYOUTS[name]), LAYOUTS[name])
    layouts = list(distinct.values())
    if len(layouts) == 1:
        return layouts * presence.shape[0]
    batch, _, width = presence.shape
    page_speed = page_speeds(paper_speed, batch, presence.device)
    layouts = at_page_speeds(layouts, page_speed)
    scores = []
    for layout in layouts:
        _, places, _ = layout_strips([layout] * batch, presence.device)
        speed_px = layout_px_per_s(width, page_aspect, px_per_s, page_speed, [layout] * batch)
        score = fit_start(presence, places, page_aspect, speed_px, start, start_weight)[1]
        scores.append(score - SPEED_MISMATCH * (page_speed != layout.paper_speed_mm_s).float())
    best = torch.stack(scores, 1).argmax(1).tolist()
    return [layouts[i] for i in best]


def at_page_speeds(layouts, page_speed):
    """The layouts drawn at a paper speed some page (B,) shows, when every page has some: a layout at another
    speed loses by SPEED_MISMATCH, far more than fits differ, so its fit is not worth computing (half of the
    untrained-layout check at inference)."""
    shown = set(page_speed.tolist())
    matching = [layout for layout in layouts if layout.paper_speed_mm_s in shown]
    covered = shown <= {layout.paper_speed_mm_s for layout in matching}
    return matching if covered else layouts


def strip_plan(layout):
    """What a layout draws where, without the leads' order or the rhythm strips' leads: layouts alike in
    this fit alike (3x4+II, 3x4+V1 and 3x4+II-Cabrera draw the same strips)."""
    return layout.channel_rows or layout.rows, len(layout.rhythm), layout.restart_columns, layout.paper_speed_mm_s


def untrained_fits(presence, trained, page_aspect, px_per_s=None, paper_speed=None, start=None, start_weight=None):
    """Per page, the name of the layout (among all of ecg_page.LAYOUTS) whose strips fit the presence maps
    best when the model was trained on no layout drawing those strips, else None: inference warns on such
    pages, which it reads as the nearest trained layout. Rhythm channels beyond those a trained layout draws
    were never taught what they show (a model widened from one rhythm channel has copies of it there, present
    along every standard page's rhythm strip): they are read as showing nothing."""
    known = {strip_plan(LAYOUTS[name]) for name in trained}
    taught = RHYTHM + max(len(LAYOUTS[name].rhythm) for name in trained)
    presence = torch.cat([presence[:, :taught], torch.full_like(presence[:, taught:], -1e4)], dim=1)
    best = choose_layouts(presence, whole_pages(LAYOUTS), page_aspect, px_per_s, paper_speed, start, start_weight)
    return [None if strip_plan(layout) in known else layout.name for layout in best]
LIMB_LEADS = [LEADS.index(lead) for lead in ('I', 'II', 'III', 'aVR', 'aVL', 'aVF')]
RELABEL_MISFIT = 0.5    # Cabrera pages read in their order: misfit 0.02-0.07 on 3x4, 0.2-0.5 on 12x1 (mix model),
RELABEL_MARGIN = 0.6    # against 0.25-0.8 read in the standard order; standard pages the other way round
DOUBTFUL_MISFIT = 0.3   # standard pages read well stay below it (real ECGs on ecg-image-kit pages: at most 0.36)


# each limb lead as a combination of I and II (Einthoven: III = II - I; Goldberger: aVR = -(I + II) / 2, ...)
LIMB_IN_I_II = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [-0.5, -0.5], [1.0, -0.5], [-0.5, 1.0]])


def shown_patterns(seen):
    """(K, T) bool: which of K readings are shown at each instant -> [(pattern (K,) bool, instants (T,) bool)]
    for each distinct pattern, by one integer code per instant (torch.unique over rows sorts 5000 rows: 6 ms
    a page)."""
    bits = torch.arange(len(seen), device=seen.device)
    codes = (seen.long() << bits[:, None]).sum(0)
    return [((code >> bits) & 1 == 1, codes == code) for code in torch.unique(codes)]


def limb_misfit(readings):
    """How far the limb leads shown together (3 or more readings at an instant, each centred) stray from the
    plane Einthoven's and Goldberger's laws confine them to: the share of their power outside it. Near 0
    when each reading is the lead it is taken for, large when the order is wrong (a rhythm strip of II and
    the short strip read as II must then agree too). readings: [(lead index, values (T,), shown (T,))];
    NaN when no 3 limb readings are shown together."""
    stack = limb_stack(readings)
    return float('nan') if stack is None else stack_misfit(*stack)


def limb_stack(readings):
    """The limb leads among readings [(lead index, values (T,), shown (T,))]: (their places in LIMB_LEADS (K,),
    values (K, T) float, shown (K, T) bool), or None with fewer than 3."""
    limb = [(LIMB_LEADS.index(lead), values, shown) for lead, values, shown in readings if lead in LIMB_LEADS]
    if len(limb) < 3:
        return None
    return ([k for k, _, _ in limb], torch.stack([v for _, v, _ in limb]).float(),
            torch.stack([s for _, _, s in limb]))


def stack_misfit(limb, values, seen):
    """limb_misfit of a limb_stack."""
    in_i_ii = LIMB_IN_I_II.to(values.device)[limb]
    outside = total = 0.0
    for pattern, at in shown_patterns(seen):
        if int(pattern.sum()) < 3:
            continue
        y = values[pattern][:, at]
        y = y - y.mean(1, keepdim=True)
        basis, _ = torch.linalg.qr(in_i_ii[pattern])
        outside += float((y - basis @ (basis.T @ y)).pow(2).sum())
        total += float(y.pow(2).sum())
    return outside / total if total > 0 else float('nan')
LIMB_FIT = True


def fit_limb_leads(signal, sampled, valid, layouts):
    """Einthoven's and Goldberger's laws applied to what the page shows: wherever three or more limb-lead
    readings are shown at once (on the standard page I, II, III and the rhythm strip's II in the first
    column, aVR, aVL, aVF and II in the second), the six limb leads are the least-squares fit of those
    readings by two (I and II), so each strip's independent misreadings partly cancel (+0.008 Pearson on
    held-out pages). Only on pages whose readings obey those laws (limb_misfit at most RELABEL_MISFIT): read
    in a wrong lead order they would mix the wrong strips. (B, 12, 5000) signal -> the same with the shown
    limb leads replaced; sampled, valid (B, 15, 5000) channels; layouts: the Layout of each page."""
    signal = signal.clone()
    basis_all = LIMB_IN_I_II.to(signal.device, signal.dtype)
    for b, layout in enumerate(layouts):
        stack = limb_stack(order_readings(sampled[b], valid[b], layout))
        if stack is None or not stack_misfit(*stack) <= RELABEL_MISFIT:
            continue
        limb, values, seen = stack
        values = values.to(signal.dtype)
        basis = basis_all[limb]
        for pattern, at in shown_patterns(seen):
            if int(pattern.sum()) < 3 or torch.linalg.matrix_rank(basis[pattern]) < 2:
                continue
            in_i_ii = torch.linalg.lstsq(basis[pattern], values[pattern][:, at]).solution      # (2, T)
            leads = sorted({k for k, on in zip(limb, pattern.tolist()) if on})
            rows = torch.tensor([LIMB_LEADS[k] for k in leads], device=signal.device)
            signal[b, rows[:, None], at.nonzero()[:, 0][None]] = basis_all[leads] @ in_i_ii
    return signal


@dataclass(frozen=True)
class LeadOrder:
    """How a page's lead order was chosen among orders drawing the same strips (standard, Cabrera): each
    order's limb misfit (limb_misfit; NaN: no three limb readings shown together) and the verdict, for the
    sidecar: 'standard', 'relabelled' (another order fits the limb-lead laws clearly), or 'unclear' (the
    standard order fits them poorly, and no other order clearly better: the standard order is kept)."""
    chosen: str
    standard_misfit: float
    other: str
    other_misfit: float
    verdict: str


def pick_layouts(sampled, valid, layouts, names):
    """Each page's layout among the `names` that draw the strips of the chosen one (layouts): for each lead
    order, the rhythm leads whose own short strips the rhythm strips match best (Pearson r where both are
    shown); then the order whose limb leads, rhythm strips included, fit Einthoven's and Goldberger's laws
    best (limb_misfit: a Cabrera page draws the standard page's strips). sampled, valid (B, 15, 5000): every
    channel read at the 500 Hz instants. -> [Layout] per page, [LeadOrder or None (one order drawn)]."""
    found, orders_read = [], []
    for i, layout in enumerate(layouts):
        options = [LAYOUTS[n] for n in names if strip_plan(LAYOUTS[n]) == strip_plan(layout)] or [layout]
        orders = {}
        for option in options:
            orders.setdefault(option.rows, []).append(option)
        best = [best_rhythm(sampled[i], valid[i], group) for group in orders.values()]
        order = None if len(best) == 1 else pick_order(sampled[i], valid[i], best)
        found.append(best[0] if order is None else next(option for option in best if option.name == order.chosen))
        orders_read.append(order)
    return found, orders_read


def pick_order(sampled, valid, options):
    """Among layouts that draw the same strips in other lead orders, the plain order unless a relabelled
    one (Cabrera) fits the limb-lead laws well (misfit at most RELABEL_MISFIT) and far better than it (at most
    RELABEL_MARGIN of its misfit). Trained weights read no real standard page as Cabrera; a 1-epoch model's noise
    can pass (misfit 0.32 against 0.59 seen, since each strip's 0 mV row is one line). -> LeadOrder."""
    plain = next((option for option in options if not option.channel_rows), options[0])
    misfit = {option.name: limb_misfit(order_readings(sampled, valid, option)) for option in options}
    bar = min(RELABEL_MISFIT, RELABEL_MARGIN * misfit[plain.name]) if math.isfinite(misfit[plain.name]) \
        else RELABEL_MISFIT
    others = [option for option in options if option is not plain]
    other = min(others, key=lambda option: misfit[option.name] if math.isfinite(misfit[option.name]) else math.inf)
    if misfit[other.name] <= bar:
        chosen, verdict = other, 'relabelled'
    else:
        chosen, verdict = plain, 'unclear' if misfit[plain.name] > DOUBTFUL_MISFIT else 'standard'
    return LeadOrder(chosen.name, misfit[plain.name], other.name, misfit[other.name], verdict)


def order_readings(sampled, valid, layout):
    """[(lead index, values (5000,), shown (5000,))]: each lead's short strip as `layout` reads the channels
    (15, 5000), then its rhythm strips."""
    channel, sign = layout.lead_channels()
    readings = [(lead, sampled[c] * float(sign[lead]), valid[c]) for lead, c in enumerate(channel.tolist())]
    readings += [(lead, sampled[RHYTHM + k], valid[RHYTHM + k]) for k, lead in enumerate(layout.rhythm_leads)
                 if lead >= 0]
    return readings


def best_rhythm(sampled, valid, group):
    """Among layouts of one lead order (group), the one whose rhythm leads' short strips the rhythm strips
    (15, 5000 channels) match best (summed Pearson r)."""
    if len(group) == 1:
        return group[0]
    readings = order_readings(sampled, valid, group[0])

    def match(option):
        return sum(masked_pearson(sampled[RHYTHM + k], readings[lead][1], valid[RHYTHM + k] & readings[lead][2])
                   for k, lead in enumerate(option.rhythm_leads) if lead >= 0)
    return max(group, key=match)


def masked_pearson(a, b, mask):
    """Pearson r of two (T,) readings over mask (-1 where fewer than 10 samples overlap)."""
    if int(mask.sum()) < 10:
        return -1.0
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-9))


def sample_columns(values, window, span):
    """Read (B, 15, W) per-column values at each 500 Hz instant: channel c's window [t0, t1] maps
    linearly onto its column span [x0, x1]. Returns (B, 15, 5000) values and a validity mask."""
    t = torch.arange(N_SAMPLES, device=values.device, dtype=torch.float32) / FS
    t0, t1 = window[..., :1], window[..., 1:]
    x0, x1 = span[..., :1], span[..., 1:]
    x = x0 + (t - t0) / (t1 - t0).clamp(min=1e-6) * (x1 - x0)
    valid = (t >= t0 - 1e-6) & (t <= t1 + 1e-6) & torch.isfinite(x)
    width = values.shape[-1]
    x = torch.nan_to_num(x, nan=0.0).clamp(0, width - 1)
    left = x.floor().long().clamp(max=width - 2)
    frac = x - left
    v_left = values.gather(-1, left)
    v_right = values.gather(-1, left + 1)
    return v_left * (1 - frac) + v_right * frac, valid


def channels_to_leads(values, valid, rhythm_leads=None, lead_channel=None, lead_sign=None):
    """(B, 15, 5000) channel readings -> (B, 12, 5000) leads: each lead from the channel of its short strip
    (lead_channel (B, 12), times lead_sign (B, 12); default its own channel, +1), and each rhythm strip fills
    its lead (rhythm_leads (B, 3), -1: none; default the standard page's II) and wins where both are shown."""
    short, short_valid = values[:, :N_LEADS], valid[:, :N_LEADS]
    if lead_channel is not None:
        index = lead_channel.to(values.device).long()[..., None].expand_as(short)
        short, short_valid = short.gather(1, index), short_valid.gather(1, index)
    if lead_sign is not None:
        short = short * lead_sign.to(values.device, values.dtype)[..., None]
    leads = torch.where(short_valid, short, torch.zeros_like(short))
    shown = short_valid.clone()
    if rhythm_leads is None:
        rhythm_leads = rhythm_lead_tensor([LAYOUT] * values.shape[0], values.device)
    rhythm_leads = rhythm_leads.to(values.device).long().view(values.shape[0], -1)
    for k in range(rhythm_leads.shape[1]):
        lead = rhythm_leads[:, k]
        for_lead = F.one_hot(lead.clamp(min=0), N_LEADS).bool() & (lead >= 0)[:, None]   # (B, 12)
        rhythm = for_lead[..., None] & valid[:, RHYTHM + k:RHYTHM + k + 1]              # (B, 12, 5000)
        leads = torch.where(rhythm, values[:, RHYTHM + k:RHYTHM + k + 1], leads)
        shown = shown | rhythm
    return leads, shown


def read_channels(trace_rows, zero_rows, window, span, px_per_mv):
    """Page-frame rows per column (B, 15, W) -> each channel in mV at the 500 Hz instants of its window,
    and where it is shown: (B, 15, 5000) each."""
    value = (zero_rows - trace_rows) / px_per_mv.view(-1, 1, 1)
    return sample_columns(torch.nan_to_num(value, nan=0.0), window, span)


def decode_rows(trace_rows, zero_rows, presence, geometry):
    """Shared by the model and the round-trip bound: page-frame rows per column -> (B, 12, 5000) mV.

    trace_rows, zero_rows, presence: (B, 15, W); geometry (Geometry): trace_window and trace_span (B, 15, 2) or
    None (the standard page, its start read from presence); px_per_mv (B,); px_per_s (B,) or None: the page's
    columns per second when the span is read from presence; rhythm_leads (B, 3) or None (the standard
    page's); lead_channel, lead_sign (B, 12) or None: which channel holds each lead (channels_to_leads)."""
    window, span, px_per_mv, page_aspect, px_per_s = (geometry.trace_window, geometry.trace_span, geometry.px_per_mv,
                                                      geometry.page_aspect, geometry.px_per_s)
    rhythm_leads, lead_channel, lead_sign = geometry.rhythm_leads, geometry.lead_channel, geometry.lead_sign
    batch = trace_rows.shape[0]
    if page_aspect is None:
        page_aspect = torch.full((batch,), PAGE_ASPECT, device=trace_rows.device)
    if window is None:
        window, place, rhythm_leads = layout_strips([LAYOUT] * batch, trace_rows.device)
        span = layout_spans(presence, place, page_aspect, px_per_s)
    sampled, valid = read_channels(trace_rows, zero_rows, window, span, px_per_mv)
    return channels_to_leads(sampled, valid, rhythm_leads, lead_channel, lead_sign)


def decode_layouts(trace_rows, zero_rows, presence, geometry):
    """Decode pages whose layout is read from the image, among geometry.layouts (default: the standard page), at
    the paper speed (B,) the pages' pulses show: -> (B, 12, 5000) mV, (B, 12, 5000) shown, and what was used:
    each page's layout name (its lead order and rhythm lead told by what the strips show: pick_layouts), the
    strips' windows and spans (B, 15, 2), the rhythm strips' leads (B, 3) and the channel and sign of each lead
    (B, 12). trace_rows, zero_rows, presence: (B, 15, W) page-frame rows per column; geometry.px_per_mv and
    page_aspect given (B,)."""
    names, px_per_mv, page_aspect = geometry.layouts or [LAYOUT.name], geometry.px_per_mv, geometry.page_aspect
    px_per_s, paper_speed, start, start_weight = (geometry.px_per_s, geometry.paper_speed, geometry.start,
                                                  geometry.start_weight)
    chosen = choose_layouts(presence, names, page_aspect, px_per_s, paper_speed, start, start_weight)
    window, place, _ = layout_strips(chosen, trace_rows.device)
    page_speed = page_speeds(paper_speed, len(chosen), presence.device)
    span = layout_spans(presence, place, page_aspect,
                        layout_px_per_s(presence.shape[-1], page_aspect, px_per_s, page_speed, chosen), start,
                        start_weight)
    sampled, valid = read_channels(trace_rows, zero_rows, window, span, px_per_mv)
    found, lead_orders = pick_layouts(sampled, valid, chosen, names)
    rhythm_leads = rhythm_lead_tensor(found, sampled.device)
    lead_channel, lead_sign = lead_maps(found, sampled.device)
    signal, shown = channels_to_leads(sampled, valid, rhythm_leads, lead_channel, lead_sign)
    if LIMB_FIT:
        signal = fit_limb_leads(signal, sampled, valid, found)
    return signal, shown, dict(layouts=[layout.name for layout in found], lead_orders=lead_orders, window=window,
                               span=span, rhythm_leads=rhythm_leads, lead_channel=lead_channel, lead_sign=lead_sign)


def decode_signal(trace, geometry):
    """Signal head: (B, 45, H, W) trace maps -> (B, 12, 5000) mV, plus the page-frame rows it read; geometry
    (Geometry) with its theta known. px_per_mv, px_per_s: NaN or None falls back to the page border.
    Without a trace_window, the layout is read from the maps among geometry.layouts, at the paper speed each
    page's pulse shows (NaN or None: 25 mm/s), its time start held near where the page's pulses end (start,
    NaN or None: from the presence maps alone) with start_weight per column (fit_start). With a window,
    lead_channel and lead_sign say which channel holds each lead (None: its own; channels_to_leads)."""
    batch, _, height, width = trace.shape
    device = trace.device
    page_aspect = geometry.page_aspect
    if page_aspect is None:
        page_aspect = torch.full((batch,), PAGE_ASPECT, device=device)
    px_per_mv = page_px_per_mv(height, batch, device, geometry.px_per_mv)
    # one split, not three slices: each slice's backward fills a zero gradient of all 45 maps
    trace_maps, zero_maps, presence_maps = torch.split(to_page_frame_batch(trace, geometry.theta, page_aspect),
                                                       N_TRACES, 1)
    trace_rows, trace_log_prob = column_soft_argmax(trace_maps)
    zero_rows, zero_log_prob = column_soft_argmax(zero_maps)
    presence = column_presence(presence_maps)
    if ZERO_LINE:
        zero_rows = straight_zero_rows(zero_rows, presence)
    read = replace(geometry, px_per_mv=px_per_mv, page_aspect=page_aspect)
    if geometry.trace_window is None:
        signal, _, used = decode_layouts(trace_rows, zero_rows, presence, read)
    else:
        signal, _ = decode_rows(trace_rows, zero_rows, presence, read)
        used = dict(layouts=None, lead_orders=None, window=geometry.trace_window, span=geometry.trace_span,
                    rhythm_leads=geometry.rhythm_leads, lead_channel=geometry.lead_channel,
                    lead_sign=geometry.lead_sign)
    # what the signal was decoded with, so row_spread reads the very same strips
    return signal, dict(trace=trace_rows, zero=zero_rows, presence=presence, trace_log_prob=trace_log_prob,
                        zero_log_prob=zero_log_prob, px_per_mv=px_per_mv, **used)


def row_spread(out):
    """How sure the signal head is, per sample: the spread (standard deviation, in mV) of each column's row
    softmax, read at the same 500 Hz instants as the signal -> (B, 12, 5000). A sharp trace map gives a
    few hundredths of a mV; a column where the map hesitates between rows gives tenths."""
    rows = out['trace_rows']
    prob = rows['trace_log_prob'].exp()
    grid = torch.arange(prob.shape[-2], device=prob.device, dtype=prob.dtype).view(1, 1, -1, 1)
    variance = (prob * (grid - rows['trace'].unsqueeze(2)) ** 2).sum(2)
    spread_rows = variance.clamp(min=0).sqrt()
    read = Geometry(trace_window=rows['window'], trace_span=rows['span'], px_per_mv=rows['px_per_mv'],
                    rhythm_leads=rows['rhythm_leads'], lead_channel=rows.get('lead_channel'))   # a spread has no sign
    spread, _ = decode_rows(-spread_rows, torch.zeros_like(spread_rows), rows['presence'], read)
    return spread


def to_page_frame_batch(maps, theta_deg, page_aspect):
    """Per-sample de-rotation (each sample has its own angle and page shape) of (B, C, H, W) maps; a batch
    whose pages are all turned by less than NEGLIGIBLE_TURN_DEG is taken as it is. (Resampling only the
    turned pages of a batch costs more in the copy that puts them back than it saves.)"""
    if theta_deg is None:
        return maps
    theta_deg = theta_deg.to(maps.device).float()
    if bool((theta_deg.abs() < NEGLIGIBLE_TURN_DEG).all()):
        return maps
    grid = page_grid(theta_deg, page_aspect.to(maps.device).float(), maps.shape[-2:]).to(maps.dtype)
    return F.grid_sample(maps, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def page_grid(theta_deg, page_aspect, size_hw):
    """affine_grid for: image point = R(theta) page point, about the centre. In pixels of a page of
    aspect a = W_png / H_png, normalized x counts half-widths and y half-heights, so the rotation's
    off-diagonal terms are scaled by 1/a and a."""
    t = torch.deg2rad(theta_deg)
    cos, sin, zero = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    row_x = torch.stack([cos, -sin / page_aspect, zero], -1)
    row_y = torch.stack([sin * page_aspect, cos, zero], -1)
    matrix = torch.stack([row_x, row_y], 1)
    return F.affine_grid(matrix, (len(t), 1, *size_hw), align_corners=False)


def estimate_theta(baseline_logits, theta_regressed, page_aspect=None, max_deg=8.0):
    """Page rotation from the predicted 0 mV lines by the projection-profile method (the shear that
    makes the lines' row histogram sharpest), refined to 0.02 deg. It reads the most line-like pixels
    (as many as four page-wide lines have), so a blurry map still gives its ridges; when no angle
    sharpens the profile clearly, the regression head's angle stands. Not differentiable: it only
    chooses the decoding frame."""
    batch, _, height, width = baseline_logits.shape
    out = theta_regressed.detach().float().cpu().clone()
    aspect = page_aspect.detach().float().cpu() if page_aspect is not None else torch.full((batch,), PAGE_ASPECT)
    for b in range(batch):
        prob = baseline_logits[b, 0].detach().float().sigmoid().cpu().flatten()   # small search: CPU on any device
        weight, index = prob.topk(min(LINE_PIXELS_PER_COLUMN * width, prob.numel()))
        # each pixel as four points over its height: whole-row positions alone make 0 deg look sharpest
        rows = ((index // width).float()[:, None] + SUBROW_OFFSETS).flatten()
        cols = (index % width).float().repeat_interleave(len(SUBROW_OFFSETS))
        weight = weight.repeat_interleave(len(SUBROW_OFFSETS))
        stretch = (width / height) / float(aspect[b])

        def sharpness(angles):
            slopes = torch.tan(torch.deg2rad(angles)) / stretch   # input rows per input column
            return profile_sharpness(rows[None] - slopes[:, None] * (cols[None] - (width - 1) / 2), weight, height)

        best = float(out[b])
        for step, reach in ((0.25, max_deg), (0.02, 0.3)):
            angles = (0.0 if step == 0.25 else best) + torch.arange(-reach, reach + step / 2, step)
            scores = sharpness(angles)
            best = float(angles[scores.argmax()])
        if float(scores.max()) > SHARPER_BY * float(sharpness(out[b:b + 1]).max()):
            out[b] = best
    return out.to(theta_regressed.device)


def profile_sharpness(sheared_rows, weight, height, bins_per_row=4):
    """(A, N) candidate row positions of N weighted pixels -> (A,) sum of squared histogram counts.
    Linear splatting into quarter-row bins keeps sub-row shears apart on short inputs."""
    n_bins = height * bins_per_row
    pos = (sheared_rows * bins_per_row).clamp(0, n_bins - 2)
    low = pos.floor()
    frac = pos - low
    offset = n_bins * torch.arange(len(pos))[:, None]
    index = torch.cat([(low.long() + offset).flatten(), (low.long() + 1 + offset).flatten()])
    mass = torch.cat([((1 - frac) * weight).flatten(), (frac * weight).flatten()])
    hist = torch.bincount(index, mass, minlength=n_bins * len(pos)).view(len(pos), n_bins)
    return hist.pow(2).sum(1)
SEARCH_ELEMENTS = 2 ** 22   # candidate positions (images x angles x pixels) per pass: about 150 MB of temporaries


def estimate_theta_batch(baseline_logits, theta_regressed, page_aspect=None, max_deg=8.0):
    """estimate_theta for a whole batch at once, on the maps' device (same search, same result within
    0.02 deg): (B, 1, H, W) logits, (B,) regressed degrees, (B,) page aspects -> (B,) degrees. All
    images and candidate angles go through one histogram; big batches of big inputs in several passes."""
    batch, _, height, width = baseline_logits.shape
    device = baseline_logits.device
    regressed = theta_regressed.detach().float().to(device)
    aspect = page_aspect.detach().float().to(device) if page_aspect is not None else \
        torch.full((batch,), PAGE_ASPECT, device=device)
    prob = baseline_logits.detach()[:, 0].float().sigmoid().flatten(1)                # (B, H*W)
    weight, index = prob.topk(min(LINE_PIXELS_PER_COLUMN * width, prob.shape[1]), dim=1)
    offsets = SUBROW_OFFSETS.to(device)
    rows = ((index // width).float()[..., None] + offsets).flatten(1)                 # (B, N)
    cols = (index % width).float().repeat_interleave(len(offsets), dim=1) - (width - 1) / 2
    weight = weight.repeat_interleave(len(offsets), dim=1)
    stretch = (width / height) / aspect
    per_pass = max(1, SEARCH_ELEMENTS // (rows.shape[1] * round(2 * max_deg / 0.25 + 1)))
    return torch.cat([search_angles(rows[i:i + per_pass], cols[i:i + per_pass], weight[i:i + per_pass],
                                    stretch[i:i + per_pass], regressed[i:i + per_pass], height, max_deg)
                      for i in range(0, batch, per_pass)]).to(theta_regressed.device)


def search_angles(rows, cols, weight, stretch, regressed, height, max_deg):
    """(B, N) pixel rows, centred columns and weights of B images -> (B,) angles: 0.25 deg steps over
    +-max_deg, then 0.02 deg steps around the best; the regressed angle stands unless beaten clearly."""
    def sharpness(angles):                                                             # (B, A) -> (B, A)
        slopes = torch.tan(torch.deg2rad(angles)) / stretch[:, None]
        sheared = rows[:, None] - slopes[..., None] * cols[:, None]                    # (B, A, N)
        return profile_sharpness_batch(sheared, weight, height)

    coarse = torch.arange(-max_deg, max_deg + 0.125, 0.25, device=rows.device).expand(len(rows), -1)
    best = coarse.gather(1, sharpness(coarse).argmax(1, keepdim=True))
    fine = best + torch.arange(-0.3, 0.3 + 0.01, 0.02, device=rows.device)
    scores = sharpness(fine)
    best = fine.gather(1, scores.argmax(1, keepdim=True))[:, 0]
    sharper = scores.amax(1) > SHARPER_BY * sharpness(regressed[:, None])[:, 0]
    return torch.where(sharper, best, regressed)


def profile_sharpness_batch(sheared_rows, weight, height, bins_per_row=4):
    """profile_sharpness of B images at once: (B, A, N) row positions, (B, N) weights -> (B, A). One
    scatter_add over every (image, angle) row: bincount's single flat histogram runs 4x slower on the CPU."""
    n_bins = height * bins_per_row
    pos = (sheared_rows * bins_per_row).clamp_(0, n_bins - 2)
    low = pos.floor()
    upper = pos.sub_(low).mul_(weight[:, None])                  # the mass that goes to the bin above
    low = low.long().flatten(0, 1)
    hist = torch.zeros(low.shape[0], n_bins, device=pos.device)
    hist.scatter_add_(1, low, (weight[:, None] - upper).flatten(0, 1))
    hist.scatter_add_(1, low.add_(1), upper.flatten(0, 1))
    return hist.pow(2).sum(-1).view(sheared_rows.shape[:2])
TRACE_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                 (240, 50, 230), (150, 150, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
                 (60, 180, 75), (0, 130, 200), (245, 130, 48)]   # the rhythm strips last


def page_to_image_xy(x, y, theta_deg, page_aspect, size_hw):
    """Page-frame input pixels -> image-frame input pixels (the turn that to_page_frame_batch undoes)."""
    height, width = size_hw
    xn, yn = (2 * x + 1) / width - 1, (2 * y + 1) / height - 1
    t = math.radians(float(theta_deg))
    xi = math.cos(t) * xn - math.sin(t) / page_aspect * yn
    yi = math.sin(t) * page_aspect * xn + math.cos(t) * yn
    return ((xi + 1) * width - 1) / 2, ((yi + 1) * height - 1) / 2


def draw_prediction(image, outputs, index, page_aspect=PAGE_ASPECT, thickness=1):
    """(H, W, 3) uint8 RGB with the traces the model reads drawn over it, lead by lead."""
    import cv2
    import numpy as np
    picture = np.ascontiguousarray(image).copy()
    rows = outputs['trace_rows']
    theta = float(outputs['decode_theta'][index])
    present = (rows['presence'][index].sigmoid() > PRESENCE_THRESHOLD).cpu().numpy()
    trace = rows['trace'][index].detach().float().cpu().numpy()
    for channel in range(N_TRACES):
        cols = np.flatnonzero(present[channel])
        if len(cols) < 2:
            continue
        x, y = page_to_image_xy(cols.astype(np.float64), trace[channel, cols], theta, page_aspect, picture.shape[:2])
        points = np.round(np.stack([x, y], 1) * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(picture, [points], False, TRACE_COLOURS[channel], thickness, cv2.LINE_AA, shift=4)
    return picture
