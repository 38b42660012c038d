"""A started interpreter that runs the project's CLIs in forked children (a zygote, as Android starts its apps).

Each run is a process of its own, as `python script.py ARGS` is: its argv, working folder, stdout and stderr,
exit status and signals, the script run as __main__. It starts without the 6-8 s a fresh interpreter spends
importing torch, timm, torchvision, scipy and albumentations, which the suite's ~80 CLI runs would otherwise pay
one by one. The zygote only imports (it runs no torch operation, so no OpenMP pool exists to be broken by the
fork), and serves one run at a time for one pytest worker (conftest.run_cli).

    python tests/cli_zygote.py SOCKET     # listens on the Unix socket SOCKET; conftest starts and stops it
"""
import atexit
import contextlib
import ctypes
import os
import runpy
import signal
import sys
import time
import traceback
from multiprocessing.connection import Listener

PRELOAD = ('torch', 'torchvision', 'timm', 'segmentation_models_pytorch', 'scipy.signal', 'scipy.interpolate',
           'pandas', 'cv2', 'albumentations', 'matplotlib', 'PIL.Image', 'tqdm')
POLL_S = 0.05
PR_SET_PDEATHSIG = 1       # prctl(2): the signal this process gets when its parent dies


def preload():
    """Import what every CLI imports, nothing of the project (its modules are imported fresh by each run)."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)


def run_child(request):
    """In the forked child: become `python script ARGS` in cwd with the request's output files, run the script
    as __main__, exit with its status (never returns)."""
    code = 1
    try:
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY),
                               (2, request['stderr'], os.O_WRONLY)):
            os.dup2(os.open(path, mode), fd)
        script = os.path.abspath(request['args'][0])
        sys.argv = [script, *request['args'][1:]]
        sys.path[0] = os.path.dirname(script)           # as the interpreter puts a script's folder first
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runpy.run_path(script, run_name='__main__')
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:                                  # what the interpreter prints for an uncaught one
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait(pid, timeout):
    """The child's exit status as subprocess reports it (negative: killed by that signal), or None after
    timeout seconds (the child is killed then)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(POLL_S)


def die_with_parent():
    """Ask Linux to end the zygote when the pytest worker that started it dies, even by kill -9 (no atexit runs
    there): an orphaned zygote would wait on its socket for ever. Forked children do not inherit this."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:                             # it died before the request took hold
        sys.exit(0)


def serve(address):
    die_with_parent()
    preload()
    with Listener(address, family='AF_UNIX') as listener:
        while True:
            with listener.accept() as connection:
                request = connection.recv()
                if request is None:                        # conftest's goodbye
                    return
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    run_child(request)
                connection.send(wait(pid, request['timeout']))


if __name__ == '__main__':
    serve(sys.argv[1])
