"""The Jinja environment: autoescape on, undefined variables fail, user templates first."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import jinja2

from ..errors import RenderError


def builtin_templates_dir() -> Path:
    """Our templates: the repository's templates/ folder, packaged as newsletter._templates."""
    return Path(str(files("newsletter._templates")))


def _autoescape(name: str | None) -> bool:
    # Escape everything except plain-text templates; an unknown name is escaped (safe default).
    return not (name or "").endswith((".txt", ".txt.j2"))


def make_environment(templates_dir: Path | None = None, *,
                     auto_reload: bool = True) -> jinja2.Environment:
    """A user's templates_dir overrides ours file by file; the rest falls back to ours.

    auto_reload=False skips a stat() of the template file per render: for servers, where
    a template change is deployed with a restart.
    """
    search = [str(builtin_templates_dir())]
    if templates_dir is not None:
        if not templates_dir.is_dir():
            raise RenderError(f"templates_dir {templates_dir} is not a directory")
        search.insert(0, str(templates_dir))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        autoescape=_autoescape,  # noqa: S701 - on for everything but *.txt templates
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=auto_reload,
    )


def render_template(env: jinja2.Environment, name: str, **context: object) -> str:
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template not found: {exc.name}") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"template {name}: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"template {exc.filename or name}:{exc.lineno}: {exc.message}") from None
