"""visualize.py CLI on a tiny simulator image: a readable PNG with plots, truth found by itself or given by --csv."""
import shutil

import cv2
import pandas as pd
import pytest

import numpy as np

import page_image
import page_reader
import visualize
from conftest import ROOT, run_cli

PANEL_HW = (64 * 4, 320 * 4)   # the 64 x 320 model input, upscaled x4 for legibility


def check_picture(path):
    picture = cv2.imread(str(path))
    assert picture is not None, f'{path} not written'
    assert picture.std() > 10                                        # not blank
    # the overlay panel plus three rows of lead plots below it
    assert picture.shape[0] > 2 * PANEL_HW[0] and picture.shape[1] >= PANEL_HW[1]


@pytest.fixture(scope='module')
def record(sim_data):
    image = sorted(sim_data.glob('*/*-0001.png'))[0]
    return image, image.parent / f'{image.parent.name}.csv'


def test_truth_found_beside_a_simulator_image(record, tiny_checkpoint, tmp_path):
    image, csv = record
    output = tmp_path / 'picture.png'
    result = run_cli('visualize.py', '--image', image, '--checkpoint', tiny_checkpoint, '--output', output)
    check_picture(output)
    assert f'wrote {output}' in result.stdout
    assert f'truth: {csv}' in result.stdout and 'fs from' in result.stdout
    assert 'Pearson r per lead: I ' in result.stdout


def test_truth_from_csv_and_fs_with_default_output(record, sim_data, tiny_checkpoint, tmp_path):
    image, csv = record
    lone = shutil.copy(image, tmp_path / 'scan.png')                 # no JSON, no train.csv near it
    table = pd.read_csv(sim_data / 'train.csv', dtype={'id': str}).set_index('id')
    fs = table.loc[image.parent.name, 'fs']
    result = run_cli('visualize.py', '--image', lone, '--checkpoint', tiny_checkpoint, '--csv', csv, '--fs', fs)
    output = tmp_path / 'scan_visualization.png'
    check_picture(output)
    assert str(output) in result.stdout
    assert f'at {fs:g} Hz (fs from --fs)' in result.stdout
    assert 'Pearson r per lead: I ' in result.stdout


PHOTOS = ROOT.parent / 'shared' / 'real' / 'photos'


def outline_pixels(picture):
    """Pixels of the page outline's green (page_rectify.OUTLINE_RECTIFIED), within a little resampling blur."""
    return int((np.abs(picture.astype(int) - (0, 200, 0)).max(-1) < 40).sum())


def test_a_photo_shows_the_page_found_beside_the_page_read(tmp_path):
    """On a phone photo the picture's top shows the photo as taken with the page's outline, left of the
    rectified page the model read; the page found is named on stdout."""
    output = tmp_path / 'photo.png'
    result = run_cli('visualize.py', '--image', PHOTOS / 'images' / '00012_hr-0001.jpg',
                     '--csv', PHOTOS / 'csv' / '00012_hr' / '00012_hr.csv', '--fs', 500, '--output', output)
    assert 'page: page found and rectified (outline fit' in result.stdout
    picture = cv2.imread(str(output))[..., ::-1]
    top_left = picture[:picture.shape[0] // 4, :picture.shape[1] // 4]
    assert outline_pixels(top_left) > 300


def test_the_found_panel_is_the_photo_with_its_outline_and_none_for_a_render(record):
    photo = page_image.read_rgb(PHOTOS / 'images' / '00012_hr-0001.jpg')
    _, found = page_reader.find_page(photo)
    panel = visualize.found_panel(photo, found, 300)
    assert panel.shape == (300, round(photo.shape[1] * 300 / photo.shape[0]), 3)
    assert outline_pixels(panel) > 300 and outline_pixels(cv2.resize(photo, panel.shape[1::-1])) < 30
    overlay = np.zeros((300, 500, 3), np.uint8)
    assert visualize.beside(panel, overlay).shape[1] == panel.shape[1] + visualize.PANEL_GAP_PX + 500
    render = page_image.read_rgb(record[0])
    assert visualize.found_panel(render, page_reader.find_page(render)[1], 300) is None
    assert visualize.beside(None, overlay) is overlay


def test_a_photo_is_read_at_the_scale_inference_reads_it():
    """visualize draws what inference.py reads: on 01879_hr's photo the scale comes from the flattened page's grid
    and the pulse in the sheet's left fifth (10 mm/mV), not from the page as a render (a grid box taken for a
    5 mm/mV pulse)."""
    image = PHOTOS / 'images' / '01879_hr-0001.jpg'
    args = visualize.parse_args(['--image', str(image)])
    outputs, _, _, _ = visualize.predict(args)
    row, problem = page_reader.read_page(page_image.image_pages(image)[0], (128, 672))
    assert problem is None
    assert outputs['scale'] == row[4]
    assert outputs['scale']['gain_mm_mv'] == 10 and outputs['page_found']['flatten'] == 'flattened'
