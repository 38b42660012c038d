"""export_onnx.py and inference.py --onnx: the exported network in onnxruntime gives the signals torch gives
(within 1e-3 mV), for any batch size; the same CSVs through the CLI. Skipped without the optional extras."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli, run_in_process

EXTRAS = 'optional extras not installed: pip install -r requirements-export.txt (or ./setup.sh --export)'
onnx = pytest.importorskip('onnx', reason=EXTRAS, exc_type=ImportError)
onnxruntime = pytest.importorskip('onnxruntime', reason=EXTRAS, exc_type=ImportError)

import export_onnx  # noqa: E402  (after the skips: it is only useful with the extras)
from ecg_checkpoint import load_model  # noqa: E402
import ecg_decode
import page_reader


@pytest.fixture(scope='module')
def exported(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp('onnx') / 'model.onnx'
    result = run_cli('export_onnx.py', '--checkpoint', tiny_checkpoint, '--output', path)
    return path, result


@pytest.fixture(scope='module')
def pages(sim_data, tmp_path_factory):
    """Three simulator PNGs alone in a folder (no JSON), as a user's scans."""
    folder = tmp_path_factory.mktemp('pages')
    for path in sorted(sim_data.glob('*/*-0001.png'))[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def test_export_writes_a_valid_model_with_dynamic_batch(exported):
    path, result = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    image = graph.graph.input[0].type.tensor_type.shape.dim
    assert image[0].dim_param == 'batch' and [d.dim_value for d in image[1:]] == [3, 64, 320]
    assert [o.name for o in graph.graph.output] == ['maps', 'theta']
    assert 'wrote' in result.stdout


def test_onnxruntime_signals_match_torch_within_a_microvolt(exported, tiny_checkpoint, pages):
    model, _ = load_model(tiny_checkpoint)
    network = export_onnx.OnnxDigitizer(exported[0])
    inputs, _, problems = page_reader.read_batch(sorted(pages.iterdir()), network.image_size)
    batch = inputs['image']
    assert not problems and len(batch) == 3
    geometry = ecg_decode.read_geometry(inputs)
    with torch.inference_mode():
        reference = model(batch, geometry)
    together = network(batch, geometry)
    one_by_one = [network(batch[i:i + 1], geometry.pages(i, i + 1)) for i in range(3)]
    assert (together['signal'] - reference['signal']).abs().max() < 1e-3
    assert (together['decode_theta'] - reference['decode_theta']).abs().max() <= 0.02 + 1e-6
    assert (torch.cat([o['signal'] for o in one_by_one]) - together['signal']).abs().max() < 1e-3
    assert together['seg'].shape == reference['seg'].shape and together['theta'].shape == (3,)
    # the export decodes with the checkpoint's own pulse start weight, as the torch model does
    assert network.pulse_start_weight == model.pulse_start_weight is not None
    # and chooses among the layouts the checkpoint was trained on (before, always the standard page alone)
    meta = json.loads(network.session.get_modelmeta().custom_metadata_map['ecg_digitizer'])
    assert meta['layouts'] == network.trained_layouts == ['3x4+II']


def test_inference_cli_onnx_writes_the_same_csvs(exported, tiny_checkpoint, pages, tmp_path):
    run_cli('inference.py', '--image', pages, '--checkpoint', tiny_checkpoint, '--output', tmp_path / 'torch')
    result = run_cli('inference.py', '--image', pages, '--onnx', exported[0], '--output', tmp_path / 'onnx',
                     '--batch_size', '2')
    assert 'wrote 3 signal(s)' in result.stdout
    for csv in sorted((tmp_path / 'torch').glob('*.csv')):
        torch_csv, onnx_csv = pd.read_csv(csv), pd.read_csv(tmp_path / 'onnx' / csv.name)
        assert list(onnx_csv.columns) == list(torch_csv.columns) and len(onnx_csv) == 5000
        # both are rounded to 3 decimals: values within 1e-3 mV may round 1e-3 apart
        np.testing.assert_allclose(onnx_csv.to_numpy(), torch_csv.to_numpy(), atol=1e-3 + 1e-9, equal_nan=True)


@pytest.mark.parametrize('case', ['missing onnx', 'not onnx', 'both'])
def test_onnx_flag_errors_name_the_problem(case, exported, tiny_checkpoint, pages, tmp_path):
    args = ['inference.py', '--image', pages, '--output', tmp_path / 'out']
    if case == 'missing onnx':
        args += ['--onnx', tmp_path / 'missing.onnx']
    if case == 'not onnx':
        (tmp_path / 'text.onnx').write_text('not a model')
        args += ['--onnx', tmp_path / 'text.onnx']
    if case == 'both':
        args += ['--onnx', exported[0], '--checkpoint', tiny_checkpoint]
    result = run_cli(*args, check=False) if case == 'not onnx' else run_in_process(*args)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    expected = {'missing onnx': 'missing.onnx', 'not onnx': 'text.onnx'}.get(case, '--checkpoint')
    assert expected in result.stderr
