"""Tests of page_scale: px per mm, gain and paper speed read from the page itself (grid, pulse),
on the real ecg-image-kit fixture, its padded / cropped / rescaled copies and simulator pages."""
import json
import math
import sys

import cv2
import numpy as np
import pytest

from conftest import FIXTURE, ROOT, run_cli

sys.path.insert(0, str(ROOT))
import ecg_simulator as sim  # noqa: E402
import page_scale as ps  # noqa: E402

IMAGES = FIXTURE / 'images'
FIXTURE_PAGES = ['fx1024-0001', 'fx1024-0002', 'fx2048-0001', 'fx2048-0002']
FIXTURE_PX_PER_MV, FIXTURE_PX_PER_S = 78.74, 196.85          # the fixture README's facts


def read_page(png):
    """(RGB page, its JSON)."""
    rgb = cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with open(png.with_suffix('.json')) as f:
        return rgb, json.load(f)


def truth_px_per_mm(meta, k=1.0):
    """(x, y) px per mm from the JSON: x_grid / y_grid are px per 5 mm."""
    return meta['x_grid'] / 5 * k, meta['y_grid'] / 5 * k


def assert_px_per_mm(scale, meta, rel, k=1.0):
    tx, ty = truth_px_per_mm(meta, k)
    assert scale.px_per_mm_x == pytest.approx(tx, rel=rel), (scale, tx)
    assert scale.px_per_mm_y == pytest.approx(ty, rel=rel), (scale, ty)


@pytest.fixture(scope='module')
def fixture_pages():
    return {name: read_page(IMAGES / f'{name}.png') for name in FIXTURE_PAGES}


@pytest.fixture(scope='module')
def varied_sim(tmp_path_factory):
    """8 simulator pages at 75..300 dpi in classic, colour (red, pink, orange, green, blue, grey),
    black-and-white and noisy styles, rotated up to 5 degrees."""
    out = tmp_path_factory.mktemp('scale_sim')
    run_cli('ecg_simulator.py', '--out', out, '--n', 8, '--seed', 2, '--workers', 2,
            '--dpi_choices', 75, 150, 200, 300, '--style_probs', 0.3, 0.4, 0.15, 0, 0.15)
    return sorted(out.glob('*/*-0001.png'))


@pytest.fixture(scope='module')
def nogrid_sim(tmp_path_factory):
    out = tmp_path_factory.mktemp('scale_nogrid')
    run_cli('ecg_simulator.py', '--out', out, '--n', 4, '--seed', 12, '--workers', 2,
            '--dpi_choices', 100, 150, 200, '--style_probs', 0, 0, 0, 1, 0)
    return sorted(out.glob('*/*-0001.png'))


# ----------------------------------------------------------------------------------------------
# The real ecg-image-kit fixture
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', FIXTURE_PAGES)
def test_fixture_scale_from_grid_within_1_percent(fixture_pages, name):
    rgb, meta = fixture_pages[name]
    scale = ps.estimate_scale(rgb)
    assert scale.source == 'grid' and scale.confidence > 0.5
    assert_px_per_mm(scale, meta, rel=0.01)
    # the pulse says 10 mm/mV at 25 mm/s: measured, not assumed
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (10.0, 25.0)
    assert not scale.gain_assumed and not scale.speed_assumed
    assert ps.px_per_mv(scale) == pytest.approx(FIXTURE_PX_PER_MV, rel=0.01)
    assert ps.px_per_s(scale) == pytest.approx(FIXTURE_PX_PER_S, rel=0.01)


def test_fixture_rotation_is_read_from_the_grid(fixture_pages):
    """ecg-image-kit rotates by a whole number of degrees in [-6, 6]: the grid's angle lands on one."""
    for name in ('fx1024-0001', 'fx2048-0001'):
        assert abs(ps.estimate_scale(fixture_pages[name][0], use_pulse=False).angle_deg) < 0.1
    for name in ('fx1024-0002', 'fx2048-0002'):
        angle = ps.estimate_scale(fixture_pages[name][0], use_pulse=False).angle_deg
        assert abs(angle) <= 6.2 and abs(angle - round(angle)) < 0.15, angle


def pad(rgb, frac=0.12):
    h, w = rgb.shape[:2]
    return cv2.copyMakeBorder(rgb, int(frac * h), int(frac * h), int(frac * w), int(frac * w),
                              cv2.BORDER_CONSTANT, value=(255, 255, 255))


def crop(rgb, frac=0.10):
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[int(frac * h): h - int(frac * h), int(frac * w): w - int(frac * w)])


TRANSFORMS = {   # name: (page -> page, factor on px per mm)
    'pad 12%': (pad, 1.0),
    'crop 10%': (crop, 1.0),
    'resize 0.6': (lambda rgb: cv2.resize(rgb, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA), 0.6),
    'resize 1.4': (lambda rgb: cv2.resize(rgb, None, fx=1.4, fy=1.4, interpolation=cv2.INTER_LINEAR), 1.4),
}


@pytest.mark.parametrize('name', ['fx1024-0001', 'fx2048-0002'])
@pytest.mark.parametrize('transform', list(TRANSFORMS))
def test_padded_cropped_rescaled_pages_keep_their_scale(fixture_pages, name, transform):
    """What broke the border-based scale (12 % padding changed lead II's amplitude by 133 %)."""
    rgb, meta = fixture_pages[name]
    change, k = TRANSFORMS[transform]
    scale = ps.estimate_scale(change(rgb))
    assert scale.source == 'grid'
    assert_px_per_mm(scale, meta, rel=0.03, k=k)
    assert ps.px_per_mv(scale) == pytest.approx(FIXTURE_PX_PER_MV * k, rel=0.03)
    assert ps.px_per_s(scale) == pytest.approx(FIXTURE_PX_PER_S * k, rel=0.03)


@pytest.mark.parametrize('name', ['fx1024-0001', 'fx2048-0002'])
def test_resized_differently_along_x_and_y(fixture_pages, name):
    """A page squeezed to a model's input shape: each axis keeps its own scale."""
    rgb, meta = fixture_pages[name]
    scale = ps.estimate_scale(cv2.resize(rgb, None, fx=1.0, fy=0.9, interpolation=cv2.INTER_AREA))
    tx, ty = truth_px_per_mm(meta)
    assert scale.px_per_mm_x == pytest.approx(tx, rel=0.01)
    assert scale.px_per_mm_y == pytest.approx(0.9 * ty, rel=0.01)


def test_fixture_without_its_grid_falls_back_to_the_pulse(fixture_pages):
    """Grid colours blanked out (every coloured or light pixel made paper): only the black trace,
    text and pulses are left, and the pulse gives px per mV and px per s."""
    rgb, _ = fixture_pages['fx1024-0002']
    spread = rgb.max(2).astype(np.int16) - rgb.min(2)
    bare = rgb.copy()
    bare[(spread > 40) | (rgb.min(2) > 150)] = 255
    scale = ps.estimate_scale(bare)
    assert scale.source == 'pulse'
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (10.0, 25.0)     # its shape, 2:1 on square pixels
    assert not scale.gain_assumed and not scale.speed_assumed
    assert ps.px_per_mv(scale) == pytest.approx(FIXTURE_PX_PER_MV, rel=0.05)
    assert ps.px_per_s(scale) == pytest.approx(FIXTURE_PX_PER_S, rel=0.05)
    assert abs(scale.angle_deg - 5.0) < 0.5            # read from the ink: the grid is gone


def test_find_calibration_pulse_on_the_fixture(fixture_pages):
    rgb, _ = fixture_pages['fx1024-0001']
    pulse = ps.find_calibration_pulse(rgb, px_per_mm=FIXTURE_PX_PER_MV / 10, angle_deg=0.0)
    assert pulse['count'] == 4                          # one per row
    assert pulse['height_px'] == pytest.approx(FIXTURE_PX_PER_MV, rel=0.02)         # 1 mV
    assert pulse['width_px'] == pytest.approx(0.2 * FIXTURE_PX_PER_S, rel=0.03)    # 0.2 s
    xs = [x for x, _ in pulse['positions']]
    assert max(xs) - min(xs) < 3 and min(xs) < 0.1 * rgb.shape[1]


# ----------------------------------------------------------------------------------------------
# Simulator pages
# ----------------------------------------------------------------------------------------------

def sim_page(seed, fs, **knobs):
    """(rgb, meta) of one simulator page of a record synthesized at fs Hz, drawn with the simulator's knobs."""
    rng = np.random.default_rng(seed)
    return sim.render_image(sim.synthesize_record(rng, fs), fs, rng, **knobs)


def check_sim_page(png):
    rgb, meta = read_page(png)
    scale = ps.estimate_scale(rgb)
    if meta['style'] == 'nogrid':
        if scale.source is not None:                    # a pulse, or honestly nothing
            assert scale.source == 'pulse'
            assert ps.px_per_mv(scale) == pytest.approx(2 * meta['y_grid'], rel=0.05)
        return scale, meta
    assert scale.source == 'grid', (png.name, meta['style'], meta['resolution'])
    assert_px_per_mm(scale, meta, rel=0.03)
    assert abs(scale.angle_deg - meta['rotation_deg']) < 0.3
    if not scale.gain_assumed:
        assert scale.gain_mm_mv == 10.0
    if not scale.speed_assumed:
        assert scale.paper_speed_mm_s == 25.0
    return scale, meta


def test_sim_data_pages_at_100_dpi(sim_data):
    for png in sorted(sim_data.glob('*/*-0001.png')):
        check_sim_page(png)


def test_varied_dpi_and_grid_colours(varied_sim):
    seen = [check_sim_page(png) for png in varied_sim]
    dpis = {meta['resolution'] for _, meta in seen}
    assert len(dpis) >= 3, dpis                          # the set really varies
    measured = [scale for scale, _ in seen if not scale.gain_assumed]
    assert len(measured) >= len(seen) // 2              # the pulse is usually found too


def test_pages_without_grid_use_the_pulse_or_say_nothing(nogrid_sim):
    results = [check_sim_page(png) for png in nogrid_sim]
    assert all(meta['style'] == 'nogrid' for _, meta in results)
    assert sum(scale.source == 'pulse' for scale, _ in results) >= len(results) // 2


@pytest.mark.parametrize('gain, speed', [(5.0, 50.0), (20.0, 25.0)])
def test_gain_and_speed_read_from_the_pulse(gain, speed):
    """A simulator page at another gain and paper speed (its --gains, --speeds): the grid is unchanged,
    the pulse (and the trace) are drawn taller or shorter, wider or narrower."""
    rgb, meta = sim_page(3, 250, dpi_choices=(150,), style_probs=(1, 1, 0, 0, 0), max_rotation=3.0, gains=(gain,),
                         speeds=(speed,))
    assert (meta['gain_mm_mv'], meta['paper_speed_mm_s']) == (gain, speed)
    scale = ps.estimate_scale(rgb)
    assert scale.source == 'grid'
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (gain, speed)
    assert not scale.gain_assumed and not scale.speed_assumed
    px_mm = meta['y_grid'] / 5
    assert ps.px_per_mv(scale) == pytest.approx(gain * px_mm, rel=0.01)
    assert ps.px_per_s(scale) == pytest.approx(speed * px_mm, rel=0.01)


@pytest.mark.parametrize('gain, speed', [(20.0, 25.0), (5.0, 50.0), (10.0, 50.0), (20.0, 50.0)])
def test_gain_and_speed_of_a_page_without_grid_from_the_pulse_shape(gain, speed):
    """Without a grid the pulse's height / width in px is its shape in mm (square pixels): 4:1 is 20 mm/mV at
    25 mm/s. Shapes two pairs share (20 mm/mV at 50 mm/s looks like the standard 10 at 25) are told apart by
    the page's size in px, 2x apart between them."""
    rgb, meta = sim_page(5, 500, dpi_choices=(200,), style_probs=(0, 0, 0, 1, 0), max_rotation=2.0, gains=(gain,),
                         speeds=(speed,))
    assert meta['style'] == 'nogrid'
    scale = ps.estimate_scale(rgb)
    assert scale.source == 'pulse'
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (gain, speed)
    assert not scale.gain_assumed and not scale.speed_assumed
    px_mm = meta['y_grid'] / 5
    assert ps.px_per_mv(scale) == pytest.approx(gain * px_mm, rel=0.03)
    assert scale.px_per_mm_y == pytest.approx(px_mm, rel=0.03)


def test_pages_without_grid_turned_in_a_dark_fill_give_their_angle_and_pulse():
    """A page turned inside a dark fill (half the simulator's turned pages; a scanner bed): where the fill thins
    out along the image's edge it passes for ink lying along the image, not the paper, and the ink's angle was
    read as 0, so no pulse closed. Before the fill was set aside, 9 of these 18 pages were read."""
    read, angle_errors = [], []
    for seed in range(400, 430):
        rng = np.random.default_rng(seed)
        rgb, meta = sim.render_image(sim.synthesize_record(rng, 500), 500, rng, dpi_choices=(100, 200),
                                     style_probs=(0, 0, 0, 1, 0), max_rotation=5.0, gains=(5.0, 10.0, 20.0),
                                     speeds=(25.0, 50.0))
        if max(rgb[0, 0].max(), rgb[-1, -1].max()) >= 100:
            continue                                     # turned in a paper-coloured fill
        v = ps.max_channel(rgb)
        angle_errors.append(abs(ps.ink_angle(v, float(ps.paper_colour(rgb).max())) - meta['rotation_deg']))
        scale = ps.estimate_scale(rgb)
        read.append(scale.source == 'pulse' and not scale.gain_assumed and
                    (scale.gain_mm_mv, scale.paper_speed_mm_s) == (meta['gain_mm_mv'], meta['paper_speed_mm_s']))
    assert len(read) == 18
    assert max(angle_errors) < 0.2
    assert sum(read) >= 15, read


def test_noisy_pages_of_every_layout_give_gain_and_speed():
    """'noisy' pages of four layouts at 100 and 150 dpi, where speckle breaks the grid lines up and pulses
    stand among their pieces. Before the broken lines were bridged and the specks set aside, 9 of these
    12 were read."""
    read = []
    for seed in range(300, 312):
        rng = np.random.default_rng(seed)
        rgb, meta = sim.render_image(sim.synthesize_record(rng, 500), 500, rng, dpi_choices=(100, 150),
                                     style_probs=(0, 0, 0, 0, 1), max_rotation=5.0,
                                     layouts=('3x4+II', '6x2+II', '12x1', '3x4'))
        scale = ps.estimate_scale(rgb)
        read.append(not (scale.gain_assumed or scale.speed_assumed) and
                    (scale.gain_mm_mv, scale.paper_speed_mm_s) == (meta['gain_mm_mv'], meta['paper_speed_mm_s']))
    assert sum(read) >= 11, read


def test_noisy_pages_at_any_gain_and_speed_give_them():
    """'noisy' simulator pages (a dark, speckled grid raises the ink threshold) at 100-150 dpi, 5-20 mm/mV and
    25-50 mm/s. Before the top line was summed over 3 rows and thin edges found by column pairs, 5 of these 8
    were read."""
    read = []
    for seed in range(116, 124):
        rgb, meta = sim_page(seed, 500, dpi_choices=(100, 150), style_probs=(0, 0, 0, 0, 1), max_rotation=5.0,
                             gains=(5.0, 10.0, 20.0), speeds=(25.0, 50.0))
        scale = ps.estimate_scale(rgb)
        read.append(not scale.gain_assumed and (scale.gain_mm_mv, scale.paper_speed_mm_s) ==
                    (meta['gain_mm_mv'], meta['paper_speed_mm_s']))
    assert sum(read) >= 7, read


@pytest.mark.parametrize('dpi', [100, 150])
def test_pulses_stacked_on_a_tight_row_pitch_give_their_gain(dpi):
    """6x2 + II at 20 mm/mV: each row's 20 mm pulse rises past the foot of the one above, so the rises merge
    into one long stroke (and the falls into another), and the traces crowd the page as a dark grid would.
    The lowest pulse is cut out of the long strokes (before this, 0 and 2 of 6 such pages were read)."""
    read = []
    for seed in range(4):
        rgb, meta = sim_page(seed, 500, dpi_choices=(dpi,), style_probs=(1, 1, 0, 0, 0), max_rotation=3.0,
                             gains=(20.0,), layouts=('6x2+II',))
        scale = ps.estimate_scale(rgb)
        read.append(not scale.gain_assumed and scale.gain_mm_mv == 20.0 and scale.paper_speed_mm_s == 25.0)
        if read[-1]:
            assert ps.px_per_mv(scale) == pytest.approx(20.0 * meta['y_grid'] / 5, rel=0.03)
    assert sum(read) >= 3, read


# ----------------------------------------------------------------------------------------------
# Logic and edge cases
# ----------------------------------------------------------------------------------------------

def test_a_thin_edge_split_between_two_columns_is_found_by_column_pairs():
    """After de-rotation a 1 px edge lies partly in one column, partly in the next: 165 + 110 with the ink
    threshold at 172, full in neither."""
    cov = np.zeros((120, 120), np.uint8)
    cov[30:90, 20], cov[30:90, 21] = 165, 110
    cov[30:90, 60], cov[30:90, 61] = 110, 165
    cov[30:32, 20:62] = 255
    ink = (cov >= 172).astype(np.uint8)
    dark = np.where(cov >= 152, cov, 0).astype(np.uint8)
    assert ps.pulse_candidates(ink, ink, dark, cov, 40, 150) == []
    edges = ink | ps.column_pairs(cov, 172)
    assert edges[32:90, 20].all() and not edges[32:90, 21].any()          # the darker of each pair, 1 px wide
    found = ps.pulse_candidates(ink, edges, dark, cov, 40, 150)
    assert len(found) == 1 and found[0]['width_px'] == pytest.approx(40, abs=1.5)


def pulse_outline(size=120, rise=20, fall=60, top=30, foot=90):
    """(cov, ink, dark) of a drawn pulse, 2 px strokes at full ink, on blank paper."""
    cov = np.zeros((size, size), np.uint8)
    cov[top:foot, rise:rise + 2] = cov[top:foot, fall:fall + 2] = 255
    cov[top:top + 2, rise:fall + 2] = 255
    return cov, (cov >= 90).astype(np.uint8), np.where(cov >= 50, cov, 0).astype(np.uint8)


def test_a_closed_box_is_no_pulse():
    """A pulse stands open on its feet; a line joining them is a grid cell left by the long lines' removal
    (a 5 x 5 mm cell fits 5 mm/mV at 25 mm/s) or a letter."""
    cov, ink, dark = pulse_outline()
    assert len(ps.pulse_candidates(ink, ink, dark, cov, 40, 150)) == 1
    cov[88:90, 20:62] = 255
    ink, dark = (cov >= 90).astype(np.uint8), np.where(cov >= 50, cov, 0).astype(np.uint8)
    assert ps.pulse_candidates(ink, ink, dark, cov, 40, 150) == []


def test_a_qrs_drawn_against_the_fall_leaves_the_width():
    """A trace that starts with a QRS draws its rise against the pulse's fall: the fall's band is then thick,
    and its centre is taken from its inner edge. The width stays 40 px instead of moving to the pair's centre."""
    cov, ink, dark = pulse_outline()
    cov[30:90, 62:65] = 200                                # the R wave's upstroke, touching the fall
    ink, dark = (cov >= 90).astype(np.uint8), np.where(cov >= 50, cov, 0).astype(np.uint8)
    found = ps.pulse_candidates(ink, ink, dark, cov, 40, 150)
    assert len(found) == 1 and found[0]['width_px'] == pytest.approx(40, abs=0.5)


def test_a_top_line_between_two_pixel_rows_still_closes_the_pulse():
    """A dark grid raises the ink threshold (here 172, as on the 'noisy' pages); a thin top line drawn
    between two pixel rows is 170 + 140 there, full in neither row, but as dark summed across it as the rise."""
    cov = np.zeros((120, 120), np.uint8)
    cov[30:90, 20] = cov[30:90, 60] = 255                  # rise and fall: 60 px, 40 px apart
    cov[30:90, 21] = cov[30:90, 61] = 100
    cov[30, 20:62] = np.maximum(cov[30, 20:62], 170)
    cov[31, 20:62] = np.maximum(cov[31, 20:62], 140)
    ink = (cov >= 172).astype(np.uint8)
    dark = np.where(cov >= 152, cov, 0).astype(np.uint8)
    found = ps.pulse_candidates(ink, ink, dark, cov, 40, 150)
    assert len(found) == 1
    assert found[0]['height_px'] == pytest.approx(59, abs=1.5) and found[0]['width_px'] == pytest.approx(40, abs=1)
    cov[30:32, 25:56] = 60                                 # a grid line's darkness there instead: no top line
    assert ps.pulse_candidates(*[(cov >= 172).astype(np.uint8)] * 2, np.where(cov >= 152, cov, 0).astype(np.uint8),
                               cov, 40, 150) == []


def test_snap_to_standard_values():
    assert ps.snap(9.3, ps.GAINS_MM_MV) == 10.0
    assert ps.snap(5.6, ps.GAINS_MM_MV) == 5.0
    assert ps.snap(21.5, ps.GAINS_MM_MV) == 20.0
    assert ps.snap(14.0, ps.GAINS_MM_MV) is None          # between two: not a pulse to trust
    assert ps.snap(48.0, ps.SPEEDS_MM_S) == 50.0
    assert ps.snap(37.0, ps.SPEEDS_MM_S) is None


def test_apply_pulse_sets_gain_and_speed_or_leaves_them_assumed():
    scale = ps.PageScale(px_per_mm_x=8.0, px_per_mm_y=8.0, source='grid')
    ps.apply_pulse(scale, dict(height_px=80.0 * 2, width_px=8.0 * 10), minor_seen=True)
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (20.0, 50.0)
    assert not scale.gain_assumed and not scale.speed_assumed
    odd = ps.PageScale(px_per_mm_x=8.0, px_per_mm_y=8.0, source='grid')
    ps.apply_pulse(odd, dict(height_px=8.0 * 14, width_px=8.0 * 5), minor_seen=True)
    assert odd.gain_assumed and odd.gain_mm_mv == ps.STANDARD_GAIN_MM_MV
    assert not odd.speed_assumed and odd.paper_speed_mm_s == 25.0


def test_a_grid_read_at_its_1_mm_lines_is_corrected_by_the_pulse():
    """A grid whose 5 mm lines were not told from its 1 mm ones reads 5x too few px per mm; a
    pulse '50 mm' tall and '25 mm' wide gives it away."""
    scale = ps.PageScale(px_per_mm_x=1.6, px_per_mm_y=1.6, source='grid')
    ps.apply_pulse(scale, dict(height_px=80.0, width_px=40.0), minor_seen=False)
    assert scale.px_per_mm_y == pytest.approx(8.0)
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (10.0, 25.0)
    kept = ps.PageScale(px_per_mm_x=1.6, px_per_mm_y=1.6, source='grid')
    ps.apply_pulse(kept, dict(height_px=80.0, width_px=40.0), minor_seen=True)
    assert kept.px_per_mm_y == 1.6                      # 1 mm lines seen: no second guessing


@pytest.mark.parametrize('wrong', [1.6, 2.0, 3.0])
def test_a_grid_read_at_a_wrong_period_is_rescaled_by_the_pulses(wrong):
    """Wrinkled ecg-image-kit pages: the grid read 1.6x or 2x too many px per mm puts the pulses (on two
    rows) at no standard gain and speed (at 2x: 5 mm/mV at 12.5 mm/s); their shape (10 mm tall, 5 mm wide) fits 10 mm/mV at 25 mm/s."""
    scale = ps.PageScale(px_per_mm_x=8.0 * wrong, px_per_mm_y=8.0 * wrong, source='grid', confidence=0.8)
    ps.apply_pulse(scale, dict(height_px=80.0, width_px=40.0, count=2), minor_seen=True)
    assert (scale.px_per_mm_x, scale.px_per_mm_y) == (pytest.approx(8.0), pytest.approx(8.0))
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (10.0, 25.0)
    assert not scale.gain_assumed and not scale.speed_assumed and scale.confidence == pytest.approx(0.4)
    assert scale.source == 'pulse'
    lone = ps.PageScale(px_per_mm_x=8.0 * wrong, px_per_mm_y=8.0 * wrong, source='grid')
    ps.apply_pulse(lone, dict(height_px=80.0, width_px=40.0, count=1), minor_seen=True)
    assert lone.px_per_mm_y == 8.0 * wrong                            # one pulse does not overrule the grid
    odd = ps.PageScale(px_per_mm_x=8.0 * wrong, px_per_mm_y=8.0 * wrong, source='grid')
    ps.apply_pulse(odd, dict(height_px=80.0, width_px=55.0, count=3), minor_seen=True)
    assert odd.px_per_mm_y == 8.0 * wrong                              # a shape no standard pulse has


@pytest.mark.parametrize('length', [7, 8, 236])
def test_line_opening_is_cv2s_morphological_opening(length):
    """The doubling-window opening that removes grid lines is cv2's opening by a line, edges included."""
    rng = np.random.default_rng(length)
    ink = (rng.random((300, 260)) < 0.9).astype(np.uint8)
    ink[40, :] = 1                              # a line across the whole width, and one cut by the edge
    ink[:120, 250] = 1
    for axis, kernel in ((0, np.ones((length, 1), np.uint8)), (1, np.ones((1, length), np.uint8))):
        assert np.array_equal(ps.line_opening(ink, length, axis), cv2.morphologyEx(ink, cv2.MORPH_OPEN, kernel) > 0)


def test_combine_axes_wants_both_line_families_or_one_strong():
    axis = lambda period, n=8, s=4.5, minor=True, angle=0.0: dict(
        period_px=period, n_harmonics=n, strength=s, minor_seen=minor, angle_deg=angle)
    px_x, px_y, angle, conf = ps.combine_axes(axis(39.4, angle=2.0), axis(39.3, angle=92.2))
    assert (px_x, px_y) == pytest.approx((7.88, 7.86)) and angle == pytest.approx(2.1) and conf > 0.5
    assert ps.combine_axes(None, axis(47.9, n=3, s=2.6, minor=False)) is None   # a lone weak comb
    assert ps.combine_axes(None, axis(39.4))[:2] == pytest.approx((7.88, 7.88))
    assert ps.combine_axes(axis(39.4), axis(7.88, minor=False))[:2] == pytest.approx((7.88, 7.88))


@pytest.mark.parametrize('kind', ['blank', 'noise'])
def test_nothing_found_on_a_page_without_grid_or_pulse(kind):
    rng = np.random.default_rng(0)
    rgb = (np.full((850, 1100, 3), 255, np.uint8) if kind == 'blank'
           else rng.integers(0, 256, (850, 1100, 3), dtype=np.uint8))
    scale = ps.estimate_scale(rgb)
    assert scale.source is None and scale.confidence == 0.0
    assert math.isnan(scale.px_per_mm_x) and math.isnan(ps.px_per_mv(scale))
    assert ps.find_calibration_pulse(rgb) is None


def test_cli_prints_scale_and_seconds():
    result = run_cli('page_scale.py', IMAGES / 'fx1024-0001.png')
    line = result.stdout.strip()
    assert 'fx1024-0001.png' in line and 'grid:' in line and ' s ' in line and '78.7' in line


def test_cli_scores_folders_against_their_json(tmp_path):
    """--score: the fixture's 4 pages all read right; a simulator page at 20 mm/mV whose JSON is edited to
    say 10 is named as missed."""
    rgb, meta = sim_page(3, 250, dpi_choices=(150,), style_probs=(1, 0, 0, 0, 0), max_rotation=1.0, gains=(20.0,))
    cv2.imwrite(str(tmp_path / 'p.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / 'p.json').write_text(json.dumps(dict(meta, gain_mm_mv=10.0)))
    result = run_cli('page_scale.py', '--score', IMAGES, tmp_path)
    lines = result.stdout.splitlines()
    assert 'images: 4 pages, pulse found 4, gain read 4, speed read 4, px/mV within 3 % 4' in lines[0]
    assert lines[1].endswith('missed: none')
    assert '1 pages, pulse found 1, gain read 0, speed read 1, px/mV within 3 % 0' in lines[2]
    assert lines[3].endswith('missed: p.png')


def test_search_pulse_takes_the_first_close_fit(monkeypatch):
    """The tries' answers scripted (raised levels, plain levels, raised with column pairs' edges): pieces of grid
    cells cut out of pulses that stand on grid lines (5.5 x 10 mm: 5 mm/mV at 50 mm/s, 10 % off) only loosely
    fit and do not end the search; the drawn 20 mm/mV pulse found next does. Without a close fit the first
    found is kept, and a pulse fitting no pair on the grid but with a standard shape (a grid read at a wrong
    period) ends the search at once."""
    mm = 5.9
    pieces = dict(height_px=5.5 * mm, width_px=10 * mm, count=8)
    drawn = dict(height_px=20 * mm, width_px=5 * mm, count=1)
    wrong_period = dict(height_px=10 * mm / 2, width_px=5 * mm / 2, count=3)   # the grid read at 2x
    monkeypatch.setattr(ps, 'ink_levels', lambda cov: (180, 160))

    def search(*answers):
        tries = iter(answers)
        monkeypatch.setattr(ps, 'pulse_at_levels', lambda *a: next(tries))
        return ps.search_pulse(None, mm, 25.0, 1)

    assert search(None, pieces, drawn) is drawn
    assert search(pieces, None, None) is pieces
    assert search(wrong_period, drawn, drawn) is wrong_period


def plain_paper_colour(rgb):
    """paper_colour's definition in plain numpy: per channel, the median of the brighter half of every 4th pixel."""
    small = rgb[::4, ::4]
    lum = small.astype(np.uint16).sum(2)
    bright = small[lum >= np.median(lum)]
    return [float(np.percentile(bright[:, c], 50, method='inverted_cdf')) for c in range(3)]


@pytest.mark.parametrize('crop', [(slice(None), slice(None)), (slice(3, -1), slice(0, -2))])
def test_paper_colour_is_the_median_of_the_brighter_half(crop):
    """paper_colour (histogram median, cv2 sums) gives what the plain formula gives, on a real page, an
    odd-sized crop of it (its brightness median falls between two values) and the page tinted yellow."""
    rgb = np.ascontiguousarray(read_page(IMAGES / 'fx2048-0002.png')[0][crop])
    tinted = rgb.copy()
    tinted[..., 2] = tinted[..., 2] // 2 + 20
    for page in (rgb, tinted):
        assert ps.paper_colour(page).tolist() == plain_paper_colour(page)
    assert ps.paper_colour(tinted)[2] < 150 < ps.paper_colour(tinted)[0]


def test_percentile_u8_is_numpys_inverted_cdf_percentile_over_the_mask():
    """percentile_u8 (cv2's histogram) is np.percentile's inverted-CDF percentile of the masked pixels, on a
    strided view as on a plain array; 0 where the mask leaves nothing (ink_coverage on an all-solid page)."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (301, 403), dtype=np.uint8)
    mask = (rng.random(pixels.shape) < 0.3).astype(np.uint8)
    for q in (0.3, 50, 96):
        for a, m in ((pixels, None), (pixels[::2, ::2], None), (pixels, mask), (pixels[::2, ::2], mask[::2, ::2].copy())):
            values = a[m.astype(bool)] if m is not None else a.ravel()
            assert ps.percentile_u8(a, q, m) == int(np.percentile(values, q, method='inverted_cdf')), (q, a.shape)
    assert ps.percentile_u8(pixels, 50, np.zeros_like(pixels)) == 0


def test_running_median_is_scipys_median_filter():
    """The rays' background (running_median) is scipy.ndimage.median_filter of size (1, 9), edges repeated (and
    of any other odd width)."""
    from scipy import ndimage
    rows = np.random.default_rng(0).standard_normal((7, 50)).astype(np.float32)
    rows[2, :20] = 3.0                                      # plateaus and ties, as a log spectrum has
    for width in (ps.BACKGROUND_BINS, 1, 3, 11):
        expected = ndimage.median_filter(rows, size=(1, width), mode='nearest')
        np.testing.assert_array_equal(ps.running_median(rows, width), expected)


@pytest.mark.parametrize('n', [64, 33])
def test_mirrored_power_is_the_whole_dfts_power(n):
    """log_spectrum's power from a real FFT's half, mirrored through DC, is numpy's full DFT power."""
    from scipy import fft
    g = np.random.default_rng(n).standard_normal((n, n)).astype(np.float32)
    whole = np.abs(np.fft.fft2(g.astype(np.float64))) ** 2
    np.testing.assert_allclose(ps.mirrored_power(fft.rfft2(g)), whole, rtol=1e-4, atol=1e-4 * whole.mean())


def pad_with_paper(rgb, top, bottom, left, right):
    """The page inside a border of its own paper colour (as ecg-image-kit's --random_padding pads a page)."""
    paper = tuple(int(v) for v in ps.paper_colour(rgb))
    return cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=paper)


def test_the_grid_is_found_inside_padding_and_whole_pages_are_left_whole(fixture_pages, sim_data):
    """grid_extent finds the page inside paper-coloured padding to within 1 % of a side, on every side, and
    returns None on pages whose grid reaches their edges (the fixture, simulator pages)."""
    for name, (rgb, _) in fixture_pages.items():
        assert ps.grid_extent(rgb) is None, name
        h, w = rgb.shape[:2]
        sides = (int(0.2 * h), int(0.1 * h), int(0.15 * w), int(0.05 * w))
        box = ps.grid_extent(pad_with_paper(rgb, *sides))
        assert box is not None, name
        found = np.array([box.y0, box.y1, box.x0, box.x1])
        expected = np.array([sides[0], sides[0] + h, sides[2], sides[2] + w])
        assert np.abs(found - expected).max() <= 0.01 * max(h, w), (name, found, expected)
    for png in sorted(sim_data.glob('*/*.png')):
        assert ps.grid_extent(read_page(png)[0]) is None, png


def test_a_padded_page_reads_as_the_page_itself(tmp_path):
    """inference.py on an ecg-image-kit page padded by a fifth of its size with its paper: the padding is
    cut off (sidecar page_found) and the signal is the unpadded page's; the page itself is left whole."""
    rgb, _ = read_page(IMAGES / 'fx1024-0001.png')
    h, w = rgb.shape[:2]
    cv2.imwrite(str(tmp_path / 'whole.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    padded = pad_with_paper(rgb, h // 5, h // 5, w // 5, w // 5)
    cv2.imwrite(str(tmp_path / 'padded.png'), cv2.cvtColor(padded, cv2.COLOR_RGB2BGR))
    run_cli('inference.py', '--image', tmp_path, '--output', tmp_path / 'out/')
    whole, cut = (np.genfromtxt(tmp_path / 'out' / f'{name}.csv', delimiter=',', skip_header=1)
                  for name in ('whole', 'padded'))
    shown = np.isfinite(whole) & np.isfinite(cut)
    assert shown.sum() > 0.9 * np.isfinite(whole).sum()
    assert np.corrcoef(whole[shown], cut[shown])[0, 1] > 0.95
    sidecar = json.loads((tmp_path / 'out' / 'padded.json').read_text())
    x, y, cw, ch = sidecar['page_found']['grid_crop_xywh']
    assert abs(x - w // 5) <= 0.01 * w and abs(y - h // 5) <= 0.01 * h and abs(cw - w) <= 0.02 * w
    assert 'grid_crop_xywh' not in json.loads((tmp_path / 'out' / 'whole.json').read_text())['page_found']


def test_a_time_axis_read_far_off_the_page_is_not_decoded_with(fixture_pages, monkeypatch):
    """A grid whose time axis reads 7x the voltage axis's px per mm (aliasing on a 74 dpi page) leaves px per
    s to the page border, named in 'rejected'; a plausible one is used."""
    from dataclasses import replace
    rgb, _ = fixture_pages['fx1024-0001']
    good = ps.estimate_scale(rgb)
    _, px_per_s, found = ps.read_scale(rgb, (128, 672))
    assert math.isfinite(px_per_s) and 'rejected' not in found
    monkeypatch.setattr(ps, 'estimate_scale', lambda *_, **__: replace(good, px_per_mm_x=7 * good.px_per_mm_x))
    px_per_mv, px_per_s, found = ps.read_scale(rgb, (128, 672))
    assert math.isnan(px_per_s) and math.isfinite(px_per_mv) and 'time axis' in found['rejected']


@pytest.mark.parametrize('photo, width_tol', [('02100_hr-0001.jpg', 0.08), ('03259_hr-0001.jpg', 0.08),
                                               ('01879_hr-0001.jpg', 0.15)])   # its edges lie on major lines
def test_a_photos_pulse_crossed_by_a_dark_grid_line_is_read_whole(photo, width_tol):
    """Real dev photos printed at 10 mm/mV and 25 mm/s, whose red grid is as dark as the trace where the light is
    poor: a major line crosses each 10 mm pulse in the middle. Taking the grid's lines out used to cut the pulse's
    rise and fall in two, and their lower halves with the line read as 5 mm/mV. On 01879_hr a 5 x 5 mm grid box
    a third of the way across the sheet passed for the pulse: a photo's pulse is sought in the sheet's left fifth.
    Read as inference reads them: found, flattened, at the flattened grid's scale."""
    import page_image
    import page_reader
    page, found = page_reader.find_page(page_image.read_rgb(ROOT.parent / 'shared' / 'real' / 'photos' / 'images' / photo))
    scale = ps.estimate_scale(page, photo=True, grid=page_reader.flattened_grid(found))
    assert (scale.gain_mm_mv, scale.paper_speed_mm_s) == (10.0, 25.0)
    assert not scale.gain_assumed and not scale.speed_assumed
    assert scale.pulse['height_px'] / scale.px_per_mm_y == pytest.approx(10.0, rel=0.08)
    assert scale.pulse['width_px'] / scale.px_per_mm_x == pytest.approx(5.0, rel=width_tol)
