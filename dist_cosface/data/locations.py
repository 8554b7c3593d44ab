"""Open a dataset location for reading without a shell: local paths, ``pipe:`` commands, URLs.

A ``pipe:`` command is split like a shell would split words (``shlex``) and run directly, so
nothing in it (nor in a shard name joined into it) is ever interpreted by a shell. Shell syntax
that would only work through a shell is refused with an error instead of being passed on as
literal arguments: put a pipeline in a script and call the script.
"""

from __future__ import annotations

import shlex
import subprocess

# characters that only mean something to a shell (operators, expansions, redirections)
SHELL_SYNTAX = set(";|&<>$`\\\n\r")


def pipe_argv(url: str) -> list[str]:
    """The argv of a ``pipe:`` location, or ValueError naming it."""
    command = url[len("pipe:") :]
    bad = sorted(SHELL_SYNTAX & set(command))
    if bad:
        raise ValueError(
            f"{url!r}: pipe: commands run without a shell; shell syntax {''.join(bad)!r} is "
            "not allowed (put the pipeline in a script and call that)"
        )
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"{url!r}: cannot split the pipe: command ({exc})") from exc
    if not argv:
        raise ValueError(f"{url!r}: empty pipe: command")
    return argv


class PipeStream:
    """Read-only binary stream of a command's stdout; a failed command raises on close."""

    def __init__(self, argv: list[str], where: str):
        self.where = where
        try:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise OSError(f"{where}: cannot start {argv[0]!r}: {exc}") from exc
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        data = self._proc.stdout.read(size)
        if not data and size != 0:
            self._eof = True
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._proc.stdout.closed:
            return
        self._proc.stdout.close()
        if not self._eof:  # stopped reading early: the command need not finish
            self._proc.terminate()
        code = self._proc.wait()
        if self._eof and code != 0:
            raise OSError(f"{self.where}: command exited with status {code}")

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(url: str):
    """A binary read stream for a local path, ``pipe:`` command or URL."""
    if url.startswith("pipe:"):
        return PipeStream(pipe_argv(url), url)
    if url.startswith(("http://", "https://")):
        return PipeStream(["curl", "--fail", "--silent", "--location", url], url)
    if "://" in url:  # other schemes: webdataset's handlers (names in them were validated)
        import webdataset as wds

        return wds.gopen(url)
    return open(url, "rb")  # noqa: SIM115 - the caller closes it
