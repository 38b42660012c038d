"""Flatten a rectified photo's page on its own grid: folds and curl taken out by a local warp.

    python page_flatten.py page.png ... --out DIR       # DIR/{stem}.png (flattened) + DIR/{stem}.json

page_rectify undoes the perspective of one plane; a folded or curled sheet is not one, and its grid lines still
bend and drift by millimetres across the page, so strips drift in time against one another. Here each line
family's local position is read by complex demodulation: the grid-ness map times a carrier at the grid's own
5 mm period (page_scale.measure_grid), averaged over about a period, gives at each place a complex number whose
angle is how far the lines there sit from an even lattice. The angles are unwrapped from the surest place
outward over the grid's largest clear region (quality-guided, as interferometry does); their linear drift along
the family's axis is the mean period's offset from the carrier's, which gives the page's px per mm over its whole
area (page_scale.read_scale takes it for a flattened page instead of its central FFT) and is kept out of the warp,
so the page keeps its size. The rest, smoothed, is what a remap takes out: it moves every pixel so the lines fall
on the even lattice; the flattened page is read and warped again once (FLATTEN_PASSES), in one resampling. Places
without a grid (margins, text) take the shift of their surest neighbours. A page whose shifts stray from their
smooth field (no grid: noise reads ~1.2 mm RMS, the dev photos 0.1-0.3) or that would move more than
MAX_SHIFT_MM is left as it was. Only pages page_rectify rectified are flattened (page_reader.find_page): a
render or scan reads exactly as before.
"""
import argparse
import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

import ecg_cli
import page_image
import page_rectify
import page_scale
from ecg_page import MAJOR_MM

CARRIER_PX = 16               # px a period the demodulation needs at least: a 40 px period is read at half size
NODE_PERIODS = 0.5            # the shifts are read on a lattice one half period apart each way
SMOOTH_PERIODS = 1.0          # the demodulated field is averaged with a Gaussian this many periods wide
SURE_SHARE = 0.35             # a node with an amplitude under this share of the page's typical one is unsure
FIELD_SMOOTH_NODES = 5.0      # Gaussian over the unwrapped shift field, in nodes (2.5 periods, 12 mm)
FIXED_POINT_STEPS = 2         # the shift applied at an output pixel is the one read where its line is on the page
MAP_STEP = 4                  # px: warp maps are computed on a lattice this coarse (the shifts are smooth)
FLATTEN_PASSES = 2            # the grid read again once warped: the first smoothing leaves ~40 % at sharp folds
PERIOD_TOL = 0.25             # a family's measured period this far from the page's nominal one is misread
MAX_RESIDUAL_MM = 0.6         # shifts read this far off their smooth field (RMS) are no grid's: noise reads ~1.2
MAX_SHIFT_MM = 40.0           # a larger shift is a misread lattice, not a fold (the dev photos' largest: 16 mm)
SHADING_PX = 31               # a box this wide (4 mm at 8 px/mm) holds the page's shading, not its lines


@dataclass
class Flattened:
    """What flatten did. rgb: the flattened page (the input array itself when untouched); action: 'flattened'
    or 'untouched: why'; shift_mm: the largest shift the first reading found (mm); residual_mm: the grid fit's
    residual, RMS distance (mm) between the line shifts read and the smooth field applied, over the sure nodes,
    in the last reading (on a flattened page: what is left); sure_share: the share of nodes where the grid was
    clear enough to read; px_per_mm: (x, y) the flattened page's grid scale, read on the whole page (None when
    untouched): page_scale.read_scale takes it instead of its central FFT."""
    rgb: np.ndarray
    action: str
    shift_mm: float = float('nan')
    residual_mm: float = float('nan')
    sure_share: float = float('nan')
    px_per_mm: tuple = None

    def summary(self):
        """The JSON-ready facts (all but the pixels; None where not read)."""
        number = (lambda value, digits: round(float(value), digits) if np.isfinite(value) else None)
        return {'flatten': self.action, 'flatten_shift_mm': number(self.shift_mm, 2),
                'flatten_residual_mm': number(self.residual_mm, 3), 'flatten_sure_share': number(self.sure_share, 3),
                'flatten_px_per_mm': None if self.px_per_mm is None else [round(v, 4) for v in self.px_per_mm]}


def line_map(rgb):
    """(h, w) float32 grid-ness with the page's shading taken out (high-passed)."""
    g = page_scale.gridness(rgb, page_scale.paper_colour(rgb))
    return g - cv2.blur(g, (SHADING_PX, SHADING_PX))


def demodulated(g, period, axis, step):
    """The line family across `axis` (1: vertical lines, read along x) demodulated at `period` px: complex
    (ny, nx) field on a lattice every `step` px whose angle is the lines' phase there. The product with the
    carrier is area-averaged onto the lattice, then Gaussian-averaged over SMOOTH_PERIODS (the carrier's
    double-frequency twin is gone after both; 20x faster than a full-size blur), on a copy of g shrunk to about
    CARRIER_PX a period (pixel centres keep the page's coordinates)."""
    h, w = g.shape
    k = max(1, int(period // CARRIER_PX))
    small = cv2.resize(g, (w // k, h // k), interpolation=cv2.INTER_AREA) if k > 1 else g
    centres = np.arange(small.shape[1 if axis == 1 else 0], dtype=np.float32) * k + (k - 1) / 2
    angle = (2 * np.pi / period) * centres
    shape = (1, -1) if axis == 1 else (-1, 1)
    ny, nx = max(1, round(h / step)), max(1, round(w / step))
    sigma = SMOOTH_PERIODS * period / step
    parts = [cv2.GaussianBlur(cv2.resize(small * wave(angle).reshape(shape), (nx, ny), interpolation=cv2.INTER_AREA),
                              (0, 0), sigma) for wave in (np.cos, np.sin)]
    return parts[0] - 1j * parts[1]


def largest_region(sure):
    """The largest 4-connected region of a (ny, nx) bool mask: the page's grid, not a strip cut off beside it
    (the edge of the white fill beyond a warped page rings at every frequency)."""
    count, labels = cv2.connectedComponents(sure.astype(np.uint8), connectivity=4)
    if count <= 2:
        return sure
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def unwrap_from_surest(field, sure):
    """Phases of a complex (ny, nx) field unwrapped over 4-neighbours, surest (largest amplitude) first, over
    the largest region of sure nodes; NaN elsewhere."""
    ny, nx = field.shape
    sure = largest_region(sure)
    amp = np.where(sure, np.abs(field), -1.0).ravel()
    wrapped = np.angle(field).ravel()
    phase = np.full(ny * nx, np.nan)
    seed = int(np.argmax(amp))
    phase[seed] = wrapped[seed]
    amp_list, wrapped_list, done = amp.tolist(), wrapped.tolist(), [False] * (ny * nx)
    done[seed] = True
    heap = [(-amp_list[seed], seed)]
    while heap:
        _, i = heapq.heappop(heap)
        y, x = divmod(i, nx)
        for j in (i - nx if y else -1, i + nx if y < ny - 1 else -1, i - 1 if x else -1, i + 1 if x < nx - 1 else -1):
            if j < 0 or done[j] or amp_list[j] < 0:
                continue
            step = (wrapped_list[j] - wrapped_list[i] + math.pi) % (2 * math.pi) - math.pi
            phase[j] = phase[i] + step
            done[j] = True
            heapq.heappush(heap, (-amp_list[j], j))
    return phase.reshape(ny, nx)


def filled(values):
    """NaNs of a (ny, nx) field replaced by normalised-Gaussian averages of the known values, widening until
    all are filled (margins and text take their neighbours' shift)."""
    known = np.isfinite(values)
    out = np.where(known, values, 0.0).astype(np.float32)
    weight = known.astype(np.float32)
    result = values.copy()
    sigma = 1.0
    while np.isnan(result).any() and sigma < 4 * max(values.shape):
        num = cv2.GaussianBlur(out, (0, 0), sigma)
        den = cv2.GaussianBlur(weight, (0, 0), sigma)
        todo = np.isnan(result) & (den > 1e-3)
        result[todo] = num[todo] / den[todo]
        sigma *= 2
    return np.nan_to_num(result)


def shift_field(g, period, axis, step):
    """(ny, nx) shift in px of the family's lines from an even lattice at `period`, smoothed, plus the
    sure-node mask and the raw unwrapped shifts (NaN where unsure)."""
    field = demodulated(g, period, axis, step)
    amp = np.abs(field)
    sure = amp > SURE_SHARE * np.percentile(amp, 75)
    raw = -unwrap_from_surest(field, sure) * period / (2 * np.pi)
    smooth = cv2.GaussianBlur(filled(raw).astype(np.float32), (0, 0), FIELD_SMOOTH_NODES)
    return smooth, sure & np.isfinite(raw), raw


def at_points(small, x, y, shape_hw):
    """Values of a coarse (n, m) float32 array spread evenly over a page of shape_hw (cell centres, as
    cv2.resize places them), interpolated at page points x, y (arrays of px)."""
    h, w = shape_hw
    n, m = small.shape
    u = ((x + 0.5) * (m / w) - 0.5).astype(np.float32)
    v = ((y + 0.5) * (n / h) - 0.5).astype(np.float32)
    return cv2.remap(small, u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def map_points(shape_hw):
    """Page points (x, y) at the centres of a MAP_STEP-coarse lattice over shape_hw: where maps are computed."""
    h, w = shape_hw
    m, n = -(-w // MAP_STEP), -(-h // MAP_STEP)
    xs = (np.arange(m, dtype=np.float32) + 0.5) * (w / m) - 0.5
    ys = (np.arange(n, dtype=np.float32) + 0.5) * (h / n) - 0.5
    return np.meshgrid(xs, ys)


def remap_maps(shifts, shape_hw):
    """Coarse remap maps (map_points' lattice) from LineShifts: output (X, Y) samples the page at
    (x, y) = (X, Y) + shift(x, y), the shifts read where the lines are on the page (fixed-point steps)."""
    grid_x, grid_y = map_points(shape_hw)
    map_x, map_y = grid_x, grid_y
    for _ in range(FIXED_POINT_STEPS + 1):
        map_x, map_y = (grid_x + at_points(shifts.x, map_x, map_y, shape_hw),
                        grid_y + at_points(shifts.y, map_x, map_y, shape_hw))
    return map_x, map_y


def composed(first, then, shape_hw):
    """Coarse maps that sample through `first` (maps of the page) at the points `then` maps to (maps of the
    page first made): one resampling for two warps."""
    return tuple(at_points(part, *then, shape_hw) for part in first)


def warped(image, maps, fill=(255, 255, 255)):
    """An image of the page (RGB, or a float map) sampled at coarse maps (upsampled to its size); what lies beyond
    the page is `fill` (blank paper)."""
    h, w = image.shape[:2]
    map_x, map_y = (cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR) for part in maps)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def family_periods(rgb, px_per_mm):
    """(x, y) major-line periods in px: each family's as page_scale.measure_grid reads it where that is within
    PERIOD_TOL of the nominal px_per_mm's, else the other family's, else the nominal one."""
    nominal = MAJOR_MM * px_per_mm
    read = [None if a is None or abs(a['period_px'] / nominal - 1) > PERIOD_TOL else a['period_px']
            for a in page_scale.measure_grid(rgb)]
    return tuple(own or other or nominal for own, other in (read, read[::-1]))


@dataclass
class LineShifts:
    """One reading of a page's grid: x, y (ny, nx) float32 px by which the lines near each lattice node sit off
    an even lattice (smoothed; shift_field), how closely that smooth field follows the shifts read (residual_mm,
    RMS over the sure nodes), the share of nodes sure enough to read, the largest shift (mm) and the grid's
    mean px per mm (x, y) over the page (family_shifts)."""
    x: np.ndarray
    y: np.ndarray
    residual_mm: float
    sure_share: float
    largest_mm: float
    px_per_mm: tuple


def along_trend(raw, sure, axis):
    """((ny, nx) least-squares line through a family's sure raw shifts along its own axis, its slope in px per
    node): a period read a little off (measure_grid reads the page's centre) drifts linearly, and taking the
    drift out keeps the page's mean scale and size (a page stretched to a fold's period would lose its edges)."""
    coord = np.indices(raw.shape, dtype=np.float64)[axis]
    if sure.sum() < 2:
        return np.zeros(raw.shape, np.float32), 0.0
    slope, offset = np.polyfit(coord[sure], raw[sure], 1)
    return (offset + slope * coord).astype(np.float32), float(slope)


def family_shifts(g, period, axis, step):
    """One line family of a grid-ness map: (smooth shift field (ny, nx) px without its drift, the misfits of the
    sure nodes to it in mm, the share of sure nodes, the family's mean period on the page in px). Lines at
    x = k period + a + b x lie a period / (1 - b) apart: the mean period, which the flattened page keeps."""
    smooth, sure, raw = shift_field(g, period, axis, step)
    trend, slope = along_trend(raw, sure, axis)
    smooth, raw = smooth - trend, raw - trend
    misfit = (raw - smooth)[sure]
    misfit_mm = (misfit - np.median(misfit)) * MAJOR_MM / period if misfit.size else misfit
    node_px = g.shape[axis] / raw.shape[axis]
    return smooth, misfit_mm, float(sure.mean()), period / (1 - slope / node_px)


def read_shifts(rgb, px_per_mm):
    """(h, w, 3) uint8 RGB page at about px_per_mm -> LineShifts of its two line families (shifts_of)."""
    return shifts_of(line_map(rgb), family_periods(rgb, px_per_mm))


def shifts_of(g, periods):
    """LineShifts of a page's grid-ness map g (line_map) whose line families lie about (x, y) `periods` px
    apart."""
    step = NODE_PERIODS * min(periods)
    (sx, misfit_x, sure_x, mean_x), (sy, misfit_y, sure_y, mean_y) = (
        family_shifts(g, period, axis, step) for period, axis in zip(periods, (1, 0)))
    largest = max(np.abs(sx).max() * MAJOR_MM / periods[0], np.abs(sy).max() * MAJOR_MM / periods[1])
    misfits = np.concatenate([misfit_x, misfit_y])
    residual = float(np.sqrt(np.mean(misfits ** 2))) if misfits.size else float('nan')
    return LineShifts(sx, sy, residual, (sure_x + sure_y) / 2, float(largest), (mean_x / MAJOR_MM, mean_y / MAJOR_MM))


def unflattened_why(shifts):
    """Why a page's LineShifts are not to be applied (no grid, or one read too unevenly to trust), or None."""
    if not shifts.residual_mm <= MAX_RESIDUAL_MM:   # NaN too: no node was sure
        return f'no even grid read (residual {shifts.residual_mm:.2f} mm)'
    if shifts.largest_mm > MAX_SHIFT_MM:
        return f'shifts of {shifts.largest_mm:.0f} mm read'
    return None


def flatten(rgb, px_per_mm):
    """(h, w, 3) uint8 RGB rectified page at about px_per_mm -> Flattened: its grid lines moved onto an even
    lattice, in FLATTEN_PASSES readings composed into one resampling. A second reading takes out what the
    smoothing of the first left at sharp folds; it reads the first warp's grid-ness map at the first reading's
    mean periods (where the flattened lines lie), and is dropped if it reads worse than MAX_RESIDUAL_MM."""
    g = line_map(rgb)
    shifts = shifts_of(g, family_periods(rgb, px_per_mm))
    why = unflattened_why(shifts)
    if why:
        return Flattened(rgb, f'untouched: {why}', shifts.largest_mm, shifts.residual_mm, shifts.sure_share)
    largest = shifts.largest_mm
    maps = remap_maps(shifts, rgb.shape[:2])
    for _ in range(FLATTEN_PASSES - 1):
        again = shifts_of(warped(g, maps, 0.0), tuple(MAJOR_MM * v for v in shifts.px_per_mm))
        if not again.residual_mm <= MAX_RESIDUAL_MM:
            break
        shifts, maps = again, composed(maps, remap_maps(again, rgb.shape[:2]), rgb.shape[:2])
    return Flattened(warped(rgb, maps), 'flattened', largest, shifts.residual_mm, shifts.sure_share, shifts.px_per_mm)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Flatten rectified ECG pages on their grid.')
    parser.add_argument('images', nargs='+', type=Path, help='rectified pages (page_rectify.py --out)')
    parser.add_argument('--out', required=True, type=Path, help='folder for {stem}.png and {stem}.json')
    parser.add_argument('--px_per_mm', type=float, default=page_rectify.PX_PER_MM,
                        help=f'the pages\' scale, about (default {page_rectify.PX_PER_MM:g}, page_rectify\'s)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.px_per_mm <= 0:
        raise ecg_cli.InputError('--px_per_mm must be positive')
    args.out.mkdir(parents=True, exist_ok=True)
    for image in args.images:
        found = flatten(page_image.read_rgb(image), args.px_per_mm)
        cv2.imwrite(str(args.out / f'{image.stem}.png'), cv2.cvtColor(found.rgb, cv2.COLOR_RGB2BGR))
        (args.out / f'{image.stem}.json').write_text(json.dumps({'image': str(image), **found.summary()}, indent=2))
        print(f'{image}: {found.action}, largest shift {found.shift_mm:.1f} mm, residual {found.residual_mm:.2f} mm')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
