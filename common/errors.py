"""fedlocale's one error base type: every error we raise for a user to act on is a ``FedlocaleError``.

Each carries the exit code the CLI returns for it, so the CLI catches one type at its edge, prints the message
(never a traceback) and exits with that code; nothing converts one of our errors into another on the way.
"""

from __future__ import annotations

EXIT_FAILED = 1  # the work could not be done (a launch, a build, a broken ledger)
EXIT_BAD_INPUT = 2  # the input is unusable (config, data, model folder, key)
EXIT_INTERNAL = 70  # a bug in fedlocale (BSD sysexits' EX_SOFTWARE): no error of ours describes what happened


class FedlocaleError(Exception):
    """An error a user can act on; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED


class InputError(FedlocaleError):
    """Unusable input (a file, a setting, a folder): the message names it."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(InputError):
    """A configuration holds one or more problems; ``problems`` lists them all, each naming its field."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        # a problem of an option (--set, --regions) names the option itself: the file is not to blame for it
        from_options = sum(p.startswith("--") for p in problems)
        if source and from_options:
            where = " in the command line's options" if from_options == len(problems) else f"{where} and the options"
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{body}")


def check(problems: list[tuple[str, str]]) -> None:
    """Raise one ConfigError listing every ``(field, problem)`` pair, if there are any (``__post_init__`` helper)."""
    if problems:
        raise ConfigError([f"{name}: {msg}" for name, msg in problems])
