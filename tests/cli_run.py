"""`planlang ARGS` in-process, as the CLI tests of both suites call it."""
from __future__ import annotations

from planlang import cli


def run(capsys, *args) -> tuple[int, str, str]:
    """`planlang ARGS` in-process: (exit status, stdout, stderr). argparse's own exits (usage
    errors) count as the status they carry, as they would for the real command. Never a
    traceback."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err
