"""The ``m1`` command line run in the test's own process."""

from m1_jax import cli


def run_cli(argv, capsys):
    """``m1 ARGV`` -> (exit code, stdout, stderr) as captured by pytest's ``capsys``."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err
