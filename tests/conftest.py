"""Shared test helpers: paths to the real ecg-image-kit fixture and a tiny simulator data set."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / 'shared' / 'fixtures' / 'ecg-image-kit'
PYTHON = sys.executable


def run_cli(*args, cwd=ROOT, timeout=600, check=True):
    """Run one of the project's CLIs as a person would; returns the CompletedProcess."""
    result = subprocess.run([PYTHON, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
    return result


@pytest.fixture(scope='session')
def fixture_dirs():
    return FIXTURE / 'images', FIXTURE / 'signals'


@pytest.fixture(scope='session')
def sim_data(tmp_path_factory):
    """12 records x 1 image from the built-in simulator at 100 dpi (small, fast)."""
    out = tmp_path_factory.mktemp('sim')
    run_cli('ecg_simulator.py', '--out', out, '--n', 12, '--seed', 7, '--workers', 2, '--dpi_choices', 100)
    return out


@pytest.fixture(scope='session')
def tiny_checkpoint(sim_data, tmp_path_factory):
    """best.pth of a 1-epoch run of the real trainer CLI at 64 x 320 on sim_data (weights barely trained:
    for checking files and shapes, not accuracy)."""
    out = tmp_path_factory.mktemp('tiny_run')
    run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, '--image_size', '64', '320',
            '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0', '--epochs', '1',
            '--max_samples', '12', '--output_dir', out)
    return next(out.glob('run_*/checkpoints/best.pth'))
