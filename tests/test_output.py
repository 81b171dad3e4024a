"""What leaves the program for people: one printable line per error, in messages, the CLI's
output and its bug reports (the plugin's side is in test_spank.py and the Slurm tests)."""
import pytest

from spank_sif import cli
from spank_sif.errors import ImageError, printable


@pytest.mark.parametrize("text, shown", [
    ("plain /path/app.sif", "plain /path/app.sif"),
    ("new\nline", "new\\x0aline"),
    ("carriage\rreturn\ttab", "carriage\\x0dreturn\\x09tab"),
    ("\x1b[31mred\x1b]0;title\x07", "\\x1b[31mred\\x1b]0;title\\x07"),
    ("right-to-left \u202eexe.txt", "right-to-left \\u202eexe.txt"),
    ("non\u00a0breaking, line\u2028separator", "non\\xa0breaking, line\\u2028separator"),
    ("undecodable \udcff byte", "undecodable \\xff byte"),
    ("ünïcödé letters stay", "ünïcödé letters stay"),
])
def test_printable(text, shown):
    assert printable(text) == shown
    assert printable(shown) == shown  # idempotent: a message may pass two exits


def test_an_error_message_is_one_printable_line_whatever_it_quotes():
    err = ImageError("image /tmp/a\nb\x1b[2J.sif does not exist\n")
    assert str(err) == "image /tmp/a\\x0ab\\x1b[2J.sif does not exist"


def test_cli_output_cannot_drive_the_terminal(monkeypatch, capsys):
    """Whatever a command prints, raw: its lines come out printable (the guard behind each
    command's own escaping)."""
    import spank_sif.cli.node as node
    monkeypatch.setattr(node, "cmd_list", lambda args: print("\x1b]0;owned\x07 listed\nsecond line") or 0)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out == "\\x1b]0;owned\\x07 listed\nsecond line\n"


def test_a_bug_in_a_command_is_one_line_and_its_traceback_on_request(monkeypatch, capsys):
    import spank_sif.cli.node as node

    def broken(args):
        raise ZeroDivisionError("a bug\nwith a second line")
    monkeypatch.setattr(node, "cmd_list", broken)
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("spank-sif: internal error (ZeroDivisionError: a bug\\x0awith a second line)")
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["list"])


def test_a_usage_error_cannot_drive_the_terminal(capsys):
    """argparse quotes the argument it refuses: escaped by the parser's own error line and by the
    stream guard behind it (each one alone suffices)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["list", "\x1b]0;owned\x07\nsecond line"])
    assert stop.value.code == 64
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;owned\\x07\\x0asecond line" in err, err
