"""What every CLI test needs: run a command in-process, and check the one-line error contract."""

from click.testing import CliRunner

from mmprof.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_exit_2(result, needle: str) -> None:
    """Bad input: exit code 2, exactly one line starting with 'error:' that names the problem."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], result.output
    assert "Traceback" not in result.output


def assert_rejected_before_writing(tmp_path, command_args, needle: str) -> None:
    """The command refuses its input in one line, and no run folder is created."""
    out = tmp_path / "never"
    assert_one_line_exit_2(invoke(*command_args, "--out", str(out)), needle)
    assert not out.exists()
