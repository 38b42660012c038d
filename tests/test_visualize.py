"""visualize.py CLI on a tiny simulator image: a readable PNG with plots, truth found by itself or given by --csv."""
import shutil

import cv2
import pandas as pd
import pytest

from conftest import run_cli

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
