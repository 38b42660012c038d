"""Shared test helpers: paths to the real ecg-image-kit fixture and a tiny simulator data set."""
import atexit
import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client
from multiprocessing.reduction import send_handle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / 'shared' / 'fixtures' / 'ecg-image-kit'
PYTHON = sys.executable



FRESH = os.environ.get('ECG_TEST_FRESH_INTERPRETER') == '1'   # every run a fresh interpreter, as before the zygote


def run_cli(*args, cwd=ROOT, timeout=600, check=True):
    """Run one of the project's CLIs as a person would, `python SCRIPT ARGS` (or `-m MODULE ARGS`) in a process of
    its own; returns the CompletedProcess. It runs in a child of this worker's zygote (cli_zygote.py: the same
    process, started without importing torch again); ECG_TEST_FRESH_INTERPRETER=1 starts a fresh interpreter."""
    args = [str(a) for a in args]
    if FRESH:
        result = subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    else:
        result = run_in_zygote(args, cwd, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
    return result


ZYGOTE = {}   # this worker's zygote: 'process' (Popen), 'address' (its Unix socket)
ZYGOTE_START_S = 180
LAUNCHER = '#!/bin/sh\nexec "{python}" -S "{client}" "$@"\n'


def python_command():
    """The interpreter a test starts for a command that runs Python itself (train.sh, a Popen to signal): this
    worker's zygote client (zygote_python.py), or with ECG_TEST_FRESH_INTERPRETER=1 the real one."""
    if FRESH:
        return PYTHON
    zygote_address()
    return os.environ['ECG_CLI_PYTHON']


def zygote_address():
    """The socket of this worker's zygote, started on first use and stopped when the worker ends."""
    if 'process' in ZYGOTE and ZYGOTE['process'].poll() is None:
        return ZYGOTE['address']
    address = os.path.join(tempfile.mkdtemp(prefix='ecg-cli-'), 'zygote.sock')
    process = subprocess.Popen([PYTHON, str(ROOT / 'tests' / 'cli_zygote.py'), address],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + ZYGOTE_START_S
    while not os.path.exists(address):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f'the CLI zygote did not start (exit {process.poll()})')
        time.sleep(0.05)
    ZYGOTE.update(process=process, address=address)
    atexit.register(stop_zygote)
    launcher = Path(address).with_name('python')
    launcher.write_text(LAUNCHER.format(python=PYTHON, client=ROOT / 'tests' / 'zygote_python.py'))
    launcher.chmod(0o755)
    # what this worker starts inherits both: runs of the zygote start their interpreters through it too
    os.environ.update(ECG_CLI_ZYGOTE=address, ECG_CLI_PYTHON=str(launcher))
    return address


def stop_zygote():
    process = ZYGOTE.pop('process', None)
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError, EOFError):
            with Client(ZYGOTE['address'], family='AF_UNIX') as connection:
                connection.send(None)
        process.wait(timeout=30)


def run_in_zygote(args, cwd, timeout):
    """`python ARGS` in cwd as a child of the zygote -> CompletedProcess (TimeoutExpired after timeout s)."""
    with tempfile.TemporaryDirectory(prefix='ecg-cli-run-') as folder:
        stdout, stderr = os.path.join(folder, 'stdout'), os.path.join(folder, 'stderr')
        address = zygote_address()                         # first: it puts the client in the environment
        request = dict(args=args, cwd=str(cwd), env=dict(os.environ), timeout=timeout)
        with open(os.devnull) as nothing, open(stdout, 'w') as out, open(stderr, 'w') as err, \
                Client(address, family='AF_UNIX') as connection:
            connection.send(request)
            for handle in (nothing, out, err):
                send_handle(connection, handle.fileno(), None)
            connection.recv()                              # the run's pid
            code = connection.recv()
        output = [Path(path).read_text(errors='replace') for path in (stdout, stderr)]
    if code is None:
        raise subprocess.TimeoutExpired([PYTHON, *args], timeout, *output)
    return subprocess.CompletedProcess([PYTHON, *args], code, *output)


def classic_pages(out, n, seed, *knobs, dpi=100, max_rotation=0):
    """ecg_simulator.py pages in the classic style (a red or pink grid, the quickest to draw and read) at
    one dpi, turned by up to max_rotation degrees; knobs: more simulator flags (--layouts, --gains, ...)."""
    run_cli('ecg_simulator.py', '--out', out, '--n', n, '--seed', seed, '--workers', 1, '--dpi_choices', dpi,
            '--style_probs', 1, 0, 0, 0, 0, '--max_rotation', max_rotation, *knobs)
    return out


def run_in_process(script, *args, check=False):
    """A script's main() run as its __main__ block runs it (ecg_cli.run_cli), in this process:
    the CLI's own code without the ~5 s interpreter and torch start, for cases that stop at the input (a
    script that forks workers after torch has started its threads can deadlock here: use run_cli). Each
    script has real run_cli runs too.
    Returns a CompletedProcess like run_cli's; check: raise unless it succeeded."""
    import ecg_cli
    module = importlib.import_module(script.removesuffix('.py'))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            ecg_cli.run_cli(lambda: module.main([str(a) for a in args]))
            code = 0
        except SystemExit as exc:       # what the interpreter does with it: a message goes to stderr, status 1
            code = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                print(exc.code, file=stderr)
    if check and code:
        raise AssertionError(f'{script} {args} failed ({code}):\n{stdout.getvalue()}\n{stderr.getvalue()[-3000:]}')
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())


def run_failing(real, *args):
    """A CLI run expected to fail: through a real interpreter (run_cli) when real, else run_in_process. One real
    run per script and test proves the __main__ wiring; the other cases test the messages."""
    return run_cli(*args, check=False) if real else run_in_process(*args)


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
def tiny_run(sim_data, tmp_path_factory):
    """The run folder of a 1-epoch run of the real trainer CLI at 64 x 320 on sim_data, at a non-default
    encoder and input size (what resume must take from the checkpoint). Weights barely trained: for checking
    files and shapes, not accuracy. Shared by the whole session: a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp('tiny_run')
    run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, '--image_size', '64', '320',
            '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0', '--epochs', '1',
            '--max_samples', '12', '--output_dir', out)
    return next(out.glob('run_*'))


@pytest.fixture(scope='session')
def tiny_checkpoint(tiny_run):
    """best.pth of tiny_run."""
    return tiny_run / 'checkpoints' / 'best.pth'


@pytest.fixture(scope='session')
def one_rhythm_checkpoint(tmp_path_factory):
    """A checkpoint as saved before the three rhythm strips (format 2, a 54-row head: 13 trace, 0 mV and presence
    channels each), cut from the starter's head: the shape the starter of 2026-11-30 was shipped in."""
    import torch
    import ecg_checkpoint
    import ecg_model
    checkpoint = torch.load(ecg_checkpoint.STARTER)
    first = sum(channels for name, channels in ecg_model.HEAD_CHANNELS.items() if name != 'trace')
    one_rhythm = ecg_model.N_LEADS + 1   # channels of each kind (trace, 0 mV, presence) before 3 rhythm strips
    rows = list(range(first)) + [first + ecg_model.N_TRACES * kind + channel
                                 for kind in range(3) for channel in range(one_rhythm)]
    for key in ecg_model.HEAD_KEYS:
        checkpoint['model'][key] = checkpoint['model'][key][rows].clone()
    checkpoint['format'] = 2
    checkpoint.pop('head_channels', None)
    path = tmp_path_factory.mktemp('one_rhythm') / 'one_rhythm.pth'
    torch.save(checkpoint, path)
    return path
