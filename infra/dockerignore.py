"""Which files of a build context Docker sends: `.dockerignore` read and matched the way Docker (moby/patternmatcher)
does, so that the image's tag can hash exactly what the build sees (infra/image.py)."""

import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex, as moby/patternmatcher compiles it (`*`, `?`, `**`, `[...]`, `\\`)."""
    regex, index = "^", 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*" and pattern[index : index + 1] == "*":
            index += 1
            if pattern[index : index + 1] == "/":
                index += 1
            regex += ".*" if index == len(pattern) else "(.*/)?"
        elif char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "\\" and index < len(pattern):
            regex += re.escape(pattern[index])
            index += 1
        elif char in "[]":
            regex += char
        else:
            regex += re.escape(char)
    return re.compile(regex + "$")


def read_dockerignore(context: Path) -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, is_exception) in file order, read as Docker does: `#` comments, `!` exceptions, paths cleaned and
    relative to the context."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pattern = line.strip()
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.removeprefix("!").strip()).lstrip("/") or "."
        patterns.append((_dockerignore_regex(pattern), exception))
    return patterns


def is_ignored(relative_path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, decides."""
    parents = relative_path.split("/")[:-1]
    candidates = [relative_path] + ["/".join(parents[: depth + 1]) for depth in range(len(parents))]
    ignored = False
    for regex, exception in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def context_files(context: Path) -> Iterator[str]:
    """Paths (relative, '/'-separated, sorted) of the files Docker sends for this context; the Dockerfile always."""
    if not (context / "Dockerfile").is_file():
        raise FileNotFoundError(f"{context / 'Dockerfile'} does not exist: the image cannot be built")
    patterns = read_dockerignore(context)
    for root, folders, files in os.walk(context):
        folders.sort()
        for name in sorted(files):
            relative = Path(root, name).relative_to(context).as_posix()
            if relative == "Dockerfile" or not is_ignored(relative, patterns):
                yield relative
