"""User-facing errors: one sentence naming what is wrong and what to do; the CLI exits with code 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem the user can fix (bad name, bad value, missing file). Never shown with a traceback."""


def unknown_name(kind: str, name: str, valid: list[str]) -> UserError:
    """`Unknown method 'infllmm'. Did you mean 'infllm'? Available: full, infllm, ...`."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"Unknown {kind} '{name}'.{hint} Available: {', '.join(sorted(valid))}.")
