"""How the toolkit's scripts talk to a person: a mistake in what they gave (a path, a file, a flag) ends in one
line naming it, Ctrl-C in exit status 130, and progress bars write sparingly into log files.

Every script ends with `ecg_cli.run_cli(main)`.
"""
import os
import sys

PROGRESS_SECONDS = 0.1 if sys.stderr.isatty() else 30.0   # a log file (CI, | tee, nohup) gets a bar line every 30 s


class InputError(Exception):
    """A problem with what the user gave (a path, a file, a flag): the message names it and says what is
    wrong; the scripts print it as one line, without a traceback (ECG_TRACEBACK=1 shows it)."""


class SampleError(InputError, ValueError):
    """A sample that cannot be used; the message names the file and the problem."""


def run_cli(main):
    """Run a script's main(): a problem with the user's input ends in one line and exit status 1, Ctrl-C in
    exit status 130, without a traceback (ECG_TRACEBACK=1 shows it, for bug reports). Bugs keep theirs."""
    try:
        return main()
    except InputError as exc:
        if os.environ.get('ECG_TRACEBACK'):
            raise
        sys.exit(f'error: {exc}')
    except KeyboardInterrupt:
        if os.environ.get('ECG_TRACEBACK'):
            raise
        print('interrupted', file=sys.stderr)
        sys.exit(130)
