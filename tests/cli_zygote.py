"""A started interpreter that runs the project's CLIs in forked children (a zygote, as Android starts its apps).

Each run is a process of its own, as `python ARGS` is: its argv, working folder, stdin/stdout/stderr, exit status
and signals; a script, `-m MODULE`, `-c CODE` or `-` (the code on stdin) run as __main__. It starts without the
6-8 s a fresh interpreter spends importing torch, timm, torchvision, scipy and albumentations, which the suite's
~100 runs would otherwise pay one by one. The zygote only imports (it runs no torch operation, so no OpenMP pool
exists to be broken by the fork). Runs go side by side: each request is served by a forked handler that forks
the run and waits for it, so a run may start runs of its own.

Two clients, one per pytest worker's zygote (conftest starts and stops it), each passing the run's stdin, stdout
and stderr over the socket:
    conftest.run_cli            output to files, a timeout
    zygote_python.py ARGS       `python ARGS` for what starts an interpreter itself (train.sh, the benchmarks'
                                commands, torchrun's workers): its own stdin/stdout/stderr passed over, signals
                                forwarded; the runs see it as sys.executable

    python tests/cli_zygote.py SOCKET     # listens on the Unix socket SOCKET
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
from multiprocessing.reduction import recv_handle

PRELOAD = ('torch', 'torchvision', 'timm', 'segmentation_models_pytorch', 'scipy.signal', 'scipy.interpolate',
           'pandas', 'cv2', 'albumentations', 'matplotlib', 'PIL.Image', 'tqdm')
POLL_S = 0.05
PR_SET_PDEATHSIG = 1       # prctl(2): the signal this process gets when its parent dies


def preload():
    """Import what every CLI imports, nothing of the project (its modules are imported fresh by each run)."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)


def redirect(fds):
    """stdin, stdout and stderr of the run: the three fds its client passed over the socket."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:                        # the copies on 0, 1, 2 are the run's
        os.close(fd)


def run_args(args):
    """Run `python ARGS` as __main__, with sys.argv and sys.path[0] as the interpreter sets them. Of the interpreter's
    own options, -u makes stdout and stderr write through; -B and -E are dropped (the zygote started already)."""
    while args[0] in ('-u', '-B', '-E'):
        if args[0] == '-u':
            sys.stdout.reconfigure(write_through=True)
            sys.stderr.reconfigure(write_through=True)
        args = args[1:]
    if args[0] in ('-c', '-'):
        code = args[1] if args[0] == '-c' else sys.stdin.read()
        sys.argv, sys.path[0] = ['-c', *args[2:]] if args[0] == '-c' else ['-', *args[1:]], ''
        exec(compile(code, '<string>' if args[0] == '-c' else '<stdin>', 'exec'), {'__name__': '__main__'})
    elif args[0] == '-m':
        sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
        runpy.run_module(args[1], run_name='__main__', alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv, sys.path[0] = [script, *args[1:]], os.path.dirname(script)
        runpy.run_path(script, run_name='__main__')


def run_child(request, fds):
    """In the forked child: become `python ARGS` in cwd with the request's environment and files, exit with its
    status (never returns). Its own interpreter starts go through the zygote too (sys.executable: the client)."""
    code = 1
    try:
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        redirect(fds)
        sys.executable = request['env'].get('ECG_CLI_PYTHON', sys.executable)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run_args(request['args'])
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


def wait(pid, timeout, connection):
    """The run's exit status as subprocess reports it (negative: killed by that signal), or None after timeout
    seconds or when the client went away (the run is killed then)."""
    deadline = time.monotonic() + (timeout or float('inf'))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline or connection.poll(POLL_S):      # the client sends nothing: only its end
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None


def handle(connection, request):
    """In a forked handler: fork the run, tell the client its pid, wait, send its status; never returns. A run
    whose handler fails (its client gone before it heard the pid, say) is killed, not left unwatched."""
    code, pid = 1, None
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fds = [recv_handle(connection) for _ in range(3)]
        pid = os.fork()
        if pid == 0:
            connection.close()
            run_child(request, fds)
        for fd in fds:
            os.close(fd)
        connection.send(pid)
        status = wait(pid, request.get('timeout'), connection)
        pid = None                                         # reaped
        connection.send(status)
        code = 0
    except (OSError, EOFError):
        pass
    finally:
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os._exit(code)


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
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)          # the handlers are reaped by the kernel
    with Listener(address, family='AF_UNIX') as listener:
        while True:
            with listener.accept() as connection:
                request = connection.recv()
                if request is None:                        # conftest's goodbye
                    return
                sys.stdout.flush()
                sys.stderr.flush()
                if os.fork() == 0:
                    handle(connection, request)


if __name__ == '__main__':
    serve(sys.argv[1])
