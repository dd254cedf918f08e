"""The one check of the text a user gives: a task description (device commands, the service, export
--merge-desc and the server's semantic encoder all use it) and search queries."""

from __future__ import annotations

from .errors import InputError

MAX_DESCRIPTION_CHARS = 1000  # longer text is cut before tokenizing (the encoders read far less anyway)


def check_description(text) -> tuple[str, list[str]]:
    """The one check of a task description: (text to use, warnings). InputError when unusable."""
    if not isinstance(text, str):
        raise InputError(f"--desc must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
        raise InputError(f"--desc is not valid UTF-8 text (byte {e.object[e.start:e.end]!r} at {e.start}); "
                         f"pass the description as UTF-8") from e
    if not text.strip():
        raise InputError('--desc is empty: describe the task in a few words, e.g. "a photo of a persian"')
    warnings = []
    if len(text) > MAX_DESCRIPTION_CHARS:
        warnings.append(f"--desc is {len(text)} characters; using the first {MAX_DESCRIPTION_CHARS}")
        text = text[:MAX_DESCRIPTION_CHARS]
    return text.strip(), warnings


def check_queries(queries: list[str]) -> list[str]:
    queries = list(queries)
    if not queries:
        raise InputError("no query: pass --query TEXT (or leave it out to search with the description)")
    for q in queries:
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"--query {q!r} is empty; pass the text to search for")
        check_description(q)  # the same UTF-8 check
    return queries
