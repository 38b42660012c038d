"""page_rectify.py: renders and simulator pages come back untouched (the same array); phone photos come back as
the letter page at 8 px/mm, the grid square and upright, through the real CLI."""
import json

import numpy as np
import pytest

import page_image
import page_rectify
import page_scale
from conftest import FIXTURE, ROOT, run_cli, run_in_process

PHOTOS = ROOT.parent / 'shared' / 'real' / 'photos' / 'images'
SHOWN = ['00012_hr-0001.jpg', '02652_hr-0001.jpg']   # a rotated page, a folded one running out of view


@pytest.fixture(scope='module')
def simulator_pages(tmp_path_factory):
    out = tmp_path_factory.mktemp('sim')
    run_cli('ecg_simulator.py', '--out', out, '--n', 6, '--seed', 3, '--workers', 1, '--dpi_choices', 100)
    return sorted(out.glob('*/*.png'))


@pytest.fixture(scope='module')
def photos_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp('rectified')
    result = run_cli('page_rectify.py', *[PHOTOS / name for name in SHOWN], '--out', out, '--show')
    return out, result


def test_renders_and_simulator_pages_come_back_untouched(simulator_pages):
    pages = sorted((FIXTURE / 'images').glob('*.png')) + simulator_pages
    assert len(pages) == 10
    for path in pages:
        rgb = page_image.read_rgb(path)
        found = page_rectify.rectify(rgb)
        assert found.rgb is rgb, f'{path.name}: {found.action}'
        assert found.action.startswith('untouched') and found.homography is None


def stained_render():
    """The fixture render on orange paper lit brighter over its top half (ecg-image-kit's coloured, stained
    styles): the bright part once passed for a sheet on a darker desk."""
    rgb = page_image.read_rgb(FIXTURE / 'images' / 'fx1024-0001.png').astype(np.float32)
    rows = np.arange(rgb.shape[0], dtype=np.float32)
    light = 0.75 + 0.35 * np.clip(1 - rows / (0.45 * rgb.shape[0]), 0, 1)
    return np.clip(rgb * np.array([1.0, 0.62, 0.35]) * light[:, None, None], 0, 255).astype(np.uint8)


def test_a_render_whose_light_changes_is_no_sheet_on_a_desk():
    rgb = stained_render()
    found = page_rectify.rectify(rgb)
    assert found.rgb is rgb
    assert 'does not stand out' in found.action and found.edge_contrast < 20
    photo = page_rectify.rectify(page_image.read_rgb(PHOTOS / SHOWN[1]))
    assert photo.action == 'rectified' and photo.edge_contrast > 100   # a sheet on a wooden desk


def test_photos_are_rectified_onto_the_letter_page(photos_cli):
    out, result = photos_cli
    for name in SHOWN:
        stem = name.removesuffix('.jpg')
        report = json.loads((out / f'{stem}.json').read_text())
        assert report['action'] == 'rectified' and report['size_wh'] == [2235, 1727]
        assert f'{stem}.png' in result.stdout
        page = page_image.read_rgb(out / f'{stem}.png')
        assert page.shape == (1727, 2235, 3)
        assert page_image.read_rgb(out / f'{stem}_corners.png').shape == page_image.read_rgb(PHOTOS / name).shape
        # the grid read on the page is square and near 8 px/mm (the prints are scaled ~95 % to fit the paper)
        scale = page_scale.estimate_scale(page)
        assert scale.source == 'grid'
        assert 7.0 < scale.px_per_mm_x < 8.5 and scale.px_per_mm_y / scale.px_per_mm_x == pytest.approx(1, abs=0.04)
        corners = np.array(report['corners_xy'])
        assert corners.shape == (4, 2) and report['fit_px'] < 40
        # top-left, top-right, bottom-right, bottom-left: the top side is the longer pair's, left to right
        assert corners[1, 0] > corners[0, 0] and corners[2, 1] > corners[1, 1]
        assert np.linalg.norm(corners[1] - corners[0]) > np.linalg.norm(corners[3] - corners[0])


def test_the_folded_photo_runs_out_of_view(photos_cli):
    """02652_hr: its bottom-left corner lies below the frame; the sides seen carry it there."""
    out, _ = photos_cli
    report = json.loads((out / '02652_hr-0001.json').read_text())
    height = page_image.read_rgb(PHOTOS / '02652_hr-0001.jpg').shape[0]
    assert report['on_frame'] > 0.1 and report['corners_xy'][3][1] > height - 5


def test_unreadable_image_is_one_line(tmp_path):
    broken = tmp_path / 'broken.jpg'
    broken.write_text('not a photo')
    result = run_in_process('page_rectify.py', broken, '--out', tmp_path)
    assert result.returncode == 1 and 'broken.jpg: unreadable image' in result.stderr
