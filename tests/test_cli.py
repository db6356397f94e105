"""The CLI: every command has help, flows work end to end, errors are one line."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
from pathlib import Path

import html5lib
import pytest
import typer
from typer.testing import CliRunner

from newsletter.cli import app

from .conftest import SAMPLE_CSV, SAMPLE_MD, SECRET, run_cli
from .smtpd import SmtpTestServer

runner = CliRunner()


def _commands(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in getattr(group, "commands", {}).items():
        path = (*prefix, name)
        found.append(path)
        found += _commands(cmd, path)
    return found


def test_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    commands = _commands(root)
    assert {("send",), ("demo",), ("lists", "create"), ("subscribers", "import"),
            ("issue", "build")} <= set(commands)
    for path in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Usage" in result.output
        cmd = root
        for part in path:
            cmd = cmd.commands[part]  # type: ignore[attr-defined]
        assert cmd.help, f"{' '.join(path)} has no help text"


@pytest.fixture
def env(tmp_path: Path, smtpd: SmtpTestServer, monkeypatch: pytest.MonkeyPatch) -> SmtpTestServer:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("NEWSLETTER_SMTP_URL", smtpd.url)
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    return smtpd


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def test_list_subscriber_issue_and_send_flow(env: SmtpTestServer, tmp_path: Path) -> None:
    assert "created list digest" in _ok("lists", "create", "digest", "--name", "Digest readers")
    out = _ok("subscribers", "import", str(SAMPLE_CSV), "--list", "digest")
    n = len(SAMPLE_CSV.read_text(encoding="utf-8").splitlines()) - 1
    assert f"imported {n}, updated 0, skipped 0" in out
    assert "added New@example.org to digest" in _ok(
        "subscribers", "add", "New@Example.org", "--list", "digest", "--name", "New Reader")
    assert "digest" in _ok("lists", "ls") and str(n + 1) in _ok("lists", "ls")
    rows = [json.loads(line) for line in
            _ok("subscribers", "ls", "--list", "digest", "--format", "json").splitlines()]
    assert len(rows) == n + 1 and rows[-1]["email"] == "New@example.org"
    csv_out = _ok("subscribers", "ls", "--list", "digest", "--format", "csv")
    assert csv_out.splitlines()[0] == "email,name,status,created_at,attributes"
    assert "unsubscribed new@example.org" in _ok("subscribers", "unsubscribe", "new@example.org")
    out = _ok("issue", "build", str(SAMPLE_MD), "--out", str(tmp_path / "build"))
    assert (tmp_path / "build" / "issue.html").is_file()
    eml = email.message_from_bytes((tmp_path / "build" / "issue.eml").read_bytes(),
                                   policy=email.policy.default)
    assert eml.get_content_type() == "multipart/alternative"
    out = _ok("send", str(SAMPLE_MD), "--list", "digest", "--yes")
    assert f"sent {n}, failed temporary 0 / permanent 0" in out
    assert len(env.messages) == n
    assert "new@example.org" not in env.recorder.count_by_rcpt()
    again = runner.invoke(app, ["send", str(SAMPLE_MD), "--list", "digest", "--yes"])
    assert again.exit_code == 1  # in-process, the error comes out as the exception main() prints
    assert "already sent" in str(again.exception) and "--again" in str(again.exception)
    assert f"sent {n}" in _ok("send", str(SAMPLE_MD), "--list", "digest", "--yes", "--again")


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return run_cli(*args, cwd=cwd, env=env)


@pytest.mark.parametrize(("args", "words"), [
    (["send", "missing.md", "--list", "x", "--yes"], "missing.md: no such file"),
    (["subscribers", "add", "not-an-address", "--list", "x"], "invalid address"),
    (["subscribers", "import", "missing.csv", "--list", "x"], "no list 'x'"),
    (["lists", "create", "Bad Slug"], "invalid list slug"),
])
def test_errors_are_one_line_and_non_zero(tmp_path: Path, args: list[str], words: str) -> None:
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_send_without_yes_and_without_a_terminal_refuses(tmp_path: Path) -> None:
    issue = tmp_path / "i.md"
    issue.write_text(SAMPLE_MD.read_text(encoding="utf-8"), encoding="utf-8")
    assert _run("lists", "create", "x", cwd=tmp_path).returncode == 0
    proc = _run("send", str(issue), "--list", "x", cwd=tmp_path)
    assert proc.returncode == 1 and "add --yes" in proc.stderr


def test_demo_runs_twice_in_a_fresh_directory(tmp_path: Path) -> None:
    for _ in range(2):
        proc = _run("demo", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    n = len(SAMPLE_CSV.read_text(encoding="utf-8").splitlines()) - 1
    assert "capture mode" in out and "no mail leaves this machine" in out
    assert f"sent {n}, failed temporary 0 / permanent 0" in out
    outbox = tmp_path / "var" / "demo" / "outbox" / "new"
    assert len(list(outbox.iterdir())) == n  # the second run started from a fresh workspace
    assert (tmp_path / "var" / "demo" / "build" / "issue.html").is_file()
    assert str(outbox) in out


def test_lists_create_flags_and_show_with_embeddable_form(env: SmtpTestServer) -> None:
    _ok("lists", "create", "briefs", "--name", "Policy Briefs", "--single-opt-in",
        "--language", "zh", "--welcome")
    _ok("lists", "create", "board", "--private")
    shown = _ok("lists", "show", "briefs")
    assert "opt-in: single" in shown and "public" in shown and "language zh" in shown
    assert "https://news.example.org/subscribe/briefs" in shown
    form = shown[shown.index("<form"):shown.index("</form>") + 7]
    html5lib.parse(form)  # well-formed enough to paste
    assert 'action="https://news.example.org/subscribe/briefs"' in form
    assert 'name="email"' in form and 'name="website"' in form  # the honeypot comes along
    private = _ok("lists", "show", "board")
    assert "private list" in private and "<form" not in private
    bad = runner.invoke(app, ["lists", "create", "x", "--language", "fr"])
    assert bad.exit_code != 0 and "language" in str(bad.exception)
