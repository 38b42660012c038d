"""`python ARGS` run by this pytest worker's CLI zygote (cli_zygote.py): the interpreter that train.sh, the
benchmarks' own commands and torchrun's workers start in the tests. Its stdin, stdout and stderr are the run's,
the signals it gets are forwarded to the run, and it exits as the run did. Only the standard library: it starts
in milliseconds (conftest's launcher runs it with `python -S`).

    ECG_CLI_ZYGOTE=SOCKET python -S tests/zygote_python.py ARGS
"""
import os
import signal
import sys
from multiprocessing.connection import Client
from multiprocessing.reduction import send_handle

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main():
    request = dict(args=sys.argv[1:], cwd=os.getcwd(), env=dict(os.environ), timeout=None)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)    # held until the run's pid is known, then forwarded
    with Client(os.environ['ECG_CLI_ZYGOTE'], family='AF_UNIX') as connection:
        connection.send(request)
        for fd in (0, 1, 2):
            send_handle(connection, fd, None)
        run = connection.recv()
        for number in FORWARDED:
            signal.signal(number, lambda received, frame: os.kill(run, received))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        code = connection.recv()
    if code is None or code < 0:                           # killed: end the same way
        number = signal.SIGKILL if code is None else -code
        if number != signal.SIGKILL:                       # SIGKILL's action cannot be set, and is the default
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    sys.exit(code)


if __name__ == '__main__':
    main()
