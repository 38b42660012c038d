"""The suite's CLI zygote (cli_zygote.py) and its client (zygote_python.py) behave as `python ARGS` does: code from
-c or stdin, runs that start runs, exit statuses of killed runs, signals forwarded."""
import signal
import subprocess
import time

from conftest import ROOT, python_command


def python(*args, **options):
    return subprocess.run([python_command(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **options)


def test_code_from_stdin_and_from_c_runs_as_main_with_its_argv():
    done = python('-', 'a', 'b', input='import sys\nprint(__name__, sys.argv)\n')
    assert done.returncode == 0 and done.stdout == "__main__ ['-', 'a', 'b']\n", done.stderr
    done = python('-u', '-c', 'import sys; print(sys.argv); sys.exit(3)', 'x')
    assert done.returncode == 3 and done.stdout == "['-c', 'x']\n"


def test_a_run_may_start_runs_of_its_own():
    code = ("import subprocess, sys\n"
            "run = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True)\n"
            "print(run.stdout.strip())")
    done = python('-c', code)
    assert done.returncode == 0 and done.stdout == '42\n', done.stderr


def test_a_killed_run_ends_its_client_the_same_way():
    for number in (signal.SIGKILL, signal.SIGTERM):
        done = python('-c', f'import os; os.kill(os.getpid(), {int(number)})')
        assert done.returncode == -number and 'Traceback' not in done.stderr, done.stderr


def test_a_signal_to_the_client_reaches_the_run():
    code = ('import time\ntry:\n    time.sleep(60)\n'
            'except KeyboardInterrupt:\n    print("interrupted")\n    raise SystemExit(130)')
    process = subprocess.Popen([python_command(), '-c', code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 130 and stdout == 'interrupted\n'
