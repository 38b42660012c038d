"""What users break by accident, through the real CLIs: one clear line instead of a traceback, bad samples
named and skipped, no bad weights on disk, Ctrl-C that saves, resume that just works, safe loading."""
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import ecg_checkpoint
import ecg_heads

from conftest import ROOT, python_command, run_cli, run_failing, run_in_process

TINY = ['--image_size', '64', '320', '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0']


def one_line_error(result, *needles):
    """A failed CLI that said what is wrong in one line, without a traceback."""
    assert result.returncode != 0, result.stdout
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train(data, out, *extra, check=True):
    return run_cli('production_trainer.py', '--sim_root', data, '--csv_root', data, *TINY, '--output_dir', out,
                   *extra, check=check)


def all_finite(path):
    state = torch.load(path)
    return all(bool(torch.isfinite(t).all()) for t in state['model'].values() if t.is_floating_point())


@pytest.fixture(scope='module')
def bad_data(sim_data, tmp_path_factory):
    """The simulator set with four records broken the ways users break them (8 stay good)."""
    root = tmp_path_factory.mktemp('bad') / 'data'
    shutil.copytree(sim_data, root)
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    wild, truncated, tiny, moved = ids[:4]
    csv = root / wild / f'{wild}.csv'
    frame = pd.read_csv(csv)
    frame.loc[10, 'V2'] = 1e30
    frame.to_csv(csv, index=False)
    png = root / truncated / f'{truncated}-0001.png'
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])      # header reads, pixels do not
    png = root / tiny / f'{tiny}-0001.png'
    cv2.imwrite(str(png), np.full((1, 1, 3), 255, np.uint8))
    meta = json.loads(png.with_suffix('.json').read_text())
    meta.update(width=1, height=1)
    for lead in meta['leads']:
        lead['plotted_pixels'] = [[0, 0]] * len(lead['plotted_pixels'])
    png.with_suffix('.json').write_text(json.dumps(meta))
    meta_path = root / moved / f'{moved}-0001.json'
    meta = json.loads(meta_path.read_text())
    meta['leads'][0]['plotted_pixels'] = [[r + 5000, c] for r, c in meta['leads'][0]['plotted_pixels']]
    meta_path.write_text(json.dumps(meta))
    return root, dict(wild=wild, truncated=truncated, tiny=tiny, moved=moved)


# ---------------------------------------------------------------- one-line errors

def test_data_mistakes_are_one_line_in_validator_and_trainer(sim_data, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    binary = tmp_path / 'binary'
    binary.mkdir()
    (binary / 'train.csv').write_bytes(bytes(range(256)) * 4)
    columnless = tmp_path / 'columnless'
    columnless.mkdir()
    (columnless / 'train.csv').write_text('a,b\n1,2\n')
    cases = [(tmp_path / 'misspelled', sim_data, '--sim_root is not a folder'),
             (empty, sim_data, 'no .png image'),
             (sim_data, tmp_path / 'nope', '--csv_root is not a folder'),
             (sim_data, binary, 'not a readable CSV'),
             (sim_data, columnless, "missing columns ['fs', 'id', 'sig_len']")]
    for i, (sim_root, csv_root, message) in enumerate(cases):   # the trainer reads data through the validator
        one_line_error(run_failing(i == 0, 'production_dataset.py', '--sim_root', sim_root, '--csv_root', csv_root),
                       message)
    for i, (sim_root, csv_root, message) in enumerate(cases[::2]):
        one_line_error(run_failing(i == 0, 'production_trainer.py', '--sim_root', sim_root, '--csv_root', csv_root,
                                   *TINY, '--output_dir', tmp_path / 'out'), message)
    assert not (tmp_path / 'out').exists(), 'a failed start leaves no run folder'


def test_unwritable_output_folder_is_one_line(sim_data, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    result = train(sim_data, blocker / 'runs', '--epochs', '1', '--max_samples', '12', check=False)
    one_line_error(result, 'cannot write the run folder', '--output_dir')


def test_disk_full_and_failed_save_say_so_and_leave_no_tmp(tmp_path):
    message = ecg_checkpoint.write_problem(OSError(errno.ENOSPC, 'No space left on device'), tmp_path)
    assert message.startswith('disk full')
    target = tmp_path / 'file_not_folder'
    target.write_text('x')
    with pytest.raises(ecg_checkpoint.CheckpointError, match='could not be written'):
        ecg_checkpoint.save(target / 'last.pth', {'model': {}})
    assert not list(tmp_path.rglob('*.tmp'))


def test_checkpoint_problems_are_one_line_in_every_script(tiny_run, sim_data, tmp_path):
    import ecg_model
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    plain = tmp_path / 'plain.pth'
    torch.save(ecg_model.ECGDigitizer('tu-regnetx_002').state_dict(), plain)
    other = tmp_path / 'other_encoder.pth'
    checkpoint = torch.load(tiny_run / 'checkpoints' / 'best.pth')
    checkpoint['model_args'] = dict(checkpoint['model_args'], encoder='resnet18')
    torch.save(checkpoint, other)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes((tiny_run / 'checkpoints' / 'best.pth').read_bytes()[:5000])
    image = sorted(sim_data.glob('*/*-0001.png'))[0]
    cases = [(text, 'not a readable checkpoint'), (plain, 'not a checkpoint of this toolkit'),
             (other, 'weights do not fit'), (truncated, 'not a readable checkpoint'),
             (tmp_path / 'missing.pth', 'checkpoint not found')]
    for i, (path, message) in enumerate(cases):   # every script loads through ecg_checkpoint: each case once,
        one_line_error(run_failing(i == 0, 'evaluate.py', '--checkpoint', path), str(path), message)   # each script twice
    for i, (path, message) in enumerate(cases[1:3]):
        one_line_error(run_failing(i == 0, 'inference.py', '--image', image, '--checkpoint', path, '--output',
                                   tmp_path / 'x.csv'), message)
        one_line_error(run_failing(i == 1, 'visualize.py', '--image', image, '--checkpoint', path, '--output',
                                   tmp_path / 'x.png'), message)


# ---------------------------------------------------------------- bad samples and bad images

def test_bad_samples_are_named_and_skipped_up_front(bad_data, tmp_path):
    root, broken = bad_data
    result = run_cli('production_dataset.py', '--sim_root', root, '--csv_root', root, '--preview',
                     tmp_path / 'p.png')
    assert 'usable: 8   problems: 4' in result.stdout
    problems = [line for line in result.stdout.splitlines() if 'PROBLEM' in line]
    expected = {'wild': 'exceed 20 mV', 'truncated': 'could not decode its pixels', 'tiny': 'too small',
                'moved': 'outside the'}
    for kind, reason in expected.items():
        assert any(broken[kind] in line and reason in line for line in problems), (kind, problems)
    run = train(root, tmp_path / 'runs', '--epochs', '1', '--val_fraction', '0.3')
    assert '4 skipped as bad' in run.stdout
    assert 'Traceback' not in run.stderr


def test_inference_refuses_images_that_are_not_pages(tiny_run, tmp_path):
    best = tiny_run / 'checkpoints' / 'best.pth'
    cv2.imwrite(str(tmp_path / 'dot.png'), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(tmp_path / 'blank.png'), np.full((800, 1000, 3), 255, np.uint8))
    for name, reason in (('dot.png', 'too small'), ('blank.png', 'blank')):
        result = run_failing(name == 'dot.png', 'inference.py', '--image', tmp_path / name, '--checkpoint', best,
                             '--output', tmp_path / f'{name}.csv')
        one_line_error(result, name, reason)
        assert not (tmp_path / f'{name}.csv').exists()


def test_inference_output_with_trailing_slash_is_a_folder(tiny_run, sim_data, tmp_path):
    image = sorted(sim_data.glob('*/*-0001.png'))[0]
    run_cli('inference.py', '--image', image, '--checkpoint', tiny_run / 'checkpoints' / 'best.pth',
            '--output', f'{tmp_path / "newdir"}/')
    assert (tmp_path / 'newdir' / f'{image.stem}.csv').is_file()


# ---------------------------------------------------------------- no bad weights on disk

def test_diverging_run_stops_clearly_and_writes_only_finite_weights(sim_data, tmp_path):
    result = train(sim_data, tmp_path, '--lr', '1e6', '--val_fraction', '0', '--epochs', '15',
                   '--max_samples', '12', check=False)
    one_line_error(result, 'training diverged', '--lr')
    for path in tmp_path.glob('run_*/checkpoints/*.pth'):
        assert all_finite(path), path


# ---------------------------------------------------------------- Ctrl-C and resume

def wait_for(predicate, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_saves_mid_epoch_and_resume_finishes_the_run(sim_data, tmp_path):
    command = [python_command(), 'production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
               '--batch_size', '1', '--epochs', '3', '--max_samples', '12', '--output_dir', tmp_path, '--log_every', '1']
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert wait_for(lambda: list(tmp_path.glob('run_*/tensorboard/events*')), 120), 'training never started'
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'Resume with' in stdout
    run_dir = next(tmp_path.glob('run_*'))
    stopped = torch.load(run_dir / 'checkpoints' / 'last.pth')
    assert stopped['epoch'] * 11 + stopped['step_in_epoch'] == stopped['global_step'] > 0
    resumed = run_cli('production_trainer.py', '--resume', run_dir / 'checkpoints' / 'last.pth')
    assert 'resumed from' in resumed.stdout
    final = torch.load(run_dir / 'checkpoints' / 'last.pth')
    assert (final['epoch'], final['step_in_epoch'], final['global_step']) == (3, 0, 33)   # 11 images a step each


def test_a_stop_after_an_epochs_last_step_resumes_into_its_end(tiny_run, tmp_path):
    """Ctrl-C after the last step of an epoch, before its end (validation, checkpoints): the resumed run has no
    step left in it, and still ends the epoch and writes its checkpoint."""
    run = Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name))
    last = run / 'checkpoints' / 'last.pth'
    stopped = torch.load(last)
    steps = stopped['global_step']                       # the one epoch's steps
    stopped['epoch'], stopped['step_in_epoch'] = 0, steps
    torch.save(stopped, last)
    run_cli('production_trainer.py', '--resume', last)
    final = torch.load(last)
    assert (final['epoch'], final['step_in_epoch'], final['global_step']) == (1, 0, steps)
    assert 'epoch 1/1 | train loss n/a (every step ran before the resume)' in (run / 'logs' / 'train.log').read_text()


def test_resume_takes_the_model_from_the_checkpoint_and_refuses_changing_it(tiny_run, tmp_path):
    # a copy: the session's tiny run stays one epoch for every other test, whatever order they run in
    tiny_run = Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name))
    last = tiny_run / 'checkpoints' / 'last.pth'
    config_before = (tiny_run / 'config.json').read_text()
    result = run_cli('production_trainer.py', '--resume', last, '--image_size', '128', '672', check=False)
    one_line_error(result, '--image_size [128, 672] (checkpoint: [64, 320])')
    assert (tiny_run / 'config.json').read_text() == config_before
    (tiny_run / 'checkpoints' / 'epoch_7.pth.tmp').write_bytes(b'half a save')
    result = run_cli('production_trainer.py', '--resume', last, '--epochs', '2')   # the README's recipe
    assert 'resume: epochs changed from 1 to 2' in result.stdout
    assert torch.load(last)['epoch'] == 2 and torch.load(last)['model_args']['encoder'] == 'tu-regnetx_002'
    assert not list((tiny_run / 'checkpoints').glob('*.tmp'))


def test_resume_of_a_missing_or_foreign_checkpoint_creates_nothing(tiny_run, tmp_path):
    result = run_cli('production_trainer.py', '--resume', tmp_path / 'typo' / 'last.pth', check=False)
    one_line_error(result, 'checkpoint not found')
    assert not (tmp_path / 'typo').exists()
    loose = tmp_path / 'copied.pth'
    shutil.copy(tiny_run / 'checkpoints' / 'last.pth', loose)
    one_line_error(run_in_process('production_trainer.py', '--resume', loose), 'cannot tell which run')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['copied.pth']


# ---------------------------------------------------------------- safe loading

class Exploit:
    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_checkpoint_that_would_run_code_is_refused(tiny_run, sim_data, tmp_path):
    exploit = Exploit()
    exploit.marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'model_args': {}, 'config': {}, 'payload': exploit}, evil)
    image = sorted(sim_data.glob('*/*-0001.png'))[0]
    result = run_cli('inference.py', '--image', image, '--checkpoint', evil, '--output', tmp_path / 'x.csv',
                     check=False)
    one_line_error(result, 'not loaded for safety')
    assert not exploit.marker.exists()
    saved = torch.load(tiny_run / 'checkpoints' / 'last.pth')     # plain torch.load: weights_only
    assert saved['format'] == ecg_checkpoint.FORMAT == 3 and saved['head_channels'] == ecg_heads.HEAD_CHANNELS


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tiny_run, sim_data, tmp_path):
    best = tiny_run / 'checkpoints' / 'best.pth'
    result = train(sim_data, tmp_path / 'ok', '--epochs', '1', '--max_samples', '12', '--init_from', best)
    assert f'weights from {best}' in result.stdout
    assert torch.load(next((tmp_path / 'ok').glob('run_*/checkpoints/last.pth')))['epoch'] == 1   # a new run
    result = train(sim_data, tmp_path / 'bad', '--encoder', 'resnet18', '--init_from', best, check=False)
    one_line_error(result, '--init_from', 'same --encoder')
    assert not (tmp_path / 'bad').exists()
