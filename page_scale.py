#!/usr/bin/env python3
"""Physical scale of a paper-ECG page read from what is printed on it.

The decoder needs pixels per mV and pixels per second. Taking them from the image border (an
uncropped 8.5 in page) breaks as soon as a page is padded, cropped or rescaled, so this module
measures them on the page itself:

  1. the grid (main path): 1 mm minor / 5 mm major lines. A windowed 2-D FFT of a central square
     of a 'grid-ness' map shows each line family as a ray of harmonic peaks, rotated with the page;
     the ray's angle gives the rotation and the comb's fundamental the 5 mm period, refined to a
     fraction of a frequency bin from all its harmonics.
  2. the calibration pulse (fallback and cross-check): the 1 mV x 0.2 s rectangle at the left of
     each row. Its height is px per mV and its width px per 0.2 s; with a grid they give the gain
     (5/10/20 mm/mV) and paper speed (25/50 mm/s), without one the pulse's shape on square pixels does.

Arrays: rgb is (H, W, 3) uint8 RGB at the page's own resolution; maps are (h, w) float32.

    python page_scale.py IMAGE...        # prints the scale found per image and the seconds it took
    python page_scale.py --score FOLDER  # pages with their JSON: how many gains and speeds are read right
"""
import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.fft

import ecg_cli
from page_image import read_rgb

from ecg_page import CAL_PULSE_MV as PULSE_MV, CAL_PULSE_S as PULSE_S, GAINS_MM_MV, MAJOR_MM
from ecg_page import MM_PER_MV as STANDARD_GAIN_MM_MV, MM_PER_S as STANDARD_SPEED_MM_S, PAGE_ASPECT, PAGE_HEIGHT_MM
from ecg_page import PAPER_SPEEDS_MM_S as SPEEDS_MM_S

PX_PER_MM_RANGE = (1.8, 26.0)     # 45 .. 660 dpi
SCALE_SIDE_PX = 4400              # a page with a longer side (600 dpi scans, 48 MP photos of a page) is read on a
                                  # copy shrunk to it, about 400 dpi: its grid stays inside PX_PER_MM_RANGE
FFT_SIZE = 1024                   # central square analysed; ~43 mm even at 600 dpi
MAX_ANGLE_DEG = 12.0
ANGLE_STEP_DEG = 0.2
SHEAR_STEPS = 15                  # each family refined within 3 deg of the pair: x and y scaled
                                  # differently make a rotated grid slightly oblique
PEAK_MIN_LOG = 2.5                # a harmonic stands e^2.5 = 12x above the median of its
                                  # neighbourhood: noise does so at ~1 bin in 2000
BACKGROUND_BINS = 9               # running-median width along a ray (peaks are ~3 bins wide)
PLAUSIBLE_SCALE = (0.6, 1.5)       # grid px/mm over the border's when no pulse confirms it: padding ~0.8, crops > 1
HARMONIC_TOL_BINS = (1.5, 0.5)    # matching a candidate comb, then its least-squares refinement


@dataclass
class KnownGrid:
    """A page's grid scale known before reading it: page_flatten put the page's lines on an even lattice and
    read its px per mm over the whole page (confidence: the share of the page where the grid was clear)."""
    px_per_mm_x: float
    px_per_mm_y: float
    confidence: float


@dataclass
class PageScale:
    """What estimate_scale found. px per mV = px_per_mm_y * gain_mm_mv (px_per_mv), px per s =
    px_per_mm_x * paper_speed_mm_s (px_per_s)."""
    px_per_mm_x: float = float('nan')   # along the paper's time axis (image columns, de-rotated)
    px_per_mm_y: float = float('nan')   # along the paper's voltage axis (image rows, de-rotated)
    source: str | None = None           # 'grid', 'pulse' or None (nothing found)
    confidence: float = 0.0             # 0..1
    angle_deg: float = 0.0              # page rotation, positive clockwise on screen
    gain_mm_mv: float = STANDARD_GAIN_MM_MV
    paper_speed_mm_s: float = STANDARD_SPEED_MM_S
    gain_assumed: bool = True           # True: the standard value, not measured on a pulse
    speed_assumed: bool = True
    pulse: dict | None = None           # find_calibration_pulse's answer, when one was found


# ----------------------------------------------------------------------------------------------
# Grid: grid-ness map -> 2-D spectrum -> ray angle -> harmonic comb -> px per mm
# ----------------------------------------------------------------------------------------------

def percentile_u8(a, q, mask=None):
    """q-th percentile (0..100) of a 2-D uint8 array, over the pixels where the uint8 mask is set (None: all),
    from cv2's histogram (no sort; a third of np.bincount's time, and a mask instead of a copy)."""
    cum = np.cumsum(cv2.calcHist([a], [0], mask, [256], [0, 256]).ravel().astype(np.int64))
    return int(np.searchsorted(cum, q / 100.0 * cum[-1]))


def paper_colour(rgb):
    """(3,) float: per-channel median of the brighter half of the page (paper dominates any grid). Every 4th
    pixel; the medians from histograms (numpy's sort and its 3-wide sums took twice as long)."""
    channels = cv2.split(np.ascontiguousarray(rgb[::4, ::4]))
    lum = cv2.add(cv2.add(channels[0], channels[1], dtype=cv2.CV_16U), channels[2], dtype=cv2.CV_16U)
    cum = np.cumsum(cv2.calcHist([lum], [0], None, [3 * 255 + 1], [0, 3 * 255 + 1]).ravel().astype(np.int64))
    median = (np.searchsorted(cum, (lum.size - 1) // 2 + 1) + np.searchsorted(cum, lum.size // 2 + 1)) / 2
    bright = (lum >= median).view(np.uint8)
    return np.array([percentile_u8(channel, 50, bright) for channel in channels], np.float32)


def max_channel(rgb):
    """(H, W) uint8 brightest channel: the trace is dark in all three, a coloured grid is not."""
    r, g, b = cv2.split(rgb)
    return cv2.max(cv2.max(r, g), b)


def gridness(rgb, paper):
    """(h, w) float32 distance of each pixel's colour from the paper's (3,) colour. Lines of any
    hue, and grey lines on white, all stand out; the trace stands out too but is not periodic."""
    # each channel's squared distance by a lookup table: one pass instead of building a paper image,
    # differencing, converting and squaring
    levels = np.arange(256, dtype=np.float32)[:, None]
    squared = (levels - np.clip(np.rint(paper), 0, 255).astype(np.float32)) ** 2            # (256, 3)
    d2 = cv2.LUT(rgb, squared[None])
    return cv2.sqrt(cv2.transform(d2, np.ones((1, 3), np.float32)))


def central_square(rgb, n):
    """(n', n', ...) view of the middle of the page, n' = min(n, H, W): grid is densest there."""
    h, w = rgb.shape[:2]
    n = min(n, h, w)
    top, left = (h - n) // 2, (w - n) // 2
    return rgb[top:top + n, left:left + n]


def log_spectrum(g):
    """(n, n) float32 log power of the Hann-windowed map, DC at [0, 0] (rays read with wrap)."""
    n = g.shape[0]
    win = np.hanning(n).astype(np.float32)
    g = (g - g.mean()) * np.outer(win, win)
    power = mirrored_power(scipy.fft.rfft2(g, workers=1))
    return np.log(power + power.mean() * 1e-6 + 1e-12)     # a blank page has no power at all


def mirrored_power(half):
    """(n, n // 2 + 1) rfft2 of a real (n, n) map -> (n, n) float32 power of its whole DFT: the missing
    columns mirror the present ones through DC (a real map's power is symmetric). scipy's real FFT and
    this copy take a sixth of the time of cv2.dft's complex output."""
    n, kept = half.shape[0], half.shape[1]
    power = np.empty((n, n), np.float32)
    power[:, :kept] = half.real ** 2 + half.imag ** 2
    # column k > n / 2 at row r is column n - k at row -r (mod n): columns n - kept .. 1, rows 0, n - 1 .. 1
    power[:, kept:] = np.roll(power[::-1, n - kept:0:-1], 1, axis=0)
    return power


def sample_rays(spec, angles_deg, radii, offsets=(0.0,)):
    """(len(angles), len(offsets), len(radii)) spectrum values along rays from DC at each angle (degrees,
    image x right, y down), each shifted sideways by each offset in bins. Bilinear, wrapping around the
    DFT; one remap for all of them (the search tries some 240 angles a page)."""
    n = spec.shape[0]
    a = np.deg2rad(np.asarray(angles_deg, np.float64))[:, None, None]
    ux, uy = np.cos(a), np.sin(a)
    off = np.asarray(offsets, np.float32)[None, :, None]
    x = (radii[None, None, :] * ux - off * uy) % n
    y = (radii[None, None, :] * uy + off * ux) % n
    shape = x.shape
    x, y = x.reshape(-1, shape[-1]).astype(np.float32), y.reshape(-1, shape[-1]).astype(np.float32)
    return cv2.remap(spec, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP).reshape(shape)


def ray_contrasts(spec, angles_deg, radii):
    """(len(angles), len(radii)) log power along each ray minus its running median: harmonic peaks stand out,
    the broadband streak of the trace, text and page edges along the same direction does not."""
    along = sample_rays(spec, angles_deg, radii, offsets=(-1.0, 0.0, 1.0)).max(1)
    return along - running_median(along, BACKGROUND_BINS)


def running_median(rows, width):
    """(A, R) -> each row's median over `width` (odd) neighbours, edges repeated: scipy.ndimage.median_filter
    of size (1, width) with mode 'nearest', value for value, in a tenth of its time: the `width` shifted
    copies of the rows are sorted element by element by odd-even transposition (width rounds of
    np.minimum / np.maximum), and the middle one is the median."""
    half = width // 2
    padded = np.pad(rows, ((0, 0), (half, half)), mode='edge')
    shifted = [padded[:, i:i + rows.shape[1]] for i in range(width)]
    for sweep in range(width):
        for i in range(sweep % 2, width - 1, 2):
            low, high = shifted[i], shifted[i + 1]
            shifted[i], shifted[i + 1] = np.minimum(low, high), np.maximum(low, high)
    return shifted[half]


def ray_contrast(spec, angle_deg, radii):
    """(len(radii),) ray_contrasts of one ray."""
    return ray_contrasts(spec, [angle_deg], radii)[0]


def angle_scores(spec, angles, radii):
    """(len(angles),) how peaked the spectrum is along each ray: mean squared positive contrast,
    so a few strong grid harmonics outweigh the many weak ones of the trace rows' spacing."""
    return (np.clip(ray_contrasts(spec, angles, radii), 0, None) ** 2).mean(1)


def find_grid_angles(spec, radii):
    """(x ray angle, y ray angle) in degrees: the two line families are searched together (the
    paper's lines are square to each other), then each on its own within SHEAR_STEPS of the
    pair's best, refined by a parabola."""
    offsets = np.arange(-MAX_ANGLE_DEG, MAX_ANGLE_DEG + 1e-9, ANGLE_STEP_DEG)
    sx, sy = angle_scores(spec, offsets, radii), angle_scores(spec, offsets + 90.0, radii)
    i = int(np.argmax(sx + sy))
    near = np.arange(max(i - SHEAR_STEPS, 0), min(i + SHEAR_STEPS + 1, len(offsets)))
    ix, iy = near[np.argmax(sx[near])], near[np.argmax(sy[near])]
    return (float(offsets[ix] + ANGLE_STEP_DEG * parabolic_offset(sx, ix)),
            float(offsets[iy] + 90.0 + ANGLE_STEP_DEG * parabolic_offset(sy, iy)))


def parabolic_offset(v, i):
    """Sub-sample offset (-0.5..0.5) of the peak of v at index i from a parabola through 3 points."""
    if i <= 0 or i >= len(v) - 1:
        return 0.0
    den = v[i - 1] - 2 * v[i] + v[i + 1]
    return 0.0 if den >= 0 else float(np.clip(0.5 * (v[i - 1] - v[i + 1]) / den, -0.5, 0.5))


def ray_peaks(contrast):
    """Indices of local maxima of a ray's contrast that stand PEAK_MIN_LOG above background."""
    c = contrast
    is_max = (c[1:-1] >= c[:-2]) & (c[1:-1] > c[2:]) & (c[1:-1] > PEAK_MIN_LOG)
    return np.flatnonzero(is_max) + 1


def refine_peak(spec, kx, ky):
    """Sub-bin (kx, ky) of the spectral maximum nearest (kx, ky): the largest of its 5 x 5
    neighbourhood, then a parabola through 3 log-power values along each axis (the log of a
    Hann-windowed line is nearly parabolic, so this is accurate to a few hundredths of a bin)."""
    n = spec.shape[0]
    ix, iy = int(round(kx)), int(round(ky))
    rows = np.arange(iy - 2, iy + 3) % n
    cols = np.arange(ix - 2, ix + 3) % n
    patch = spec[np.ix_(rows, cols)]
    dy, dx = np.unravel_index(int(np.argmax(patch)), patch.shape)
    ix, iy = ix + dx - 2, iy + dy - 2
    across = spec[iy % n, np.arange(ix - 1, ix + 2) % n]
    down = spec[np.arange(iy - 1, iy + 2) % n, ix % n]
    return ix + parabolic_offset(across, 1), iy + parabolic_offset(down, 1)


def comb_hits(f0, r, tol):
    """(hit, h), each (len(f0), len(r)): peak j is harmonic h[i, j] of candidate f0[i]."""
    h = np.rint(r[None, :] / f0[:, None])
    return (h >= 1) & (np.abs(r[None, :] - h * f0[:, None]) < tol), h


def comb_scores(f0, r, s, tol):
    """(len(f0),) how well harmonics of each f0 explain peaks at radii r with strengths s:
    explained strength minus half a typical peak for every harmonic below the highest explained
    one that is missing (so f0/2 loses to f0, and 2*f0 loses the odd harmonics)."""
    hit, h = comb_hits(f0, r, tol)
    missing = (h * hit).max(1) - hit.sum(1)
    return (s[None, :] * hit).sum(1) - 0.5 * np.median(s) * missing


def refit(f0, r, tol):
    """(len(f0),) each candidate refit by least squares over the harmonics it explains (the
    highest weigh most); unchanged where it explains fewer than two."""
    hit, h = comb_hits(f0, r, tol)
    num, den = (hit * h * r[None, :]).sum(1), (hit * h * h).sum(1)
    return np.where(hit.sum(1) >= 2, num / np.maximum(den, 1), f0)


def fit_comb(r, s, f_lo, f_hi):
    """Fundamental (bins) of the best comb in [f_lo, f_hi] explaining peaks r with strengths s, or
    None. Candidates are every peak divided by 1..15, each refit on its loosely matched harmonics
    and scored on the tightly matched ones."""
    cands = (r[:, None] / np.arange(1, 16)[None, :]).ravel()
    cands = refit(cands[(cands >= f_lo) & (cands <= f_hi)], r, HARMONIC_TOL_BINS[0])
    if len(cands) == 0:
        return None
    return float(cands[int(np.argmax(comb_scores(cands, r, s, HARMONIC_TOL_BINS[1])))])


def comb_band(n):
    """(lowest, highest) lattice fundamental in bins of an n-point DFT over PX_PER_MM_RANGE."""
    return n / (MAJOR_MM * PX_PER_MM_RANGE[1]), n / (MAJOR_MM * PX_PER_MM_RANGE[0])


def ray_harmonics(spec, angle, radii):
    """(r, s): sub-bin radii and contrasts of the peaks along the ray at angle, or None."""
    contrast = ray_contrast(spec, angle, radii)
    idx = ray_peaks(contrast)
    if len(idx) < 2:
        return None
    a = np.deg2rad(angle)
    pts = [refine_peak(spec, radii[i] * np.cos(a), radii[i] * np.sin(a)) for i in idx]
    return np.array([np.hypot(x, y) for x, y in pts]), contrast[idx]


def describe_comb(n, angle, r, s, f0):
    """Axis dict for the comb of fundamental f0 (bins of an n-point DFT) over peaks (r, s), or
    None when it explains fewer than two peaks."""
    hit, h = (a[0] for a in comb_hits(np.array([f0]), r, HARMONIC_TOL_BINS[1]))
    if hit.sum() < 2:
        return None
    fifth, other = hit & (h % 5 == 0), hit & (h % 5 != 0)
    # minor lines distinguished: peaks at multiples of 5 clearly stronger than the others
    minor_seen = bool(fifth.any() and other.any() and s[fifth].mean() > s[other].mean() + 0.5)
    return dict(period_px=n / f0, angle_deg=angle, n_harmonics=int(hit.sum()), minor_seen=minor_seen,
                harmonics=h[hit].astype(int).tolist(), strength=float(s[hit].mean()), n=n, peaks=(r, s))


def measure_axis(spec, angle, radii):
    """One line family along the ray at angle (degrees; ~0 reads the vertical lines, so the x
    spacing, ~90 the horizontal ones): dict(period_px of the lattice fundamental, angle_deg,
    n_harmonics, minor_seen, harmonics, strength, n, peaks) or None."""
    found = ray_harmonics(spec, angle, radii)
    if found is None:
        return None
    f0 = fit_comb(*found, *comb_band(spec.shape[0]))
    return None if f0 is None else describe_comb(spec.shape[0], angle, *found, f0)


def comb_fit_at(axis, f):
    """(score, f0) of an axis's peaks refit near fundamental f (bins)."""
    r, s = axis['peaks']
    f0 = refit(np.array([f]), r, HARMONIC_TOL_BINS[0])
    return float(comb_scores(f0, r, s, HARMONIC_TOL_BINS[1])[0]), float(f0[0])


def reconcile(ax, ay):
    """(ax, ay) for two families that disagree. Aliasing at low dpi can lure one family's comb to
    a wrong fundamental: if the other family's fundamental explains its peaks about as well
    (CROSS_KEEP of its own score), it is refit there. A page really scaled differently along x
    and y keeps both: there each family's peaks fit only its own comb."""
    own = {id(a): comb_fit_at(a, a['n'] / a['period_px'])[0] for a in (ax, ay)}
    moves = []
    for a, b in ((ax, ay), (ay, ax)):
        score, f0 = comb_fit_at(a, b['n'] / b['period_px'])
        if score >= CROSS_KEEP * own[id(a)]:
            moves.append((score + own[id(b)], a, f0))
    if not moves:
        return ax, ay
    _, moved, f0 = max(moves, key=lambda m: m[0])
    refit_axis = describe_comb(moved['n'], moved['angle_deg'], *moved['peaks'], f0)
    return (refit_axis, ay) if moved is ax else (ax, refit_axis)


def measure_grid(rgb):
    """(x axis dict, y axis dict) from the central FFT_SIZE square (either may be None)."""
    square = central_square(rgb, FFT_SIZE)
    spec = log_spectrum(gridness(square, paper_colour(square)))
    n = spec.shape[0]
    radii = np.arange(int(comb_band(n)[0] * 0.8), n // 2 - 1, dtype=np.float32)
    angle_x, angle_y = find_grid_angles(spec, radii)
    return measure_axis(spec, angle_x, radii), measure_axis(spec, angle_y, radii)


# ----------------------------------------------------------------------------------------------
# The grid's extent: the page inside paper-coloured padding
# ----------------------------------------------------------------------------------------------

EXTENT_SIDE_PX = 800              # the extent is found on a copy with this long a side
GRID_MARK = 24.0                  # colour distance from the paper that marks a grid line, trace or letter
EXTENT_RUN_SHARE = 0.25           # rows (columns) crossing this share of the page's typical marks are the page's
EXTENT_GAP_SHARE = 0.03           # gaps this short (share of the side) inside the page are bridged
PADDING_MIN_SHARE = 0.05          # a border this share of the side or more (on some side) is padding to cut
GRID_EVEN_SHARE = 0.15            # a grid's lines cross every row and column of the page: the sparsest tenth
                                  # hold this share of the median's marks or more (padded ecg-image-kit pages
                                  # 0.27 or more; a page of text 0.0 along its rows, between the lines)


@dataclass(frozen=True)
class PageBox:
    """The page's grid inside an image padded around it (ecg-image-kit --random_padding): x0, y0 (first column
    and row) and x1, y1 (past the last), in the image's pixels."""
    x0: int
    y0: int
    x1: int
    y1: int


def marked_run(profile, gap):
    """(first, end) of the longest run of a (n,) profile above EXTENT_RUN_SHARE of its 90th percentile, runs
    apart by at most `gap` entries joined."""
    above = profile > EXTENT_RUN_SHARE * np.percentile(profile, 90)
    index = np.flatnonzero(above)
    if len(index) == 0:
        return 0, 0
    breaks = np.flatnonzero(np.diff(index) > gap + 1)
    starts, ends = np.r_[index[0], index[breaks + 1]], np.r_[index[breaks], index[-1]] + 1
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest])


def evenly_marked(marks):
    """Whether every row and column of a (h, w) bool mark map crosses marks, as a grid's do (GRID_EVEN_SHARE)."""
    for profile in (marks.mean(1), marks.mean(0)):
        if np.percentile(profile, 10) < GRID_EVEN_SHARE * max(float(np.median(profile)), 1e-9):
            return False
    return True


def grid_extent(rgb):
    """PageBox of the page's grid when the image holds paper-coloured padding around it (a border of at
    least PADDING_MIN_SHARE of a side), else None: a page whose grid reaches its edges (every unpadded render,
    scan or photo) is left whole. Rows and columns that cross grid lines (or traces, letters) are the page's;
    the fill around a turned image is not."""
    scale = min(1.0, EXTENT_SIDE_PX / max(rgb.shape[:2]))
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    paper = paper_colour(small)
    marks = gridness(small, paper) > GRID_MARK
    marks &= ~edge_fill(max_channel(small), float(paper.max()))
    h, w = marks.shape
    y0, y1 = marked_run(marks.mean(1), EXTENT_GAP_SHARE * h)
    x0, x1 = marked_run(marks.mean(0), EXTENT_GAP_SHARE * w)
    if y1 - y0 < h / 3 or x1 - x0 < w / 3 or not evenly_marked(marks[y0:y1, x0:x1]):
        return None
    borders = np.array([y0, h - y1]) / h, np.array([x0, w - x1]) / w
    if max(borders[0].max(), borders[1].max()) < PADDING_MIN_SHARE:
        return None
    return PageBox(int(x0 / scale), int(y0 / scale), min(rgb.shape[1], int(np.ceil(x1 / scale))),
                   min(rgb.shape[0], int(np.ceil(y1 / scale))))


# ----------------------------------------------------------------------------------------------
# Calibration pulse: dark ink -> de-rotated -> vertical strokes paired under a flat top
# ----------------------------------------------------------------------------------------------

PULSE_SIDE_PX = 1700              # pages with a longer short side are searched downsampled
PULSE_REGION = 0.45               # pulses open the rows: only the left part of the page is searched
                                  # (a layout with pulses only at the right end is not read)
PHOTO_PULSE_REGION = 0.2          # ... and on a photo's sheet, found and flattened, only its left fifth
SOLID_PX = 15                     # dark areas this thick are fill or scanner bed, not strokes
TRACE_PERCENTILE = 0.3            # the trace covers ~0.5 % of a page: its darker half sets 'full ink'
INK_MIN, INK_FLOOR = 90, 50       # coverage for a stroke pixel; below the floor measure as paper
GRID_PERCENTILE = 96              # the coverage of this percentile of pixels: grid lines, if dark
INK_ABOVE_GRID, FLOOR_ABOVE_GRID = 45, 25   # stroke threshold and measuring floor over that
INK_MAX = 200                     # a grid this dark cannot be told from ink anyway
CAP_FRACTION = 0.45               # a line's half-maximum end lies ~0.43 (round cap) .. 0.5 (square)
                                  # of its width beyond its end point
LONG_LINE_MM = 30.0               # straight ink this long is grid (grey grids), never a pulse...
GRID_LINES_MIN = 6                # ...when this many such lines run side by side: a few long lines are
                                  # the rise and fall of pulses stacked on a tight row pitch
SPECKLE_MM = 1.0                  # ink pieces smaller than this both ways are noise or grid remnants
PULSE_MM_RANGE = (4.0, 25.0)      # pulse height: 5..20 mm/mV, with slack
PULSE_PX_RANGE = (10, 700)        # when px per mm is unknown
PULSE_ASPECT = (0.3, 5.0)         # height / width: 5 mm/mV at 50 mm/s .. 20 mm/mV at 25 mm/s
TOP_COVERAGE = 0.8                # share of the columns between the edges inked along the top
FIT_TOL = 0.05                    # a pulse that ends the search fits a standard pair this closely
THIN_PAIR = 1.5                   # two side-by-side pixels this much over the ink threshold: a thin edge
TOP_DARKNESS = 0.6                # a top-line column as dark, summed over 3 rows, as this much of the rise
STROKE_GAP_PX = 5                 # breaks in a faint thin stroke that are bridged
EDGE_MAX_SLOPE = 0.03             # px per row (1.7 deg) a pulse edge may lean after de-rotation
MERGED_FALL = 1.5                 # a fall this much thicker than the rise has a QRS drawn against it
SIZE_TOL = 0.08                   # pulses of one page agree in height and width to 8 %
INK_ANGLE_WIDTH = 640             # ink mask width for the rotation search when there is no grid


def ink_coverage(v, paper):
    """(H, W) uint8 0..255 from the max-channel image v: how much of each pixel the trace ink
    covers, linear between paper and the darkest strokes (so a line's coverage summed across it
    is its width in px). Solid dark areas (a scanner bed or rotation fill around the page) are
    zeroed: they are not strokes."""
    square = np.ones((SOLID_PX, SOLID_PX), np.uint8)
    solid = cv2.morphologyEx((v < 0.5 * paper).astype(np.uint8), cv2.MORPH_OPEN, square)
    solid = cv2.dilate(solid, np.ones((5, 5), np.uint8)).astype(bool)
    trace = percentile_u8(v[::2, ::2], TRACE_PERCENTILE, (~solid[::2, ::2]).view(np.uint8))   # 0 if all solid
    trace = min(trace, paper - 40.0)                       # a page of faint ink: do not amplify noise
    cov = cv2.convertScaleAbs(cv2.subtract(np.full_like(v, int(paper)), v), alpha=255.0 / (paper - trace))
    cov[solid] = 0
    return cov


def ink_levels(cov):
    """(stroke threshold, measuring floor) on coverage, raised above the grid's own coverage when
    the grid lines are dark (grey or black-and-white grids) so that they are not taken for ink."""
    grid = float(percentile_u8(cov[::2, ::2], GRID_PERCENTILE))
    return int(np.clip(grid + INK_ABOVE_GRID, INK_MIN, INK_MAX)), int(max(INK_FLOOR, grid + FLOOR_ABOVE_GRID))


def edge_fill(v, paper):
    """(H, W) bool: dark pixels joined to the image's edge, the fill around a turned page (or a scanner
    bed). Where it thins out to a wedge it passes for ink, and its straight edges run along the image, not
    the paper."""
    _, labels = cv2.connectedComponents((v < 0.5 * paper).astype(np.uint8), connectivity=8)
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, touching[touching > 0])


def ink_angle(v, paper):
    """Rotation (degrees, clockwise positive) that makes the ink's row profile sharpest: trace
    baselines and text lines run along the paper. For pages without a grid. Coarse 1 degree
    steps, then quarter degrees around the best, on a small copy, without the fill around the page."""
    scale = min(1.0, INK_ANGLE_WIDTH / v.shape[1])
    small = cv2.resize(v, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    cov = ink_coverage(small, paper).astype(np.float32)
    cov[cv2.dilate(edge_fill(small, paper).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)] = 0
    h, w = cov.shape

    def sharpness(a):
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), a, 1.0)
        rows = cv2.warpAffine(cov, m, (w, h), flags=cv2.INTER_LINEAR).sum(1)
        return float((rows * rows).sum()) + 1e-6

    coarse = np.arange(-MAX_ANGLE_DEG, MAX_ANGLE_DEG + 1e-9, 1.0)
    best = coarse[int(np.argmax([sharpness(a) for a in coarse]))]
    fine = best + np.arange(-1.0, 1.0 + 1e-9, 0.25)
    sharp = np.log([sharpness(a) for a in fine])
    i = int(np.argmax(sharp))
    return float(fine[i] + 0.25 * parabolic_offset(sharp, i))


def deskew(img, angle_deg, width=None, fill=0):
    """Undo a clockwise rotation by angle_deg about the image centre; only the left `width`
    columns of the result are computed (all when None)."""
    h, w = img.shape[:2]
    width = w if width is None else width
    if abs(angle_deg) < 0.05:
        return img[:, :width]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, 1.0)
    return cv2.warpAffine(img, m, (width, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def vertical_strokes(ink, length):
    """(k, 5) int stats (x, y, w, h, area) of vertical ink strokes at least `length` px long.
    Gaps of up to STROKE_GAP_PX along a stroke are bridged first: a faint thin line drops
    below the ink threshold here and there."""
    closed = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, np.ones((STROKE_GAP_PX, 1), np.uint8))
    opened = cv2.morphologyEx(closed, cv2.MORPH_OPEN, np.ones((length, 1), np.uint8))
    _, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    return stats[1:]


def half_max_ends(profile):
    """(first, last) sub-pixel positions where profile crosses half its 90th-percentile plateau,
    dips inside bridged (a faint stretch of a thin line); the caller bounds the profile tightly
    so that a grid line crossing beyond a stroke's end is not taken for it."""
    level = 0.5 * np.percentile(profile, 90)
    above = np.flatnonzero(profile >= level)
    if len(above) == 0:
        return None
    i, j = above[0], above[-1]
    lo = i - (profile[i] - level) / max(profile[i] - profile[i - 1], 1e-6) if i > 0 else float(i)
    hi = j + (profile[j] - level) / max(profile[j] - profile[j + 1], 1e-6) if j < len(profile) - 1 else float(j)
    return float(lo), float(hi)


def edge_column(band):
    """(centre column, slope in px per row) of a near-vertical edge in a (rows, cols) darkness
    band: per-row centroids and a straight line through them."""
    w = band.sum(1)
    ok = w > 0
    if ok.sum() < 3:
        return None, np.inf
    cx = (band * np.arange(band.shape[1])).sum(1)[ok] / w[ok]
    slope = np.polyfit(np.flatnonzero(ok), cx, 1)[0]
    return float((band.sum(0) * np.arange(band.shape[1])).sum() / band.sum()), abs(float(slope))


def left_edge(band):
    """Sub-pixel column where each row of a (rows, cols) darkness band first reaches half its maximum,
    the median over rows."""
    peak = band.max(1, keepdims=True)
    rows = np.flatnonzero(peak[:, 0] > 0)
    if len(rows) == 0:
        return 0.0
    half = 0.5 * peak[rows]
    b = band[rows]
    i = np.argmax(b >= half, axis=1)
    r = np.arange(len(rows))
    before = np.where(i > 0, b[r, np.maximum(i - 1, 0)], 0.0)
    frac = (half[:, 0] - before) / np.maximum(b[r, i] - before, 1e-6)
    return float(np.median(i - 1 + frac))


def measure_pulse(dark, a, b):
    """dict(height_px, width_px, x, y, thickness) of the pulse whose rise is stroke a and fall
    stroke b (stats rows), from the darkness itself: the rise's half-maximum ends, the top line's
    centroid and the edges' centroid columns. Heights run centre line to centre line, as drawn.
    None unless both edges are plumb (on the de-rotated page a QRS stroke leans, a pulse does not)."""
    xa, ya, wa, ha = (int(v) for v in a[:4])
    pad = 3
    mid = dark[ya + ha // 4: ya + 3 * ha // 4].astype(np.float32)
    la, lb = max(xa - pad, 0), max(int(b[0]) - pad, 0)
    cols_a, cols_b = mid[:, la: xa + wa + pad], mid[:, lb: int(b[0]) + int(b[2]) + pad]
    (cx_a, slope_a), (cx_b, slope_b) = edge_column(cols_a), edge_column(cols_b)
    if max(slope_a, slope_b) > EDGE_MAX_SLOPE:
        return None
    thick = float(cols_a.sum(1).mean() / 255.0)
    if cols_b.sum(1).mean() / 255.0 > MERGED_FALL * thick + 0.5:
        # a trace that starts with a QRS draws its rise against the fall: the fall's centre is then its
        # inner edge (the pulse inside is empty) plus the rise's half-thickness, measured the same way
        cx_b = left_edge(cols_b) + (cx_a - left_edge(cols_a))
    cx_a, cx_b = la + cx_a, lb + cx_b
    y0, r0 = max(ya - 2 * pad, 0), max(ya - 2, 0)
    rise = dark[r0: ya + ha + 2, la: xa + wa + pad].astype(np.float32).sum(1)
    ends = half_max_ends(rise)
    inner = dark[y0: ya + int(thick) + 2 * pad, int(cx_a + thick + 1): int(cx_b - thick)].astype(np.float32)
    if ends is None or inner.size == 0 or inner.sum() <= 0:
        return None
    top = y0 + float((inner.sum(1) * np.arange(inner.shape[0])).sum() / inner.sum())
    bottom = r0 + ends[1] - CAP_FRACTION * thick
    return dict(height_px=bottom - top, width_px=cx_b - cx_a, x=cx_a, y=bottom, thickness=thick)


def is_pulse_outline(ink, dark, cov, a, b, blank=None):
    """Strokes a (rise) and b (fall) start level, one straight flat line joins their tops, the
    inside is empty and the paper left of the rise is blank (the pulse opens its row): the
    outline of a pulse, not two QRS strokes, a T wave or a letter. A column of the top line
    counts as inked where the ink mask has it, or where its coverage summed over 3 rows is at
    least TOP_DARKNESS of the rise's across it: the same pen, drawn between two pixel rows on a
    page whose dark grid raised the ink threshold above either half. blank (default ink): the mask the
    paper left of the rise and inside the pulse are judged empty on."""
    blank = ink if blank is None else blank
    xa, ya, wa, ha = (int(v) for v in a[:4])
    xb, yb, wb, hb = (int(v) for v in b[:4])
    tol = max(3, int(0.12 * ha)) + wa                    # a faint corner may break off
    overlap = min(ya + ha, yb + hb) - max(ya, yb)
    if yb > ya + tol or overlap < 0.85 * ha:             # the fall may run on into a QRS
        return False
    left, right = xa + wa, xb
    if right - left < 4:
        return False
    # the top line starts at the rise: a trace arriving from the left (an inverted QRS between two S waves
    # looks like a pulse otherwise) or any stroke beside the rise is disqualifying; checked first, since most
    # pairs (a QRS's strokes) fail here
    before = blank[max(ya - 2, 0): ya + 3 * ha // 4, max(xa - max((xb - xa) // 2, 3 * wa), 0): max(xa - 1, 0)]
    if before.sum() > 0.1 * ha:
        return False
    margin = (right - left) // 8                           # clear of the corners
    top_rows, top_cols = slice(max(ya - ha // 5, 0), ya + ha // 5), slice(left + margin, right - margin)
    band, shade = ink[top_rows, top_cols], cov[top_rows, top_cols].astype(np.float32)
    rows = np.arange(band.shape[0], dtype=np.float32)[:, None]
    count = band.sum(0)
    rise = dark[ya + ha // 4: ya + 3 * ha // 4, max(xa - 3, 0): xa + wa + 3].astype(np.float32).sum(1).mean()
    across = shade[:-2] + shade[1:-1] + shade[2:] if len(shade) > 2 else shade
    inked = (count > 0) | (across.max(0, initial=0) >= TOP_DARKNESS * rise)
    if band.size == 0 or inked.mean() < TOP_COVERAGE:
        return False
    centre = (shade * rows).sum(0)[inked] / np.maximum(shade.sum(0)[inked], 1e-6)
    if count.max() > 2 * wa + 3 or centre.std() > max(1.0, 0.5 * wa):
        return False                                       # a hump or a blob, not a line
    inside = blank[ya + wa + 3: ya + ha - wa - 3, left + 2: right - 2]
    if inside.size and inside.mean() >= 0.1:
        return False
    # a pulse stands open on its feet; a line joining them closes a box: a grid cell whose remnants outlast
    # the long lines' removal, or a letter
    foot = blank[max(ya + ha - ha // 5, 0): ya + ha + ha // 5, top_cols]
    return foot.size == 0 or foot.any(0).mean() < TOP_COVERAGE


def top_line_row(ink, stroke, h_lo, h_hi, side):
    """The row where the lowest top line, h_lo..h_hi above the stroke's foot, leaves the stroke on `side`
    (+1 right: a rise, -1 left: a fall), the highest row of that line's thickness; None if there is none."""
    x, y, w, h = (int(v) for v in stroke[:4])
    run = max(3, int(h_lo) // 2)
    lo, hi = max(y, y + h - int(h_hi)), y + h - int(h_lo)
    if hi <= lo:
        return None
    beside = ink[lo:hi, x + w: x + w + run] if side > 0 else ink[lo:hi, max(x - run, 0): x]
    leaving = np.flatnonzero((beside.shape[1] == run) & beside.all(1)) if beside.size else []
    if len(leaving) == 0:
        return None
    row = leaving[-1]
    while row - 1 in leaving:
        row -= 1
    return lo + int(row)


def lowest_pulse_strokes(ink, long, h_lo, h_hi):
    """Pulses stacked on a tight row pitch (20 mm/mV on six rows) merge their rises into one long stroke and
    their falls into another: each long stroke cut to its lowest pulse, from that pulse's top line down to
    its foot, once as a rise (the line leaving right) and once as a fall (leaving left), where found."""
    cut = []
    for stroke in long:
        x, y, w, h, area = (int(v) for v in stroke)
        for side in (1, -1):
            top = top_line_row(ink, stroke, h_lo, h_hi, side)
            if top is not None:
                cut.append((x, top, w, y + h - top, area * (y + h - top) // h))
    return np.array(cut, dtype=long.dtype).reshape(-1, 5)


def pulse_candidates(ink, edges, dark, cov, h_lo, h_hi, blank=None):
    """Every rise/fall pair that outlines a pulse of height in [h_lo, h_hi] px: list of dicts. ink: the
    stroke mask, edges: the mask its vertical strokes are found in, dark: the coverage above the measuring
    floor, cov: all of it, blank: the ink that paper meant to be empty must not show (ink without its specks:
    a noisy page's speckle and grid remnants; a faint thin stroke breaks into pieces, so strokes keep them)."""
    vert = vertical_strokes(edges, max(6, int(0.7 * h_lo)))
    vert = vert[vert[:, 2] * 3 <= vert[:, 3]]
    fits = vert[:, 3] <= h_hi * 1.1 + 6
    vert = np.concatenate([vert[fits], lowest_pulse_strokes(ink, vert[~fits], h_lo, h_hi)])
    vert = vert[np.argsort(vert[:, 0], kind='stable')]
    found = []
    for i in np.flatnonzero(vert[:, 3] >= h_lo * 0.9):
        for j in level_falls(vert, i):
            if is_pulse_outline(ink, dark, cov, vert[i], vert[j], blank):
                m = measure_pulse(dark, vert[i], vert[j])
                if m and h_lo <= m['height_px'] <= h_hi:
                    found.append(m)
                break   # the nearest qualifying fall closes this rise
    return found


def level_falls(vert, i):
    """Indices, nearest first, of the strokes (vert sorted by x) that could be the fall of a pulse rising at
    stroke i: at a pulse's aspect (PULSE_ASPECT) to its right, starting level with it and spanning its height,
    as is_pulse_outline checks first; vectorised, since a dense black grid leaves thousands of strokes."""
    x, y, w, h = (vert[:, k].astype(np.int64) for k in range(4))
    lo = np.searchsorted(x, x[i] + h[i] / PULSE_ASPECT[1], 'left')
    hi = np.searchsorted(x, x[i] + h[i] / PULSE_ASPECT[0], 'right')
    yb, hb = y[lo:hi], h[lo:hi]
    tol = max(3, int(0.12 * h[i])) + w[i]
    overlap = np.minimum(y[i] + h[i], yb + hb) - np.maximum(y[i], yb)
    return lo + np.flatnonzero((yb <= y[i] + tol) & (overlap >= 0.85 * h[i]))


def consensus(cands):
    """The group of candidates agreeing in height and width with the most total height: a page
    repeats its pulse on every row; letters are small and QRS lookalikes rarely agree."""
    if not cands:
        return None
    hw = np.array([[c['height_px'], c['width_px']] for c in cands])
    groups = [np.flatnonzero((np.abs(hw - row) <= SIZE_TOL * row).all(1)) for row in hw]
    best = max(groups, key=lambda g: len(g) * np.median(hw[g, 0]))   # many and tall
    members = [cands[i] for i in best]
    return dict(height_px=float(np.median(hw[best, 0])), width_px=float(np.median(hw[best, 1])),
                count=len(members), positions=[(round(c['x'], 1), round(c['y'], 1)) for c in members],
                thickness=float(np.median([c['thickness'] for c in members])))


def without_long_lines(ink, length):
    """ink with its straight horizontal and vertical runs longer than `length` px removed, along each axis
    where at least GRID_LINES_MIN of them show that they are a grid. On a noisy page a grid line breaks up
    and its pixel columns straddle the threshold: gaps of STROKE_GAP_PX along a line are bridged before it
    is measured, and a pixel either side of it goes with it; otherwise its pieces stand beside and inside a
    pulse and pass for strokes."""
    for axis in (0, 1):
        along, across = ((STROKE_GAP_PX, 1), (1, 3)) if axis == 0 else ((1, STROKE_GAP_PX), (3, 1))
        bridged = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, np.ones(along, np.uint8))
        long_lines = line_opening(bridged, length, axis).astype(np.uint8)
        if cv2.connectedComponents(long_lines, connectivity=8)[0] - 1 >= GRID_LINES_MIN:
            ink = ink & (1 - cv2.dilate(long_lines, np.ones(across, np.uint8)))
    return ink


def rejoined(cut, whole, mm):
    """cut (strokes without the grid's long lines) with the pixels of whole given back where a vertical stroke
    runs on above and below them: a horizontal grid line, taken out with a pixel either side, cut a pulse's rise
    and fall in two, and their lower halves with the line passed for a 5 x 5 mm pulse (a photo's dark grid). For
    photos only: on a render it also joins pieces of grid cells into 5 x 5 mm boxes (1 of 60 simulator pages)."""
    gap = np.ones((int(mm) + 1, 1), np.uint8)                  # up to a millimetre of line taken out
    return cv2.morphologyEx(cut, cv2.MORPH_CLOSE, gap) & whole


def without_specks(ink, size_px):
    """ink without its 8-connected pieces whose bounding box is under size_px both ways."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    speck = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) < size_px
    speck[0] = False
    return np.where(speck[labels], 0, ink).astype(np.uint8)


def window_reduce(mask, length, axis, fill):
    """bool AND (fill True) or OR (fill False) of mask over [x - length // 2, x - length // 2 + length)
    along axis, `fill` beyond the edges; by doubling windows, so it costs log2(length) passes."""
    mask = np.moveaxis(mask, axis, -1)
    before = length // 2
    out = np.pad(mask, [(0, 0), (before, length - 1 - before)], constant_values=fill)
    combine, reach = (np.logical_and if fill else np.logical_or), 1
    while reach < length:   # out[i] covers the padded mask's [i, i + reach)
        step = min(reach, length - reach)
        out = combine(out[:, :out.shape[1] - step], out[:, step:])
        reach += step
    return np.moveaxis(out, -1, axis)


def line_opening(ink, length, axis):
    """bool: cv2.morphologyEx(ink, MORPH_OPEN, a 1 x length line along axis), pixel for pixel, in a sixth
    of its time for 30 mm lines (cv2 pays per kernel pixel)."""
    eroded = window_reduce(ink.astype(bool), length, axis, True)
    return window_reduce(eroded, length, axis, False)


def pulse_step(shape):
    """Integer downsampling for the pulse search: big scans (500 dpi and up) are searched at
    about 200 dpi, where a pulse is still ~80 px tall."""
    return max(1, int(min(shape[:2]) / PULSE_SIDE_PX + 0.25))


def pulse_at_levels(cov, ink_min, floor, mm, max_mm, step, pairs=False, photo=False):
    """consensus() of the pulses outlined by the coverage above ink_min, measured above floor; mm: px per
    mm of the searched image (None: unknown, heights in PULSE_PX_RANGE / step). pairs: edges are also
    found by column_pairs (a thin edge leaning across two columns after de-rotation breaks up otherwise). photo: a
    rectified photo's page, whose edges get back the grid lines that cross them (rejoined)."""
    ink = (cov >= ink_min).astype(np.uint8)
    edges = ink | column_pairs(cov, ink_min) if pairs else ink
    if mm:
        h_lo, h_hi = PULSE_MM_RANGE[0] * mm, max_mm * mm
        ink = without_long_lines(ink, int(LONG_LINE_MM * mm))
        cut = without_long_lines(edges, int(LONG_LINE_MM * mm)) if pairs else ink
        edges = rejoined(cut, edges, mm) if photo else cut
        blank = without_specks(ink, SPECKLE_MM * mm)
    else:
        h_lo, h_hi = PULSE_PX_RANGE[0] / step, PULSE_PX_RANGE[1] / step
        blank = ink
    dark = np.where(cov >= floor, cov, 0).astype(np.uint8)
    return consensus(pulse_candidates(ink, edges, dark, cov, h_lo, h_hi, blank))


def column_pairs(cov, ink_min):
    """(h, w) uint8 1 on the darker of two side-by-side pixels whose coverage together reaches THIN_PAIR x
    ink_min: a thin vertical line lying half in each column, full in neither."""
    c = cov.astype(np.uint16)
    both = (c[:, :-1] + c[:, 1:]) >= int(THIN_PAIR * ink_min)
    pair = np.zeros(cov.shape, np.uint8)
    pair[:, :-1] |= both & (c[:, :-1] >= c[:, 1:])
    pair[:, 1:] |= both & (c[:, 1:] > c[:, :-1])
    return pair


def fits_standard(pulse, mm, tol=None):
    """Whether the pulse, at mm px per mm both ways, is 1 mV x 0.2 s at a standard gain and paper speed, to
    FIT_TOL: a drawn pulse measures within 1-2 %, pieces of grid cells cut out of pulses standing on grid
    lines (5.5 x 10 mm, read as 5 mm/mV at 50 mm/s) do not."""
    tol = FIT_TOL if tol is None else tol
    return bool(snap(pulse['height_px'] / mm / PULSE_MV, GAINS_MM_MV, tol) and
                snap(pulse['width_px'] / mm / PULSE_S, SPEEDS_MM_S, tol))


def search_pulse(cov, mm, max_mm, step, photo=False):
    """pulse_at_levels() at the levels that tell ink from this page's grid, then, while the pulse found does
    not fit a standard gain and speed on the grid (mm px per mm), at the plain levels (traces crowding the
    page, a high gain on many rows or a low dpi, pass for a dark grid; the grid's long lines are taken out
    instead) and with thin edges found by column pairs. The first that fits closely wins, or that
    rescale_to_pulse will take the scale from (a grid read at a wrong period: the pulse fits no standard pair
    on the grid, even loosely, but its shape does), else the first found; without a grid (mm None), the first
    that rows agree on and whose shape fits a standard pair (a page's scale is taken from such a pulse alone;
    at 100 dpi a pulse's thin edges can fall between two pixel columns, and letters then agree with
    nothing), else the first found."""
    raised = ink_levels(cov)
    plain = [((INK_MIN, INK_FLOOR), False)] if raised != (INK_MIN, INK_FLOOR) else []
    first = None
    for levels, pairs in [(raised, False)] + plain + [(raised, True)]:
        pulse = pulse_at_levels(cov, *levels, mm, max_mm, step, pairs, photo)
        if pulse and (rescales_grid(pulse) if mm is None else fits_standard(pulse, mm) or
                      (not fits_standard(pulse, mm, SNAP_TOL) and rescales_grid(pulse))):
            return pulse
        first = first or pulse
    return first


def rescales_grid(pulse):
    """Pulses on enough rows, of a standard pair's shape: what rescale_to_pulse takes the page's scale from."""
    return pulse['count'] >= PULSE_ONLY_MIN_COUNT and bool(shape_pairs(pulse['height_px'] / pulse['width_px']))


def find_calibration_pulse(rgb, px_per_mm=None, angle_deg=None, max_mm=PULSE_MM_RANGE[1], photo=False):
    """The calibration pulse(s): dict(height_px, width_px, count, positions [(x, y) of each rise's
    foot in the de-rotated page], thickness, angle_deg) or None. px_per_mm (from the grid)
    narrows the height search to PULSE_MM_RANGE[0]..max_mm and lets grey grid lines be told from
    ink; angle_deg (clockwise) is measured from the ink when not given."""
    v = max_channel(rgb)
    paper = float(paper_colour(rgb).max())
    step = pulse_step(rgb.shape)
    if step > 1:
        v = cv2.resize(v, None, fx=1 / step, fy=1 / step, interpolation=cv2.INTER_AREA)
    if angle_deg is None:
        angle_deg = ink_angle(v, paper)
    v = deskew(v, angle_deg, width=int(v.shape[1] * (PHOTO_PULSE_REGION if photo else PULSE_REGION)), fill=255)
    cov = ink_coverage(v, paper)
    mm = px_per_mm / step if px_per_mm else None
    found = search_pulse(cov, mm, max_mm, step, photo)
    if found:
        for key in ('height_px', 'width_px', 'thickness'):
            found[key] *= step
        found['positions'] = [(x * step, y * step) for x, y in found['positions']]
        found['angle_deg'] = angle_deg
    return found


# ----------------------------------------------------------------------------------------------
# The page's scale: grid first, pulse for gain and speed or when there is no grid
# ----------------------------------------------------------------------------------------------

SNAP_TOL = 0.15                   # a measured gain or speed within 15 % of a standard one is it
CROSS_KEEP = 0.8                  # a family refit at the other's fundamental keeps this much score
AXIS_AGREE = 0.1                  # x and y spacings within 10 %: square pixels, both trusted
STRONG_HARMONICS, STRONG_CONTRAST = 5, 3.5   # a lone line family: harmonics, mean log contrast
PULSE_ONLY_MIN_COUNT = 2          # without a grid, pulses on at least two rows must agree


def snap(value, choices, tol=SNAP_TOL):
    """The choice nearest value (by ratio) if within tol of it, else None."""
    best = min(choices, key=lambda c: abs(np.log(value / c)))
    return best if abs(value / best - 1) <= tol else None


def axis_confidence(axis):
    return 0.0 if axis is None else min(1.0, axis['n_harmonics'] / 10) * (1.0 if axis['minor_seen'] else 0.7)


def is_strong(axis):
    """A line family convincing on its own (without the other family agreeing)."""
    return axis is not None and axis['n_harmonics'] >= STRONG_HARMONICS and axis['strength'] >= STRONG_CONTRAST


def combine_axes(ax, ay):
    """(px_per_mm_x, px_per_mm_y, angle_deg, confidence) from the two line families, or None.
    Paper has both families at one spacing: two that agree are a grid. Spacings 5x apart mean one
    family's comb was read at its 1 mm lines (its 5 mm lines too faint): the larger is right.
    Other disagreements are reconciled (one family refit at the other's fundamental) or, when both
    are strong, kept: a page resized differently along x and y. A lone family counts only when
    strong on its own (text and trace rows make weak lone combs) and then stands for both."""
    found = [(a, base) for a, base in ((ax, 0.0), (ay, 90.0)) if a is not None]
    if not found:
        return None
    angle = float(np.mean([a['angle_deg'] - base for a, base in found]))
    if len(found) == 2:
        px_x, px_y = ax['period_px'] / MAJOR_MM, ay['period_px'] / MAJOR_MM
        conf = 0.5 * (axis_confidence(ax) + axis_confidence(ay))
        ratio = px_x / px_y
        if abs(ratio - 1) <= AXIS_AGREE:
            return px_x, px_y, angle, conf
        if abs(ratio / MAJOR_MM - 1) <= AXIS_AGREE or abs(ratio * MAJOR_MM - 1) <= AXIS_AGREE:
            px = max(px_x, px_y)
            return px, px, angle, 0.6 * conf
        jx, jy = reconcile(ax, ay)
        if jx is not None and jy is not None:
            px_x, px_y = jx['period_px'] / MAJOR_MM, jy['period_px'] / MAJOR_MM
            if abs(px_x / px_y - 1) <= AXIS_AGREE or (is_strong(jx) and is_strong(jy)):
                return px_x, px_y, angle, 0.5 * conf
    strong = [a for a, _ in found if is_strong(a)]
    if not strong:
        return None
    one = max(strong, key=axis_confidence)
    px = one['period_px'] / MAJOR_MM
    return px, px, angle, 0.5 * axis_confidence(one)


def apply_pulse(scale, pulse, minor_seen):
    """Gain and speed from a pulse measured against the grid (in place). If the grid's 1 mm lines
    were never told apart from its 5 mm ones, a pulse 25/50/100 'mm' tall says the lattice read
    was the 1 mm one: the grid scale is then 5x too small and is corrected."""
    gain = pulse['height_px'] / scale.px_per_mm_y / PULSE_MV
    if not minor_seen and snap(gain, GAINS_MM_MV) is None and snap(gain / MAJOR_MM, GAINS_MM_MV):
        scale.px_per_mm_x *= MAJOR_MM
        scale.px_per_mm_y *= MAJOR_MM
        gain /= MAJOR_MM
    speed = pulse['width_px'] / scale.px_per_mm_x / PULSE_S
    scale.pulse = pulse
    if not (snap(gain, GAINS_MM_MV) and snap(speed, SPEEDS_MM_S)) and pulse.get('count', 1) >= PULSE_ONLY_MIN_COUNT:
        gain, speed = rescale_to_pulse(scale, pulse) or (gain, speed)
    if snap(gain, GAINS_MM_MV):
        scale.gain_mm_mv, scale.gain_assumed = snap(gain, GAINS_MM_MV), False
    if snap(speed, SPEEDS_MM_S):
        scale.paper_speed_mm_s, scale.speed_assumed = snap(speed, SPEEDS_MM_S), False


def pulse_shapes():
    """{(gain mm/mV, speed mm/s): the pulse's height / width in mm} for every standard pair."""
    return {(g, v): g * PULSE_MV / (v * PULSE_S) for g in GAINS_MM_MV for v in SPEEDS_MM_S}


def shape_pairs(shape):
    """The standard (gain, speed) pairs whose pulse has this height / width in mm, to SNAP_TOL."""
    return [pair for pair, mm_shape in pulse_shapes().items() if abs(shape / mm_shape - 1) <= SNAP_TOL]


def take_pulse_scale(scale, pulse, pairs, px_per_mm):
    """Of the pairs, the one whose px per mm (the pulse's height over its gain) lies nearest px_per_mm; the
    scale's px per mm is then taken from the pulse at that pair (in place). Returns (gain, speed)."""
    gain, speed = min(pairs, key=lambda pair: abs(np.log(pulse['height_px'] / pair[0] / px_per_mm)))
    scale.px_per_mm_y = pulse['height_px'] / (gain * PULSE_MV)
    scale.px_per_mm_x = pulse['width_px'] / (speed * PULSE_S)
    return gain, speed


def rescale_to_pulse(scale, pulse):
    """A grid read at a wrong period (wrinkled or warped paper) puts the pulse at no standard gain and speed,
    while the pulse's own shape fits a pair: the pairs its height / width fits (10 mm/mV at 25 mm/s looks like
    20 mm/mV at 50 mm/s), the one nearest the grid's scale, its px per mm then taken from the pulse (in place;
    the source is then 'pulse', whose 5 mm width is too coarse a ruler for the time axis). Returns the
    (gain, speed) the scale now gives the pulse, or None (the scale untouched) if no pair fits."""
    fits = shape_pairs(pulse['height_px'] / pulse['width_px'] * scale.px_per_mm_x / scale.px_per_mm_y)
    if not fits:
        return None
    gain, speed = take_pulse_scale(scale, pulse, fits, scale.px_per_mm_y)
    scale.source, scale.confidence = 'pulse', 0.5 * scale.confidence
    return gain, speed


def scale_from_pulse(pulse, page_hw):
    """PageScale of a page without a grid. The pulse is 1 mV x 0.2 s, so px per mV and px per s are
    measured. Pixels are square, so the pulse's height / width in px is its shape in mm, which names
    the gain and speed (pulse_shapes); shapes two pairs share (10 mm/mV at 25 mm/s and 20 at 50) are
    told apart by px per mm: 2x apart, where the page's size in px, if it were a whole letter page,
    is a guess good to far better than 2x even padded or cropped. No fitting pair: 10 mm/mV and 25 mm/s,
    flagged as assumed."""
    agree = min(1.0, pulse['count'] / 4)
    scale = PageScale(px_per_mm_x=pulse['width_px'] / (PULSE_S * STANDARD_SPEED_MM_S),
                      px_per_mm_y=pulse['height_px'] / (PULSE_MV * STANDARD_GAIN_MM_MV),
                      source='pulse', confidence=0.5 * agree, angle_deg=pulse['angle_deg'], pulse=pulse)
    fits = shape_pairs(pulse['height_px'] / pulse['width_px'])
    if fits:
        page_px_per_mm = np.mean([min(page_hw) / PAGE_HEIGHT_MM, max(page_hw) / (PAGE_HEIGHT_MM * PAGE_ASPECT)])
        scale.gain_mm_mv, scale.paper_speed_mm_s = take_pulse_scale(scale, pulse, fits, page_px_per_mm)
        scale.gain_assumed = scale.speed_assumed = False
    return scale


def estimate_scale(rgb, use_pulse=True, photo=False, grid=None):
    """PageScale of an (H, W, 3) uint8 RGB page: px per mm from the grid (source 'grid'), else
    from the calibration pulse (source 'pulse': no grid, or pulses on two rows that overrule a grid read
    at a wrong period), else source None and NaN px per mm. photo: a rectified photo's page, whose pulse edges
    get back the grid lines crossing them (pulse_at_levels); grid: a KnownGrid, taken instead of the central
    FFT. With
    use_pulse the pulse also gives gain and paper speed (else the standard 10 mm/mV and 25 mm/s,
    flagged as assumed). A page longer than SCALE_SIDE_PX is read on a shrunk copy, its px per mm in the
    page's own pixels."""
    shrink = SCALE_SIDE_PX / max(rgb.shape[:2])
    if shrink >= 1:
        return estimate_scale_here(rgb, use_pulse, photo, grid)
    small = cv2.resize(rgb, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    fx, fy = small.shape[1] / rgb.shape[1], small.shape[0] / rgb.shape[0]
    grid = None if grid is None else KnownGrid(grid.px_per_mm_x * fx, grid.px_per_mm_y * fy, grid.confidence)
    return in_page_pixels(estimate_scale_here(small, use_pulse, photo, grid), fx, fy)


def in_page_pixels(scale, fx, fy):
    """A PageScale read on a copy resized by fx, fy (columns, rows) -> the same in the page's own pixels."""
    scale.px_per_mm_x, scale.px_per_mm_y = scale.px_per_mm_x / fx, scale.px_per_mm_y / fy
    if scale.pulse is not None:
        pulse = dict(scale.pulse, height_px=scale.pulse['height_px'] / fy, width_px=scale.pulse['width_px'] / fx,
                     thickness=scale.pulse['thickness'] / max(fx, fy))
        pulse['positions'] = [(x / fx, y / fy) for x, y in scale.pulse['positions']]
        scale.pulse = pulse
    return scale


def estimate_scale_here(rgb, use_pulse=True, photo=False, grid=None):
    """estimate_scale at the pixels given."""
    if grid is not None:   # an even lattice at a known 5 mm period: upright, no 5x misread to allow for
        px_x, px_y = grid.px_per_mm_x, grid.px_per_mm_y
        scale = PageScale(px_per_mm_x=px_x, px_per_mm_y=px_y, source='grid', confidence=grid.confidence,
                          angle_deg=0.0)
        minor_seen = True
    else:
        ax, ay = measure_grid(rgb)
        found = combine_axes(ax, ay)
        if found is None:
            return scale_from_pulse_only(rgb, use_pulse, photo)
        px_x, px_y, angle, conf = found
        scale = PageScale(px_per_mm_x=px_x, px_per_mm_y=px_y, source='grid', confidence=conf, angle_deg=angle)
        minor_seen = any(a is not None and a['minor_seen'] for a in (ax, ay))
    if use_pulse:
        reach = 1.0 if minor_seen else MAJOR_MM       # room for a 5x misread lattice
        pulse = find_calibration_pulse(rgb, px_y, scale.angle_deg, max_mm=PULSE_MM_RANGE[1] * reach, photo=photo)
        if pulse is not None:
            apply_pulse(scale, pulse, minor_seen)
    return scale


def scale_from_pulse_only(rgb, use_pulse, photo):
    """A page without a grid: its scale from pulses on at least PULSE_ONLY_MIN_COUNT rows, else nothing."""
    if use_pulse:
        pulse = find_calibration_pulse(rgb, photo=photo)
        if pulse is not None and pulse['count'] >= PULSE_ONLY_MIN_COUNT:
            return scale_from_pulse(pulse, rgb.shape[:2])
    return PageScale()


estimate_page_scale = estimate_scale     # the name the decoder's brief used


def px_per_mv(scale):
    """Pixels per mV along the page's voltage axis."""
    return scale.px_per_mm_y * scale.gain_mm_mv


def px_per_s(scale):
    """Pixels per second along the page's time axis."""
    return scale.px_per_mm_x * scale.paper_speed_mm_s


# ----------------------------------------------------------------------------------------------
# CLI: the scale of each image and the seconds it took
# ----------------------------------------------------------------------------------------------

def read_scale(rgb, size_hw, photo=False, grid=None):
    """The page's own scale at the network's input size (H, W), read from its grid and calibration pulse:
    (px_per_mv, px_per_s, what was found). NaN where the page shows neither (px_per_s also where only the
    pulse gave the scale): the decoder then falls back to the page border. Padding, cropping or rescaling a
    page leaves this right, the border not. photo, grid: as estimate_scale takes them."""
    scale = estimate_scale(rgb, photo=photo, grid=grid)
    found = {'source': scale.source, 'gain_mm_mv': scale.gain_mm_mv, 'paper_speed_mm_s': scale.paper_speed_mm_s,
             'gain_assumed': scale.gain_assumed, 'speed_assumed': scale.speed_assumed,
             'px_per_mm_x': scale.px_per_mm_x, 'px_per_mm_y': scale.px_per_mm_y, 'pulse_found': scale.pulse is not None,
             'grid_confidence': scale.confidence if scale.source == 'grid' else 0.0}
    # px per mm if the image were the whole page edge to edge, by its height or its width (a crop to the
    # traces keeps most of the width); the nearer one judges the reading
    borders = (rgb.shape[0] / PAGE_HEIGHT_MM, rgb.shape[1] / (PAGE_HEIGHT_MM * PAGE_ASPECT))
    border = min(borders, key=lambda b: abs(math.log(scale.px_per_mm_y / b)) if scale.source else 0)
    confirmed = not (scale.gain_assumed or scale.speed_assumed)   # the pulse fits the grid at a real gain
    plausible = PLAUSIBLE_SCALE[0] <= scale.px_per_mm_y / border <= PLAUSIBLE_SCALE[1]
    if scale.source is not None and not (plausible or confirmed):
        found['source'] = None   # a misread grid (faint colours, low dpi): the border is the better guess
        found['rejected'] = f'{scale.source} read {scale.px_per_mm_y:.2f} px/mm, the page border {border:.2f}'
    found['trace_start_column'] = pulse_end_column(scale, rgb.shape[1], size_hw[1])
    if found['source'] is None:
        return float('nan'), float('nan'), found
    rows = size_hw[0] / rgb.shape[0]
    cols = size_hw[1] / rgb.shape[1]
    # without a grid, px per s would come from the pulse's 5 mm width, read to 1-2 %: over a 10 s strip that
    # is 0.1-0.2 s, which costs more than the border's guess on all but padded or cropped pages
    input_px_per_s = px_per_s(scale) * cols if found['source'] == 'grid' else float('nan')
    if found['source'] == 'grid' and not plausible_along_x(scale, rgb.shape[1]):
        input_px_per_s = float('nan')   # the time axis misread (aliasing at 50-75 dpi: 7x the rows' px per mm)
        found['rejected'] = f'grid read {scale.px_per_mm_x:.2f} px/mm along the time axis'
    return px_per_mv(scale) * rows, input_px_per_s, found


def plausible_along_x(scale, png_width):
    """Whether the grid's px per mm along the time axis is plausible beside the page border's width (as the
    voltage axis is judged by its height)."""
    border = png_width / (PAGE_HEIGHT_MM * PAGE_ASPECT)
    return PLAUSIBLE_SCALE[0] <= scale.px_per_mm_x / border <= PLAUSIBLE_SCALE[1]


def pulse_end_column(scale, png_width, width):
    """Where the page's traces start, in input columns: the median end of its calibration pulses (each row's
    trace begins where its pulse falls). NaN without a pulse, or with one whose width fits no paper speed on
    the grid (a misread, not a pulse)."""
    pulse = scale.pulse
    if pulse is None or (scale.source == 'grid' and scale.speed_assumed):
        return float('nan')
    ends = [x + pulse['width_px'] for x, _ in pulse['positions']]
    return (float(np.median(ends)) + 0.5) * width / png_width - 0.5


def pulse_reading(found, key, assumed):
    """A gain or paper speed read_scale took from the calibration pulse; NaN where it had to assume it."""
    return found[key] if found.get('source') and not found[assumed] else float('nan')


def crop_to_grid(rgb):
    """(h, w, 3) page -> (the part inside the padding around its grid, PageBox or None): a page padded
    with paper (ecg-image-kit --random_padding) is read as its unpadded self, which it reads far better as
    (22 real ECG windows at 50-120 dpi padded by up to 2 in: 14 of 44 pages below 0 dB, 1 cut to the page)."""
    box = grid_extent(rgb)
    if box is None:
        return rgb, None
    return np.ascontiguousarray(rgb[box.y0:box.y1, box.x0:box.x1]), box


def describe(scale):
    if scale.source is None:
        return 'nothing found'
    flags = ''.join([' gain assumed' if scale.gain_assumed else '', ' speed assumed' if scale.speed_assumed else ''])
    return (f'{scale.source}: {scale.px_per_mm_x:.3f} x {scale.px_per_mm_y:.3f} px/mm, '
            f'{scale.gain_mm_mv:g} mm/mV, {scale.paper_speed_mm_s:g} mm/s{flags}, '
            f'{px_per_mv(scale):.2f} px/mV, {px_per_s(scale):.1f} px/s, rotation {scale.angle_deg:+.2f} deg, '
            f'confidence {scale.confidence:.2f}')


def page_truth(json_path):
    """(gain mm/mV, paper speed mm/s, px per mV) that a simulator or ecg-image-kit JSON states (y_grid: px
    per 5 mm); ecg-image-kit states no gain or speed: it draws 10 mm/mV at 25 mm/s."""
    meta = json.loads(Path(json_path).read_text())
    gain = float(meta.get('gain_mm_mv', STANDARD_GAIN_MM_MV))
    speed = float(meta.get('paper_speed_mm_s', STANDARD_SPEED_MM_S))
    return gain, speed, float(meta['y_grid']) / MAJOR_MM * gain if meta.get('y_grid') else float('nan')


def score_folder(folder):
    """Reads every PNG with a JSON beside it under folder; prints and returns how many pages had their pulse
    found, their gain and paper speed read (not assumed, and right) and px per mV within 3 %, and the
    pages missed."""
    pages, missed, start = 0, [], time.perf_counter()
    counts = dict(pulse=0, gain=0, speed=0, px_per_mv=0)
    for png in sorted(Path(folder).rglob('*.png')):
        if not png.with_suffix('.json').is_file():
            continue
        gain, speed, true_px_per_mv = page_truth(png.with_suffix('.json'))
        scale = estimate_scale(read_rgb(png))
        right = dict(pulse=scale.pulse is not None, gain=not scale.gain_assumed and scale.gain_mm_mv == gain,
                     speed=not scale.speed_assumed and scale.paper_speed_mm_s == speed,
                     px_per_mv=abs(px_per_mv(scale) / true_px_per_mv - 1) <= 0.03)
        counts = {key: n + right[key] for key, n in counts.items()}
        pages += 1
        if not (right['gain'] and right['speed']):
            missed.append(png.name)
    print(f'{folder}: {pages} pages, pulse found {counts["pulse"]}, gain read {counts["gain"]}, speed read '
          f'{counts["speed"]}, px/mV within 3 % {counts["px_per_mv"]}, {time.perf_counter() - start:.0f} s')
    print(f'  gain or speed missed: {" ".join(missed) or "none"}')
    return dict(counts, pages=pages, missed=missed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('images', nargs='*', help='pages to read: prints the scale found and the seconds it took')
    p.add_argument('--score', nargs='+', metavar='FOLDER', default=[],
                   help='pages with their JSON (simulator or ecg-image-kit): how many gains and speeds are read right')
    args = p.parse_args(argv)
    if not (args.images or args.score):
        p.error('give images or --score FOLDER')
    for path in args.images:
        rgb = read_rgb(path)
        start = time.perf_counter()
        scale = estimate_scale(rgb)
        seconds = time.perf_counter() - start
        print(f'{path}  {rgb.shape[1]}x{rgb.shape[0]}  {seconds:.3f} s  {describe(scale)}')
    for folder in args.score:
        score_folder(folder)


if __name__ == '__main__':
    ecg_cli.run_cli(main)   # an unreadable image: one line naming it
