"""page_flatten: a rectified photo's folds and curl taken out on its grid. A known bend of a real ecg-image-kit
page is read back and undone; find_page flattens the photos it rectified and leaves renders as they are."""
import json

import cv2
import numpy as np
import pytest

import page_flatten
import page_image
import page_reader
import page_rectify
from conftest import FIXTURE, ROOT, run_cli

RENDER = FIXTURE / 'images' / 'fx1024-0001.png'            # 7.87 px/mm, an even grid
PHOTO = ROOT.parent / 'shared' / 'real' / 'photos' / 'images' / '02932_hr-0001.jpg'   # folded, rectified
PX_PER_MM = 7.87


def bend(shape_hw):
    """A fold-like bend of a page (h, w): columns pushed right by up to 4 mm along a ramp that turns at a vertical
    fold line a third of the way across, more towards the page's bottom, and rows pushed down by up to 2 mm in
    a slow wave along x. -> (shift_x, shift_y) (h, w) float32 px: where each output pixel samples the page."""
    h, w = shape_hw
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    ramp = np.clip((x - w / 3) / (w / 3), 0, 1)
    shift_x = 4 * PX_PER_MM * ramp * (0.5 + 0.5 * y / h)
    shift_y = 2 * PX_PER_MM * np.sin(np.pi * x / w)
    return shift_x, shift_y


def bent(rgb, shifts):
    h, w = rgb.shape[:2]
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(rgb, x + shifts[0], y + shifts[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=(255, 255, 255))


def spread_mm(field):
    """How far (mm) a line-shift field (px) strays from even, at its 2nd and 98th percentiles."""
    low, high = np.percentile(field, [2, 98])
    return (high - low) / PX_PER_MM


def line_spread_mm(rgb, px_per_mm=8.0):
    """(x, y): how far (mm) a page's vertical and horizontal grid lines stray from an even lattice where they
    are seen (the sure nodes' shifts read, less their linear drift), half their 10-90 percentile range."""
    g = page_flatten.line_map(rgb)
    periods = page_flatten.family_periods(rgb, px_per_mm)
    spreads = []
    for period, axis in zip(periods, (1, 0)):
        _, sure, raw = page_flatten.shift_field(g, period, axis, page_flatten.NODE_PERIODS * min(periods))
        seen = (raw - page_flatten.along_trend(raw, sure, axis)[0])[sure] * 5 / period
        spreads.append(float(np.diff(np.percentile(seen, [10, 90]))[0] / 2))
    return spreads


def test_a_known_bend_is_read_and_undone():
    render = page_image.read_rgb(RENDER)
    shifts = bend(render.shape[:2])
    page = bent(render, shifts)
    read = page_flatten.read_shifts(page, PX_PER_MM)
    # a line the bend moved sits where an output pixel sampled it: off by minus that pixel's shift, and by a
    # plane (the bent page's mean period differs from the render's, and flattening keeps the mean)
    ny, nx = read.x.shape
    inner = (slice(ny // 8, -ny // 8), slice(nx // 8, -nx // 8))
    rows, cols = np.indices((ny, nx))
    for field, applied in ((read.x, shifts[0]), (read.y, shifts[1])):
        error = (field + cv2.resize(applied, (nx, ny), interpolation=cv2.INTER_AREA))[inner]
        plane = np.column_stack([np.ones(error.size), rows[inner].ravel(), cols[inner].ravel()])
        coef = np.linalg.lstsq(plane, error.ravel(), rcond=None)[0]
        assert np.percentile(np.abs(error.ravel() - plane @ coef), 95) < 0.35 * PX_PER_MM
    assert spread_mm(read.x) > 1.5 and spread_mm(read.y) > 1.5
    flat = page_flatten.flatten(page, PX_PER_MM)
    assert flat.action == 'flattened' and flat.shift_mm > 1
    assert flat.residual_mm < 0.3
    again, original = page_flatten.read_shifts(flat.rgb, PX_PER_MM), page_flatten.read_shifts(render, PX_PER_MM)
    # from 2 mm to what the render itself reads (its margins and text: 0.2 and 0.4 mm)
    assert spread_mm(again.x) < spread_mm(original.x) + 0.15
    assert spread_mm(again.y) < spread_mm(original.y) + 0.15


def test_phases_are_unwrapped_over_the_grids_own_region():
    """A strip of strong, unrelated phase beside the grid, cut off from it by unsure nodes (the edge of the white
    fill beyond a warped page), neither seeds the unwrapping nor is reached from it."""
    cols = np.arange(40)
    field = np.tile(np.exp(-2j * np.pi * cols / 40.0 * 3), (10, 1)).astype(np.complex64)   # 3 turns across
    field[:, 36:] = 5 * np.exp(1j * np.arange(4))                                       # the loud strip
    sure = np.ones(field.shape, bool)
    sure[:, 34:36] = False
    phase = page_flatten.unwrap_from_surest(field, sure)
    assert np.isnan(phase[:, 34:]).all()
    assert np.diff(phase[:, :34], axis=1) == pytest.approx(-2 * np.pi * 3 / 40, abs=1e-5)   # no jump


def test_a_page_without_a_grid_is_left_as_it_is():
    rng = np.random.default_rng(0)
    noise = rng.normal(245, 4, (800, 1100, 3)).clip(0, 255).astype(np.uint8)
    for page in (noise, np.full((800, 1100, 3), 250, np.uint8)):
        flat = page_flatten.flatten(page, 8.0)
        assert flat.rgb is page
        assert flat.action.startswith('untouched: no even grid read')


def test_find_page_flattens_the_photos_it_rectified_only():
    page, found = page_reader.find_page(page_image.read_rgb(PHOTO))
    assert found['action'] == 'rectified' and found['flatten'] == 'flattened'
    assert found['flatten_shift_mm'] > 3            # its fold moves lines by about 7 mm
    assert found['flatten_residual_mm'] < 0.4
    before = line_spread_mm(page_rectify.rectify(page_image.read_rgb(PHOTO)).rgb)
    after = line_spread_mm(page)
    assert before[0] > 1.5 and before[1] > 2                  # a fold bends its lines by millimetres
    assert max(after) < 0.35                                   # 0.14 mm: the strips line up again
    scale = page_reader.page_input_row(page, (128, 672), found)[4]   # the flattened grid's scale is read
    assert [scale['px_per_mm_x'], scale['px_per_mm_y']] == pytest.approx(found['flatten_px_per_mm'])
    assert 7.4 < scale['px_per_mm_x'] < 8.0 and scale['source'] == 'grid'
    render = page_image.read_rgb(RENDER)
    page, found = page_reader.find_page(render)
    assert found['action'].startswith('untouched') and 'flatten' not in found
    assert page is render


def test_cli_writes_the_flattened_page_and_what_was_done(tmp_path):
    render = page_image.read_rgb(RENDER)
    bent_page = tmp_path / 'bent.png'
    cv2.imwrite(str(bent_page), cv2.cvtColor(bent(render, bend(render.shape[:2])), cv2.COLOR_RGB2BGR))
    run_cli('page_flatten.py', bent_page, '--out', tmp_path / 'out', '--px_per_mm', PX_PER_MM)
    facts = json.loads((tmp_path / 'out' / 'bent.json').read_text())
    assert facts['flatten'] == 'flattened' and facts['flatten_shift_mm'] > 1 and facts['flatten_residual_mm'] < 0.3
    assert facts['flatten_px_per_mm'] == pytest.approx([PX_PER_MM, PX_PER_MM], rel=0.05)
    assert page_image.read_rgb(tmp_path / 'out' / 'bent.png').shape == render.shape
    result = run_cli('page_flatten.py', bent_page, '--out', tmp_path / 'out', '--px_per_mm', 0, check=False)
    assert result.returncode != 0 and '--px_per_mm must be positive' in result.stderr
