"""train.sh end to end, unattended, on a tiny demo configuration; and its early, clear failures."""
import os
import subprocess

from conftest import ROOT, python_command


def run_train_sh(tmp_path, *args, **env):
    # its steps' interpreters: the CLI zygote's (conftest.python_command), which has torch imported already
    environment = dict(os.environ, OUTPUT_DIR=str(tmp_path / 'exp'), DEMO_DIR=str(tmp_path / 'demo'),
                       DEMO_RECORDS='8', DEMO_EPOCHS='1', IMAGE_SIZE='64 320', ENCODER_OVERRIDE='tu-regnetx_002',
                       VENV_PYTHON=python_command(), **env)
    return subprocess.run(['bash', 'train.sh', *map(str, args)], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)


def test_unattended_demo_run_goes_through_every_step(tmp_path):
    result = run_train_sh(tmp_path, '-y', '--', '--max_samples', '8')
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ('Step 1: environment check', 'Step 2: data check', 'Step 3: quick debug', 'Step 4: full training'):
        assert step in out
    assert 'device: cpu -> suggested --batch_size' in out
    assert 'No data configured' in out and 'usable: 8' in out
    assert 'debug mode' in out and 'Demo done' in out and 'tensorboard --logdir' in out
    runs = sorted((tmp_path / 'exp').glob('run_*'))
    assert len(runs) == 2                                   # the debug run and the full run
    assert (runs[-1] / 'checkpoints' / 'best.pth').is_file()
    assert (runs[-1] / 'checkpoints' / 'best_eval.json').is_file()
    assert (runs[-1] / 'demo_held_out_page.png').stat().st_size > 10_000
    assert sum('it/s]' in line for line in out.splitlines()) < 20, 'progress bars flood a log file'
    assert (tmp_path / 'exp' / 'data_check' / 'preview.png').is_file()


def test_missing_data_path_fails_early(tmp_path):
    result = run_train_sh(tmp_path, '-y', '--sim_root', tmp_path / 'nowhere', '--csv_root', tmp_path)
    assert result.returncode != 0
    assert f'SIM_ROOT {tmp_path / "nowhere"}: no such folder' in result.stderr
    assert 'Step 3' not in result.stdout


def test_ids_that_do_not_match_fail_early(tmp_path, sim_data):
    signals = tmp_path / 'signals'
    signals.mkdir()
    (signals / 'train.csv').write_text('id,fs,sig_len\n999,500,5000\n')
    result = run_train_sh(tmp_path, '-y', '--sim_root', sim_data, '--csv_root', signals)
    assert result.returncode != 0
    assert 'no usable sample' in result.stderr and 'is not in' in result.stdout
    assert 'Step 3' not in result.stdout


def test_folder_without_images_fails_early(tmp_path, sim_data):
    (tmp_path / 'empty').mkdir()
    result = run_train_sh(tmp_path, '-y', '--sim_root', tmp_path / 'empty', '--csv_root', sim_data)
    assert result.returncode != 0 and 'no PNG images found' in result.stderr
