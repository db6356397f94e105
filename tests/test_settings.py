"""Settings from env, .env and TOML; bad values stop with one line naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from newsletter.errors import ConfigError
from newsletter.settings import SmtpRelay, load_settings

from .conftest import run_cli


def test_defaults(tmp_path: Path) -> None:
    s = load_settings()
    assert s.relay_configs() == []  # capture mode
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'var' / 'newsletter.db'}"
    assert s.sender_email == "digest@example.org"
    assert s.send_concurrency == 8 and s.send_rate == 0


def test_env_prefix_dotenv_and_toml_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "newsletter.toml").write_text(
        'from = "Desk <desk@example.net>"\nsend_rate = 5\nsend_concurrency = 3\n'
        'postal_address = "1 Toml St"\n')
    (tmp_path / ".env").write_text("NEWSLETTER_SEND_RATE=7\nNEWSLETTER_POSTAL_ADDRESS=2 Env St\n")
    monkeypatch.setenv("NEWSLETTER_SEND_RATE", "9")
    s = load_settings()
    assert s.sender_email == "desk@example.net"  # from TOML
    assert s.send_concurrency == 3
    assert s.postal_address == "2 Env St"  # .env beats TOML
    assert s.send_rate == 9  # the environment beats .env
    monkeypatch.setenv("NEWSLETTER_FROM", "Other <other@example.com>")
    assert load_settings().sender_email == "other@example.com"


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text('base_url = "https://news.example.org/"\n')
    monkeypatch.setenv("NEWSLETTER_CONFIG", str(cfg))
    assert load_settings().base_url == "https://news.example.org"
    monkeypatch.setenv("NEWSLETTER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="NEWSLETTER_CONFIG: no such file"):
        load_settings()


@pytest.mark.parametrize(("env", "value", "words"), [
    ("NEWSLETTER_SEND_RATE", "-1", "NEWSLETTER_SEND_RATE: Input should be greater than or equal"),
    ("NEWSLETTER_SEND_CONCURRENCY", "many", "NEWSLETTER_SEND_CONCURRENCY: Input should be a valid"),
    ("NEWSLETTER_BASE_URL", "news.example.org", "NEWSLETTER_BASE_URL: must be an absolute"),
    ("NEWSLETTER_FROM", "Digest", "NEWSLETTER_FROM: no valid address"),
    ("NEWSLETTER_FROM", "Digest <d@example.org>\r\nBcc: x@y.z", "NEWSLETTER_FROM:"),
    ("NEWSLETTER_SMTP_URL", "http://relay.example.org", "NEWSLETTER_SMTP_URL: scheme must be"),
    ("NEWSLETTER_SMTP_URL", "smtp://u:hunter2@relay:587?tls=1",
     "NEWSLETTER_SMTP_URL: unknown option"),
    ("NEWSLETTER_COLOUR", "blue", "NEWSLETTER_COLOUR"),
])
def test_bad_setting_names_key(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                               words: str) -> None:
    monkeypatch.setenv(env, value)
    if env == "NEWSLETTER_COLOUR":
        # Unknown environment variables are ignored (other tools share the prefix rarely);
        # unknown keys in the TOML file are errors.
        load_settings()
        Path("config").mkdir()
        Path("config/newsletter.toml").write_text('colour = "blue"\n')
        words = "NEWSLETTER_CONFIG: config/newsletter.toml: unknown key 'colour'"
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_bad_setting_exits_with_one_line_from_the_cli(tmp_path: Path) -> None:
    env = {"NEWSLETTER_SEND_RATE": "fast", "PATH": "/usr/bin:/bin"}
    proc = run_cli("lists", "ls", env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: setting NEWSLETTER_SEND_RATE:")


def test_smtp_url_forms() -> None:
    r = SmtpRelay.from_url("smtp://user%40x:p%3Ass@relay.example.org:2525?starttls=true")
    assert (r.host, r.port, r.username, r.start_tls, r.use_tls) == \
        ("relay.example.org", 2525, "user@x", True, False)
    assert r.password is not None and r.password.get_secret_value() == "p:ss"
    assert "p:ss" not in r.describe() and "p:ss" not in repr(r)
    r = SmtpRelay.from_url("smtps://relay.example.org")
    assert (r.port, r.use_tls, r.start_tls) == (465, True, False)
    assert SmtpRelay.from_url("smtp://h?verify=false").validate_certs is False
    assert SmtpRelay.from_url("smtp://h").port == 587
    # A remote relay must offer STARTTLS unless the URL opts out; loopback may be plain.
    assert SmtpRelay.from_url("smtp://relay.example.org").start_tls is True
    assert SmtpRelay.from_url("smtp://relay.example.org?starttls=false").start_tls is False
    assert SmtpRelay.from_url("smtp://127.0.0.1:2525").start_tls is None


def test_secret_key_generated_once_with_warning(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(var_dir=tmp_path / "v")
    with caplog.at_level(logging.WARNING):
        first = s.signing_keys()
    assert "NEWSLETTER_SECRET_KEY is not set" in caplog.text
    assert first[0].decode() not in caplog.text  # the secret itself is never logged
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_settings(var_dir=tmp_path / "v").signing_keys() == first
    assert caplog.text == ""
    assert (tmp_path / "v" / "secret_key").stat().st_mode & 0o077 == 0
    rotated = load_settings(secret_key="new", old_secret_keys=["old1", "old2"])
    assert rotated.signing_keys() == [b"new", b"old1", b"old2"]


def test_more_bad_inputs_give_one_line_not_a_traceback(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    Path("config").mkdir()
    Path("config/newsletter.toml").write_text("send_rate = = 3\n")
    with pytest.raises(ConfigError, match=r"NEWSLETTER_CONFIG: .*invalid TOML"):
        load_settings()
    Path("config/newsletter.toml").unlink()
    monkeypatch.setenv("NEWSLETTER_OLD_SECRET_KEYS", "abc")
    with pytest.raises(ConfigError, match="NEWSLETTER_OLD_SECRET_KEYS: must be a JSON list"):
        load_settings()
    monkeypatch.setenv("NEWSLETTER_OLD_SECRET_KEYS", '["abc"]')
    assert load_settings(secret_key="k").signing_keys() == [b"k", b"abc"]
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", "")
    assert load_settings().secret_key is None  # empty means unset: a key is generated
    monkeypatch.setenv("NEWSLETTER_FROM", "Desk <desk@exämple.org>")
    s = load_settings()
    assert s.sender_email == "desk@xn--exmple-cua.org" and s.sender_domain.isascii()
    monkeypatch.setenv("NEWSLETTER_FROM", "Desk <dësk@example.org>")
    with pytest.raises(ConfigError, match=r"NEWSLETTER_FROM: .*non-ASCII local part"):
        load_settings()
    monkeypatch.setenv("NEWSLETTER_LIST_ID_DOMAIN", "lists.exämple.org")
    monkeypatch.delenv("NEWSLETTER_FROM")
    assert load_settings().list_domain == "lists.xn--exmple-cua.org"


def test_unrelated_variables_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM", "Someone Else <else@example.com>")
    monkeypatch.setenv("FROM_ADDRESS", "else@example.com")
    Path(".env").write_text("OTHER_TOOL=1\nNEWSLETTER_FROM=Desk <desk@example.org>\n")
    assert load_settings().sender_email == "desk@example.org"


def test_every_setting_is_documented_in_the_example_config() -> None:
    from newsletter.settings import Settings

    from .conftest import ROOT

    text = (ROOT / "config" / "newsletter.example.toml").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields
               if f"# {'from' if name == 'from_address' else name} =" not in text]
    assert not missing, f"not in config/newsletter.example.toml: {missing}"
