"""One home for each concept: the layout written once and derived everywhere, one preprocessing path,
--config for every key, --select_metric, and the per-epoch metrics file."""
import json

import numpy as np
import pytest
import torch

import ecg_decode
import ecg_heads
import ecg_simulator
import page_image
import page_reader
import production_dataset as pdx
import production_trainer
from conftest import run_cli, run_in_process
from ecg_page import FS, LEADS, N_SAMPLES, STANDARD

TINY = ['--image_size', '64', '320', '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0']


def test_the_standard_layout_is_written_once_and_derived():
    assert STANDARD.rows[1] == ('II', 'aVL', 'V2', 'V5') and STANDARD.rhythm == ('II',)
    mask = STANDARD.shown_mask()
    assert mask.shape == (12, N_SAMPLES) and mask[LEADS.index('II')].all()
    v4 = np.flatnonzero(mask[LEADS.index('V4')])
    assert (v4[0], v4[-1]) == (int(7.5 * FS), N_SAMPLES - 1)
    windows = ecg_decode.default_windows(1, 'cpu')[0]
    assert windows[LEADS.index('aVF')].tolist() == pytest.approx([2.5, 5.0 - 1 / FS])
    assert np.array_equal(page_reader.layout_mask(), mask)
    assert ecg_simulator.LAYOUT == [list(row) for row in STANDARD.rows]


def top_level_names(path):
    """Names a module defines at its top level, and the project modules it imports."""
    import ast
    tree = ast.parse(path.read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    return defined, imported


def test_each_step_of_reading_a_page_is_written_once():
    """One page reader: every step from an image file to its signal is defined in one module, and no script
    imports another script's CLI to read a page (the trainer, evaluate.py and visualize.py go through
    page_reader, not inference.py)."""
    from conftest import ROOT
    steps = ('read_rgb', 'find_page', 'crop_to_grid', 'read_scale', 'preprocess', 'stack_inputs', 'read_signals',
             'read_row_bands', 'decode_outputs', 'read_geometry', 'lead_confidence', 'page_readings', 'record_stats',
             'summarize')
    homes = {step: [] for step in steps}
    for path in sorted(ROOT.glob('*.py')):
        defined, imported = top_level_names(path)
        for step in steps:
            if step in defined:
                homes[step].append(path.name)
        if path.name in ('production_trainer.py', 'evaluate.py', 'visualize.py', 'page_reader.py'):
            assert 'inference' not in imported, path.name
    assert all(len(where) == 1 for where in homes.values()), homes


def parameter_count(function):
    """A def's named parameters, self and cls aside (a **knobs bag checked against its defaults, as the
    simulator's drawing knobs are, is one thing passed through)."""
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    return len([name for name in names if name not in ('self', 'cls')])


def test_no_function_takes_more_than_eight_parameters():
    """What travels together has a type (Geometry, Training, SignalKnobs, PageMix, CheckedSamples), so no
    function of the project or its tests needs more than eight parameters."""
    import ast
    from conftest import ROOT
    crowded = []
    for path in sorted(ROOT.glob('*.py')) + sorted((ROOT / 'tests').glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > 8:
                crowded.append(f'{path.name}:{node.lineno} {node.name} ({parameter_count(node)})')
    assert not crowded, crowded


def test_loss_names_and_signal_parts_come_from_the_loss():
    assert production_trainer.LOSS_NAMES == list(ecg_heads.DEFAULT_LOSS_WEIGHTS)
    flags = {a.dest for a in production_trainer.build_parser()._actions}
    assert {f'loss_weight_{name}' for name in ecg_heads.DEFAULT_LOSS_WEIGHTS} <= flags


def test_training_and_inference_see_identical_tensors(sim_data):
    png = sorted(sim_data.glob('*/*-0001.png'))[0]
    dataset = pdx.ECGImageDataset.from_folders(sim_data, sim_data, target_size=(64, 320))
    index = [ref.png for ref in dataset.refs].index(png)
    served, _, aspect = page_image.preprocess(page_image.read_rgb(png), (64, 320))
    assert torch.equal(dataset[index]['image'], served)
    assert aspect == pytest.approx(float(dataset[index]['page_aspect']))


@pytest.fixture(scope='module')
def no_val_run(sim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('noval')
    config = out / 'settings.json'
    config.write_text(json.dumps({'epochs': 2, 'max_samples': 12, 'val_fraction': 0, 'lr': 3e-4,
                                  'loss_weights': {'grid': 0.2}}))
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                     '--config', config, '--lr', '5e-4', '--output_dir', out)
    return next(out.glob('run_*')), result


def test_config_file_sets_any_key_below_the_cli(no_val_run):
    run_dir, _ = no_val_run
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['epochs'] == 2 and config['max_samples'] == 12 and config['val_fraction'] == 0
    assert config['lr'] == 5e-4                              # CLI beats the file
    assert config['loss_weights']['grid'] == 0.2 and config['loss_weights']['seg'] == 1.0


def test_without_validation_best_is_the_latest_epoch(no_val_run):
    run_dir, result = no_val_run
    best = torch.load(run_dir / 'checkpoints' / 'best.pth')
    assert best['epoch'] == 2 and best['select_metric'] == 'latest' and best['best_metric'] == 2.0
    assert 'best.pth by latest' in result.stdout and '-1.00 dB' not in result.stdout


def test_metrics_file_has_one_line_per_epoch(no_val_run):
    run_dir, _ = no_val_run
    epochs = production_trainer.read_metrics(run_dir)
    assert [e['epoch'] for e in epochs] == [1, 2] and epochs[-1]['val'] is None
    assert epochs[0]['global_step'] == 3 and epochs[0]['train']['images_per_s'] > 0
    assert set(ecg_heads.SIGNAL_PARTS) <= set(epochs[0]['train'])


def test_select_metric_val_loss_and_bad_settings(sim_data, tmp_path):
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                     '--epochs', '1', '--max_samples', '12', '--select_metric', 'val_loss', '--output_dir', tmp_path)
    best = torch.load(next(tmp_path.glob('run_*/checkpoints/best.pth')))
    assert best['select_metric'] == 'val_loss'
    assert best['best_metric'] == pytest.approx(production_trainer.read_metrics(best['config']['run_dir'])[0]['val']['total'])
    assert 'best.pth by val_loss' in result.stdout
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'learning_rate': 1}))
    result = run_in_process('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, '--config', bad)
    assert result.returncode == 1 and "unknown settings ['learning_rate']" in result.stderr
    result = run_in_process('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data,
                            '--val_fraction', '0', '--select_metric', 'snr_db')
    assert result.returncode == 1 and 'needs a validation split' in result.stderr
