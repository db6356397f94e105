"""Settings: every key, its default and its validation, read from env, .env and a TOML file.

Sources, strongest first: keyword arguments (tests), environment variables prefixed
NEWSLETTER_, a `.env` file in the working directory, then the TOML file (NEWSLETTER_CONFIG,
else config/newsletter.toml if it exists). config/newsletter.example.toml documents each key.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tomllib
from email.utils import formataddr, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .headers import check_header_text

log = logging.getLogger(__name__)

ENV_PREFIX = "NEWSLETTER_"
DEFAULT_CONFIG_FILE = Path("config/newsletter.toml")


class SmtpRelay(BaseModel):
    """Where to hand mail over, parsed from SMTP_URL."""

    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    use_tls: bool = False  # implicit TLS (smtps://, port 465)
    start_tls: bool | None = None  # True: require STARTTLS; None: use it if offered
    validate_certs: bool = True

    @classmethod
    def from_url(cls, url: str) -> SmtpRelay:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(f"scheme must be smtp:// or smtps://, not {parts.scheme or 'none'}://")
        if not parts.hostname:
            raise ValueError("no host in the URL")
        query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
        known = {"starttls", "verify"}
        if unknown := set(query) - known:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown option(s) {names}; known: starttls, verify")
        truthy = {"1", "true", "yes", "on"}
        use_tls = parts.scheme == "smtps"
        # Secure by default: a remote relay must offer STARTTLS unless the URL says otherwise;
        # only a relay on this machine may be used in the clear without asking.
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        start_tls: bool | None = None if local else True
        if "starttls" in query:
            start_tls = query["starttls"] in truthy
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if use_tls else 587),
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
            use_tls=use_tls,
            start_tls=False if use_tls else start_tls,
            validate_certs=query.get("verify", "true") in truthy,
        )

    def describe(self) -> str:
        """Where mail goes, for messages: never includes the password."""
        user = f"{self.username}@" if self.username else ""
        if self.use_tls:
            tls = "TLS"
        elif self.start_tls is None:
            tls = "STARTTLS if offered"
        else:
            tls = "STARTTLS required" if self.start_tls else "no TLS"
        return f"smtp://{user}{self.host}:{self.port} ({tls})"


class RelayConfig(BaseModel):
    """One relay of `relays`: where, how many connections, how fast, for which senders."""

    model_config = {"extra": "forbid"}

    url: SecretStr
    name: str = ""
    concurrency: int = Field(default=8, ge=1, le=256)
    rate: float = Field(default=0.0, ge=0)       # messages per second, 0: no limit
    per_hour: int = Field(default=0, ge=0)       # messages per sliding hour, 0: no limit
    per_day: int = Field(default=0, ge=0)        # messages per sliding day, 0: no limit
    from_domains: list[str] = Field(default_factory=list)  # empty: any sender

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        SmtpRelay.from_url(value.get_secret_value())
        return value

    @property
    def smtp(self) -> SmtpRelay:
        return SmtpRelay.from_url(self.url.get_secret_value())

    @property
    def label(self) -> str:
        """A name for messages, logs and the usage table; never the password."""
        if self.name:
            return self.name
        r = self.smtp
        return f"{r.host}:{r.port}"


class Settings(BaseSettings):
    """All settings. Build with `load_settings()`, which turns errors into one line."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        # Other tools' variables in the environment or .env are not ours to refuse; unknown
        # keys in our own TOML file are refused by _TomlSource.
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    database_url: str = Field(
        default="", description="SQLAlchemy URL; empty means sqlite under var_dir"
    )
    smtp_url: SecretStr | None = Field(
        default=None, description="smtp://user:pass@host:587?starttls=true; unset = capture"
    )
    # `from` in TOML (renamed by _TomlSource), NEWSLETTER_FROM in the environment; a single
    # alias, so that a stray unprefixed FROM variable can never set the sender.
    from_address: str = Field(
        default="Digest <digest@example.org>", validation_alias=AliasChoices("NEWSLETTER_FROM"),
    )
    # Sender of confirmation mail (transactional, kept apart from the issues' stream);
    # empty: the same as `from`.
    transactional_from: str = ""
    base_url: str = "http://localhost:8000"
    secret_key: SecretStr | None = None
    old_secret_keys: list[SecretStr] = Field(default_factory=list)
    send_concurrency: int = Field(default=8, ge=1, le=256)
    send_rate: float = Field(default=0.0, ge=0)
    smtp_timeout: float = Field(default=60.0, gt=0)
    postal_address: str = ""
    # Branding of the email templates (docs/templates.md); the defaults are the stock look.
    brand_name: str = ""  # empty: the display name of `from`, else the issue title
    brand_logo_url: str = ""
    brand_logo_width: int = Field(default=160, ge=16, le=536)
    brand_color: str = "#1f5f99"
    brand_accent_color: str = "#1f5f99"
    brand_footer_text: str = ""
    templates_dir: Path | None = None
    var_dir: Path = Path("var")
    list_id_domain: str = ""
    batch_size: int = Field(default=500, ge=1, le=100_000)
    # Shared delivery (docs/deployment.md): sends are handed to `newsletter worker` processes.
    delivery_workers: bool = False
    worker_lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    worker_batch_size: int = Field(default=200, ge=1, le=100_000)
    worker_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    # Several relays, each with its own limits; when empty, smtp_url with the send_* values.
    relays: list[RelayConfig] = Field(default_factory=list)
    send_per_hour: int = Field(default=0, ge=0)
    send_per_day: int = Field(default=0, ge=0)
    relay_failure_limit: int = Field(default=0, ge=0)   # 0: max(5, 2 x concurrency)
    relay_cooldown_seconds: float = Field(default=60.0, ge=0)
    retry_base_seconds: float = Field(default=60.0, ge=0)
    retry_max_interval_seconds: float = Field(default=3600.0, ge=0)
    retry_max_age_hours: float = Field(default=72.0, gt=0)
    retry_wait_seconds: float = Field(default=300.0, ge=0)
    bounce_threshold: int = Field(default=1, ge=1)
    verp: bool = True
    bounce_address: str = ""
    bounce_host: str = "127.0.0.1"
    bounce_port: int = Field(default=2525, ge=0, le=65535)
    schedule_grace_seconds: float = Field(default=3600.0, ge=1)
    scheduler_in_serve: bool = True
    digests_dir: Path = Path("config/digests")
    digest_skip_empty: bool = True
    dkim_key_file: Path | None = None
    dkim_selector: str = ""
    dkim_domain: str = ""
    # The web side (newsletter serve).
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8000, ge=0, le=65535)
    confirm_valid_hours: float = Field(default=72.0, gt=0)
    confirm_min_interval_minutes: float = Field(default=60.0, ge=0)
    subscribe_limit_per_ip: int = Field(default=20, ge=1)
    subscribe_limit_per_address: int = Field(default=5, ge=1)
    subscribe_limit_window_minutes: float = Field(default=60.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = os.environ.get(ENV_PREFIX + "CONFIG")
        path = Path(config) if config else DEFAULT_CONFIG_FILE
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if config and not path.is_file():
            raise ConfigError(ENV_PREFIX + "CONFIG", f"no such file: {path}")
        if path.is_file():
            sources.append(_TomlSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("from_address", "transactional_from")
    @classmethod
    def _check_from(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "transactional_from" and not value.strip():
            return ""
        from email_validator import EmailNotValidError, validate_email

        check_header_text(value, "")
        name, addr = parseaddr(value)
        if "@" not in addr:
            raise ValueError(f"no valid address in {value!r}; expected 'Name <user@domain>'")
        try:
            valid = validate_email(addr, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ValueError(f"{addr}: {exc}") from None
        if valid.ascii_email is None:
            raise ValueError(f"{addr}: a non-ASCII local part cannot be a sender address")
        # An internationalised domain is kept in its ASCII (punycode) form for the headers.
        return formataddr((name, valid.ascii_email)) if name else valid.ascii_email

    @field_validator("list_id_domain")
    @classmethod
    def _check_list_domain(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if not value:
            return ""
        check_header_text(value, "")
        try:
            ascii_domain = value.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a domain name: {value!r}") from None
        if "." not in ascii_domain or " " in ascii_domain:
            raise ValueError(f"not a domain name: {value!r}")
        return ascii_domain

    @field_validator("secret_key")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty value (NEWSLETTER_SECRET_KEY= in .env) means unset, not an empty key.
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL")
        check_header_text(value, "")
        return value.rstrip("/")

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            SmtpRelay.from_url(value.get_secret_value())
            return value
        return None

    @field_validator("bounce_address")
    @classmethod
    def _check_bounce_address(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        check_header_text(value, "")
        local, at, domain = value.partition("@")
        if not at or not local or "." not in domain or not value.isascii() or "+" in local:
            raise ValueError("must be a plain ASCII address such as bounce@example.org "
                             "(without '+': VERP adds '+TOKEN')")
        return value.lower()

    @field_validator("brand_color", "brand_accent_color")
    @classmethod
    def _check_color(cls, value: str) -> str:
        # Colours are written into the CSS, where HTML escaping does not protect: only
        # #rrggbb gets there.
        value = value.strip()
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
            raise ValueError("must be a colour written #rrggbb, e.g. #1f5f99")
        return value.lower()

    @field_validator("brand_logo_url")
    @classmethod
    def _check_logo_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.netloc or re.search(r"[\s\"'<>]", value):
            raise ValueError("must be an https:// URL (mail clients block http images)")
        return value

    @field_validator("brand_name", "brand_footer_text")
    @classmethod
    def _check_brand_text(cls, value: str) -> str:
        value = " ".join(value.split())
        check_header_text(value, "")  # one line, no control characters
        return value

    @field_validator("postal_address")
    @classmethod
    def _check_postal(cls, value: str) -> str:
        check_header_text(value.replace("\n", " "), "")
        return value

    # Derived values: computed, never stored, so they cannot disagree with their source.

    @property
    def sender_name(self) -> str:
        return parseaddr(self.from_address)[0]

    @property
    def sender_email(self) -> str:
        return parseaddr(self.from_address)[1]

    def relay_configs(self) -> list[RelayConfig]:
        """The relays to send through: `relays`, else one from smtp_url; [] = capture."""
        if self.relays:
            return list(self.relays)
        if self.smtp_url is None:
            return []
        return [RelayConfig(url=self.smtp_url, concurrency=self.send_concurrency,
                            rate=self.send_rate, per_hour=self.send_per_hour,
                            per_day=self.send_per_day)]

    @property
    def bounce_mailbox(self) -> str:
        """The address bounces go to; VERP turns 'bounce@d' into 'bounce+TOKEN@d'."""
        return self.bounce_address or f"bounce@{self.sender_domain}"

    @property
    def transactional_sender(self) -> tuple[str, str]:
        """(name, address) for confirmation mail."""
        name, addr = parseaddr(self.transactional_from or self.from_address)
        return name, addr

    @property
    def sender_domain(self) -> str:
        return self.sender_email.rpartition("@")[2].lower()

    @property
    def transactional_domain(self) -> str:
        return self.transactional_sender[1].rpartition("@")[2].lower()

    @property
    def list_domain(self) -> str:
        return self.list_id_domain or self.sender_domain

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'newsletter.db').resolve()}"

    @property
    def outbox_dir(self) -> Path:
        return self.var_dir / "outbox"

    def signing_keys(self) -> list[bytes]:
        """The current key first, then old ones still accepted; generates one if unset."""
        if self.secret_key is not None:
            current = self.secret_key.get_secret_value().encode()
        else:
            current = _stored_secret(self.var_dir)
        return [current] + [k.get_secret_value().encode() for k in self.old_secret_keys]


class _TomlSource(TomlConfigSettingsSource):
    """The TOML file, with `from` read as the sender and unknown keys refused."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(ENV_PREFIX + "CONFIG", f"{file_path}: invalid TOML: {exc}") from None
        if "from" in data:
            data["NEWSLETTER_FROM"] = data.pop("from")
        known = set(Settings.model_fields) - {"from_address"}
        for key in data:
            if key not in known and key != "NEWSLETTER_FROM":
                raise ConfigError(ENV_PREFIX + "CONFIG",
                                  f"{file_path}: unknown key {key!r}")
        return data


def _stored_secret(var_dir: Path) -> bytes:
    """Read the generated key under var/, creating it once with a warning."""
    path = var_dir / "secret_key"
    if path.is_file():
        return path.read_bytes().strip()
    var_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32).encode()
    # O_EXCL: two processes starting at once must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    log.warning(
        "NEWSLETTER_SECRET_KEY is not set: generated one and stored it in %s. "
        "Keep that file (unsubscribe links depend on it) or set the key explicitly.",
        path,
    )
    return key


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning the first validation error into a ConfigError naming the key."""
    unknown = set(overrides) - set(Settings.model_fields)
    if unknown:
        raise ConfigError(", ".join(sorted(unknown)), "not a setting")
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        # Raised for values that must be JSON (lists) and are not; name the variable.
        text = str(exc)
        name = text.split('"')[1] if text.count('"') >= 2 else "?"
        raise ConfigError(ENV_PREFIX + name.upper(),
                          "must be a JSON list, e.g. '[\"old-key-1\", \"old-key-2\"]'") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        key = loc[0] if loc else "?"
        if key.upper().startswith(ENV_PREFIX):
            key = key[len(ENV_PREFIX):]
        field = Settings.model_fields.get(key.lower())
        if key.lower() in ("from", "from_address"):
            key, field = "from", Settings.model_fields["from_address"]
        name = ENV_PREFIX + key.upper()
        msg = err["msg"].removeprefix("Value error, ")
        detail = f"{msg} (got {err['input']!r})" if field is not None and _show_input(key) else msg
        if len(loc) > 1:
            name += "[" + "][".join(loc[1:]) + "]"
        raise ConfigError(name, detail) from None


def _show_input(key: str) -> bool:
    # Never echo secrets back in an error message.
    return key.lower() not in ("smtp_url", "secret_key", "old_secret_keys", "database_url",
                           "relays")
