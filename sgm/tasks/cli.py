"""Checks of run.py's and train.py's command line, made before Hydra parses it.

Where Hydra would stop with a lexer trace (an override whose unquoted value holds an emoji,
an accent or a parenthesis; a value the shell split at its spaces) or with ``Could not load
'hydra/launcher/joblib'`` (a launcher plugin that is not installed), :func:`check_command_line`
stops first with what to type instead. It only speaks where Hydra would fail: every
override is tried with Hydra's own parser, and one that parses is left alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

#: ``hydra/launcher`` options (conf/hydra/launcher and the plugins' own names) -> (modules, package)
LAUNCHERS: dict[str, tuple[tuple[str, ...], str]] = {
    name: (("hydra_plugins.hydra_joblib_launcher", "joblib"), "hydra-joblib-launcher")
    for name in ("parallel", "joblib")
} | {
    name: (("hydra_plugins.hydra_submitit_launcher", "submitit"), "hydra-submitit-launcher")
    for name in ("slurm", "submitit_slurm", "submitit_local")
}
OPTUNA = (("hydra_plugins.hydra_optuna_sweeper", "optuna"), "hydra-optuna-sweeper")
#: (group, option; None: any) -> the plugin it needs: the Optuna sweeper, and every search of conf/hparams_search
SWEEPERS: dict[tuple[str, str | None], tuple[tuple[str, ...], str]] = {
    ("hydra/sweeper", "optuna"): OPTUNA, ("hparams_search", None): OPTUNA}
SWEEPS_EXTRA = 'pip install -e ".[sweeps]"'


class CommandLineError(SystemExit):
    """A command line Hydra would refuse; the message says what to type instead (exit status 1)."""


def command_line_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides among ``argv`` as Hydra's argument parser sees them (flags and their values left out)."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:  # another Hydra layout: every argument that is no flag
        return [a for a in argv if not a.startswith("-")]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args, rest = get_args_parser().parse_known_args(list(argv))
        except SystemExit:  # a bad flag: Hydra says so itself
            return []
    return [*args.overrides, *(a for a in rest if not a.startswith("-"))]


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parse_error(parser: Any, arg: str) -> str | None:
    """The first line of Hydra's error for ``arg``, or None when it parses."""
    from hydra.errors import OverrideParseException

    try:
        parser.parse_overrides([arg])
    except OverrideParseException as exc:
        return str(exc).strip().splitlines()[0]
    return None


def quoted_override(key: str, value: str) -> str | None:
    """``key="value"`` (or ``key='value'``) quoted for Hydra and then for the shell, checked with
    Hydra's parser to give back ``value`` exactly; None when no quoting does."""
    parser = _parser()
    for q in ('"', "'"):
        inner = re.sub(rf"(\\*)({q}|$)", lambda m: m[1] * 2 + ("\\" + q if m[2] else ""), value)
        candidate = f"{key}={q}{inner}{q}"
        try:
            if parser.parse_overrides([candidate])[0].value() == value:
                return shlex.quote(candidate)
        except Exception:  # noqa: BLE001 - any failure: try the other quote
            continue
    return None


def override_problems(overrides: Sequence[str]) -> list[str]:
    """What Hydra would refuse among ``overrides``, each with the quoting that works."""
    parser, problems, i, last = _parser(), [], 0, None
    while i < len(overrides):
        arg = overrides[i]
        error = _parse_error(parser, arg)
        if error is None:
            last = arg if "=" in arg else last
            i += 1
            continue
        if "=" not in arg and last is not None:  # the shell split a value at its spaces
            j = i
            while j < len(overrides) and "=" not in overrides[j] and _parse_error(parser, overrides[j]):
                j += 1
            words, (key, _, value) = overrides[i:j], last.partition("=")
            hint = quoted_override(key, " ".join([value, *words]))
            what = "is not an override" if len(words) == 1 else "are not overrides"
            problems.append(f"{', '.join(map(repr, words))} {what}: the shell split the value of {key} at its "
                            "spaces. Quote the whole override" + (f": {hint}" if hint else ""))
            i = j
            continue
        key, _, value = arg.partition("=")
        message = f"Hydra cannot parse the override {arg!r} ({error})."
        hint = quoted_override(key, value) if value[:1] not in ("'", '"') else None
        if hint:
            odd = " ".join(sorted({c for c in value if ord(c) > 127}))
            message += (" Unquoted, a value may hold only ASCII letters, digits, spaces and a few symbols"
                        + (f" (this one holds {odd})" if odd else "")
                        + f". Quote it for Hydra, inside the shell's quotes: {hint}")
        elif value[:1] in ("'", '"'):
            message += (" A quoted value must end with the quote it starts with; a quote inside it is written "
                        "\\\" (or \\').")
        problems.append(message + " (README.md: prompts on the command line)")
        i += 1
    return problems


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def launcher_problems(overrides: Sequence[str]) -> list[str]:
    """A ``hydra/launcher=`` option (or an Optuna search: ``hparams_search=``, ``hydra/sweeper=optuna``)
    whose plugin is not installed, with the command that installs it."""
    problems = []
    for arg in overrides:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in LAUNCHERS:
            modules, package = LAUNCHERS[value]
        elif value and ((key, value) in SWEEPERS or (key, None) in SWEEPERS):
            modules, package = SWEEPERS.get((key, value)) or SWEEPERS[(key, None)]
        else:
            continue
        missing = [m for m in modules if not _installed(m)]
        if missing:
            problems.append(f"{key}={value} needs the {package} package ({', '.join(missing)} is not "
                            f"installed): {SWEEPS_EXTRA} installs it")
    return problems


def check_command_line(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Raise :class:`CommandLineError` (exit status 1, the problems on stderr) for a command line
    Hydra would refuse with a lexer trace or a missing launcher plugin; return otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0] or "run.py")
    overrides = command_line_overrides(argv)
    problems = override_problems(overrides) + launcher_problems(overrides)
    if problems:
        raise CommandLineError("\n".join(f"{prog}: {p}" for p in problems))
