"""The shipped starter weights: small, safe to load, described by their model card, used when no
--checkpoint is given, and a start that --init_from fine-tunes."""
import hashlib
import shutil

import torch

import ecg_checkpoint
from conftest import run_cli

STARTER = ecg_checkpoint.STARTER
CARD = STARTER.parent / 'MODEL_CARD.md'


def test_starter_is_small_fp16_and_its_card_names_its_hash_and_command():
    assert STARTER.is_file() and STARTER.stat().st_size <= 10 * 2 ** 20
    starter = torch.load(STARTER)   # weights only: no pickled code
    floats = [t for t in starter['model'].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert 'optimizer' not in starter and starter['layouts'] == ['3x4+II']
    card = CARD.read_text()
    assert hashlib.sha256(STARTER.read_bytes()).hexdigest() in card
    assert 'python bench_quality.py' in card and 'Pearson' in card


def test_inference_and_visualize_use_the_starter_without_a_checkpoint(sim_data, tmp_path):
    image = shutil.copy(sorted(sim_data.glob('*/*-0001.png'))[0], tmp_path / 'page.png')
    result = run_cli('inference.py', '--image', image, '--output', tmp_path / 'page.csv')
    assert f'using the starter weights {STARTER}' in result.stdout
    assert 'warning' not in result.stderr   # a standard page: no untrained layout fits it better
    assert (tmp_path / 'page.csv').is_file() and str(STARTER) in (tmp_path / 'page.json').read_text()
    result = run_cli('visualize.py', '--image', image, '--output', tmp_path / 'page_vis.png')
    assert 'using the starter weights' in result.stdout and (tmp_path / 'page_vis.png').is_file()
