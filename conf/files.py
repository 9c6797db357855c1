"""Files named by keys. Writing safely, for every layer: a file appears whole or not at all (written to a
temporary file in the same folder, then renamed), with the permissions the umask gives (shared results folders on
clusters), and a write that fails (a full disk, a read-only folder) is one clear error that leaves no temporary
file behind. Reading a methods' class-text file ({class name: [texts]}), checked.

Temporary files are named ``.<name>.<host>.<pid>.tmp``, so that a later run removes the orphans of interrupted
writes (``remove_orphans``) without touching those of a process still writing on another host or this one."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

from conf.errors import ConfigError, UserError

TEMP_SUFFIX = ".tmp"


class WriteError(UserError):
    """A result or data file cannot be written where it was asked to go."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` then rename onto ``path``; mode 0666 minus the umask."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the temporary files that interrupted writes of this host left in ``folder``; returns them."""
    removed = []
    host = socket.gethostname()
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}") if Path(folder).is_dir() else []:
        parts = tmp.name[:-len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) == 3 and parts[1] == host and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def check_writable_folder(folder: Path, key: str) -> None:
    """``folder`` exists and is writable, or can be created: its nearest existing ancestor is a writable folder.
    Else a WriteError naming ``key`` and the path (checked before a run starts)."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise WriteError(f"{key} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{key} {folder}: {probe} is not writable")


def read_class_texts(path: str, class_names, key: str, expected: str, noun: str, nonempty: bool = False) -> dict:
    """The JSON file ``key`` names, {class name: [texts]} (CuPL's descriptions for DPE, the GPT-4 descriptors for
    TPS), checked to hold a list of strings for every class, spelt as the data set spells it with "_" read as a
    space (non-empty when ``nonempty``). ``expected``: what the file should be, for the refusals; ``noun``: what
    its texts are."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "a folder, not a file" if path and file.is_dir() else "no such file"
        raise ConfigError(f"{key} = '{path}': {what} ({expected})")
    try:
        texts = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key} = '{path}': not a JSON file ({error})") from None
    if not isinstance(texts, dict):
        raise ConfigError(f"{key} = '{path}': expected a JSON object {{class name: [{noun}]}}")
    for name in class_names:
        entry = texts.get(name.replace("_", " "))
        if not isinstance(entry, list) or (nonempty and not entry) or not all(isinstance(d, str) for d in entry):
            raise ConfigError(f"{key} = '{path}' has no {'non-empty ' if nonempty else ''}list of {noun} for class "
                              f"'{name.replace('_', ' ')}'")
    return texts
