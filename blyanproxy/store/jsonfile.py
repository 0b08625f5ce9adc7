"""The ``StateStore`` kept in one JSON file, and the one kept in memory only.

Writes are atomic (temporary file, fsync, rename, fsync of the directory); the
file is always present, and the previous good version is kept as
``<file>.bak``. The temporary files are made as ``mkstemp`` makes them: in
the file's directory, under a random hidden name, created exclusively
(``O_CREAT|O_EXCL|O_NOFOLLOW``, so a planted symlink is never followed) and
with mode 0600 whatever the umask; the file and its backup are therefore 0600
too. Temporary files a killed save left behind are removed at the next load.
The document's form, its checks and the merge rule are ``core.fleetstate``'s;
what is loaded (the file or its backup, ours or Blyan's) is checked with the
admin input rules, never trusted.

- **A damaged file** (not readable, not JSON, not an object with a list of
  nodes, or not one usable node record among those it lists) is never
  overwritten: loading raises ``StateError`` naming the file and the problem,
  unless a readable backup exists, which is used (and said so) after the
  damaged file is moved aside (``<file>.damaged-<time>``).
- **A bad record in a good file** (a node breaking a rule, such as a name
  with a line break; a base URL listed twice; an unknown policy; an entry of
  ``removed`` that is no URL) is skipped with an error line naming it, and
  the rest is loaded. The file is then kept as it is on disk — not rewritten
  at start-up or at exit — until the next change of the fleet is saved, so
  the record can still be read and mended; that save (which makes the old
  file the backup) leaves it out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed

from blyanproxy.core import FleetState, StateError, StoreUnavailable, state_from_json, state_to_json
from blyanproxy.logs import logger

log = logger("state")


class MemoryStore:
    """A ``StateStore`` that keeps nothing: changes live as long as the process (demo, tests)."""

    def load(self) -> FleetState | None:
        """Nothing is saved."""
        return None

    def commit(self, state: FleetState) -> Deferred:
        """Take ``state`` at once."""
        return succeed(state)

    def watch(self, on_change: Callable[[FleetState], None]) -> None:
        """No other process shares this fleet."""

    def flush(self, state: FleetState) -> None:
        """Nothing to write."""


class JsonFileStore:
    """The ``StateStore`` kept in one JSON file (see the module docstring).

    It writes at once and never conflicts: it serves one process.
    """

    def __init__(self, path: str, clock) -> None:
        self.path = path
        self.backup = path + ".bak"
        self._clock = clock
        self._primary_good = False  # True once the file at ``path`` is known to be a good save
        self._keep_as_loaded = False  # True while the file loaded had records skipped and nothing was saved

    def load(self) -> FleetState | None:
        """The saved state, ``None`` on a first start, or ``StateError``.

        A damaged file with a readable backup is moved aside (``<file>.damaged-<time>``)
        and the backup is used; without a backup it is left alone and loading fails.
        """
        self._primary_good = False
        self._keep_as_loaded = False
        self._remove_leftovers()
        if not os.path.exists(self.path):
            if os.path.exists(self.backup):
                log.warn("state file {path} is missing; using its backup", path=self.path)
                return self._read(self.backup)
            return None
        try:
            state = self._read(self.path)
        except StateError as problem:
            if not os.path.exists(self.backup):
                raise
            backup = self._read(self.backup)
            aside = f"{self.path}.damaged-{int(self._clock.seconds())}"
            os.replace(self.path, aside)
            log.error("{problem}; moved it to {aside} and using the backup {backup}",
                      problem=str(problem), aside=aside, backup=self.backup)
            return backup
        self._primary_good = True
        return state

    def _read(self, path: str) -> FleetState:
        skipped: list[str] = []
        try:
            with open(path, "rb") as source:
                document = json.loads(source.read().decode("utf-8"))
            state = state_from_json(document, skipped.append)
        except OSError as exc:
            raise StateError(f"state file {path} cannot be read: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"state file {path} is not valid JSON: {exc}") from None
        except ValueError as exc:
            raise StateError(f"state file {path} cannot be used: {exc}") from None
        for note in skipped:
            log.error("state file {path}: {note}; not loaded", path=path, note=note)
        if skipped:
            self._keep_as_loaded = True
            log.error("state file {path} is kept as it is until the fleet next changes: mend or remove the "
                      "skipped record(s) meanwhile", path=path)
        return state

    def commit(self, state: FleetState) -> Deferred:
        """Save ``state``; fails with ``StoreUnavailable`` when the file cannot be written."""
        try:
            self.save(state)
        except OSError as exc:
            log.error("could not save the fleet to {path}: {why}", path=self.path, why=exc.strerror)
            return fail(StoreUnavailable(f"the state file could not be written ({exc.strerror})"))
        return succeed(state)

    def watch(self, on_change: Callable[[FleetState], None]) -> None:
        """No other process writes this file."""

    def flush(self, state: FleetState) -> None:
        """Save ``state`` (``OSError`` if the directory refuses), unless the file loaded had records
        skipped and no change was saved since: it is then kept as it is (see the module docstring)."""
        if not self._keep_as_loaded:
            self.save(state)

    def save(self, state: FleetState) -> None:
        """Write ``state`` atomically; ``OSError`` if the directory refuses (nothing half-written).

        The file is always present: the previous version is linked (or copied) to
        the backup first, and only when it is known to be good, then the new one
        replaces it in one rename.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        payload = json.dumps(state_to_json(state, self._clock.seconds()), indent=2).encode("utf-8")
        descriptor, temporary = _private_file(self.path)
        try:
            with os.fdopen(descriptor, "wb") as target:
                target.write(payload)
                target.flush()
                os.fsync(target.fileno())
            if self._primary_good and os.path.exists(self.path):
                self._keep_as_backup()
            os.replace(temporary, self.path)
        finally:
            if os.path.lexists(temporary):
                os.unlink(temporary)
        self._primary_good = True
        self._keep_as_loaded = False
        _fsync_directory(directory)

    def _keep_as_backup(self) -> None:
        """Link (or copy) the file to the backup, through a private temporary name, and make it 0600."""
        staged = _temporary_name(self.backup)
        try:
            os.link(self.path, staged)  # never follows or replaces what is at ``staged``
        except OSError:  # no hard links here: copy instead
            descriptor, staged = _private_file(self.backup)
            with open(self.path, "rb") as source, os.fdopen(descriptor, "wb") as target:
                shutil.copyfileobj(source, target)
        try:
            os.chmod(staged, 0o600)  # a file saved by an older version may have taken the umask
            os.replace(staged, self.backup)
        finally:
            if os.path.lexists(staged):
                os.unlink(staged)

    def _remove_leftovers(self) -> None:
        """Remove temporary files of saves that never ended (the process was killed)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        prefixes = tuple(_temporary_prefix(path) for path in (self.path, self.backup))
        for name in names:
            if name.startswith(prefixes):
                os.unlink(os.path.join(directory, name))


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def _temporary_name(path: str) -> str:
    """A random hidden name beside ``path`` for one of its temporary files."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), _temporary_prefix(path) + secrets.token_hex(8))


def _private_file(path: str) -> tuple[int, str]:
    """A new temporary file beside ``path``: ``(descriptor, name)``, made as ``tempfile.mkstemp`` makes
    one (a random name, ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600)."""
    return tempfile.mkstemp(prefix=_temporary_prefix(path), dir=os.path.dirname(os.path.abspath(path)))


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
