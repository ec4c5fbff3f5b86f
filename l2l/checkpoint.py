"""Use and resume checkpoints: atomic writes, safe loading (no arbitrary unpickling), clear errors.

A *use* checkpoint holds what it takes to apply a learned optimizer: the rule's class and
constructor config, its weights, and metadata (task, steps, validation score, versions).
A *resume* checkpoint also holds the meta-training state (meta-optimizer, epoch, RNG,
best weights so far) so that training continues exactly where it stopped.
Both are ``torch.save`` files of plain containers and tensors, loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple

import torch
from torch import nn

from l2l.config import home_path
from l2l.optimizers import LEARNED_RULES
from l2l.version import __version__

USE_FORMAT = "l2l-use"
RESUME_FORMAT = "l2l-resume"
FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, of the wrong kind or mismatched with the run."""


class UseCheckpoint(NamedTuple):
    """A learned optimizer loaded from a use checkpoint, with its metadata."""

    rule: nn.Module
    metadata: dict[str, Any]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Calls ``write`` on a temporary file beside ``path``, syncs it to disk, then renames it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file: the
    data are on disk before the rename publishes them, and the temporary is in the same
    directory, so the rename is atomic; the directory is synced after it, so that the new file
    is still there after a power cut. A failed write removes the temporary. A leading ``~``
    is the home directory.
    """
    path = home_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared.
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def _sync_directory(directory: Path) -> None:
    """Syncs ``directory``'s entries, so that a rename into it survives a power cut (POSIX only)."""
    if os.name != "posix":  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``payload`` with ``torch.save`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _read(path: Path, expected_format: str) -> dict[str, Any]:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file in it (for example {path / 'resume.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        handle = path.open("rb")
    except OSError as error:  # intact but unreadable (permissions): never to be called corrupt and deleted
        raise CheckpointError(
            f"checkpoint {path} cannot be opened: {error.strerror or error}; make it readable (chmod a+r {path}) "
            "or copy it somewhere you can read"
        ) from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise CheckpointError(
                f"checkpoint {path} is empty (0 bytes): its write was cut short (a full disk, an interrupted copy); "
                "copy it again, or use another checkpoint"
            )
        payload = _load(path, handle)
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"checkpoint {path} is not an l2l checkpoint (no 'format' entry)")
    found = payload["format"]
    if found != expected_format:
        hint = (" (--resume takes a resume checkpoint, OUT/resume.pt; --init-from, --optimizer and load_optimizer "
                "take a use checkpoint, OUT/optimizer.pt)")
        raise CheckpointError(f"checkpoint {path} is a {found!r} checkpoint, expected {expected_format!r}{hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')!r}; this l2l reads version {FORMAT_VERSION}"
        )
    return payload


def _check_records(path: Path, handle: BinaryIO) -> None:
    """Raises a CheckpointError if a record of the zip archive torch.save wrote fails its CRC-32.

    torch.load does not check them: a bit flipped in a tensor's bytes (a failing disk, a damaged
    copy) would load as a silently different weight. Records saved without a CRC (torch's
    ``set_crc32_options(False)`` writes 0) are not checked; a file that is no zip is left to torch.load.
    """
    try:
        with zipfile.ZipFile(handle) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                with archive.open(record) as member:
                    while member.read(1 << 20):  # the CRC is compared when the record's end is read
                        pass
    except zipfile.BadZipFile as error:
        if "CRC" in str(error):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: a record fails its CRC check ({error}), so its bytes changed after it was "
                "written (a failing disk or a damaged copy); copy it again, or use another checkpoint"
            ) from None
        # Not a zip archive, or a damaged one: torch.load names what it is.
    except (EOFError, OSError, ValueError, RuntimeError):
        pass  # a truncated or malformed archive: torch.load's error says so
    finally:
        handle.seek(0)


def _load(path: Path, handle: BinaryIO) -> Any:
    """``torch.load`` of plain data only; a damaged or unsafe file is a CheckpointError."""
    _check_records(path, handle)
    try:
        with warnings.catch_warnings():  # torch warns of a foreign pickle's protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged or unsafe files.
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is corrupt, truncated, or not an l2l checkpoint "
            f"({type(error).__name__}: {_reason(error)})"
        ) from None


def _require_keys(path: Path, payload: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def rule_spec(rule: nn.Module) -> dict[str, Any]:
    """Class name and constructor config of a learned rule: what rebuilds it."""
    name = type(rule).__name__
    if name not in LEARNED_RULES:
        raise CheckpointError(f"cannot checkpoint a {name}: known learned rules are {', '.join(LEARNED_RULES)}")
    return {"class": name, "config": rule.config()}


def build_rule(spec: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None, *, source: str = "checkpoint") -> nn.Module:
    """Rebuilds a learned rule from :func:`rule_spec` output and optionally loads weights into it.

    Raises:
        CheckpointError: the spec names no known rule or has no valid config, or the weights are
            not a mapping of tensors, do not fit the config, or hold NaN or infinite values.
    """
    if not isinstance(spec, dict) or spec.get("class") not in LEARNED_RULES:
        raise CheckpointError(
            f"{source} names an unknown learned optimizer {spec.get('class') if isinstance(spec, dict) else spec!r}; "
            f"this l2l knows {', '.join(LEARNED_RULES)}"
        )
    if not isinstance(spec.get("config"), dict):
        raise CheckpointError(f"{source} is corrupt: its optimizer entry has no config mapping (found {spec.get('config')!r})")
    try:
        rule = LEARNED_RULES[spec["class"]].from_config(spec["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{source} has an invalid optimizer config {spec['config']!r}: {error}") from None
    if state_dict is not None:
        problem = weights_problem(state_dict)
        if problem:
            raise CheckpointError(f"{source} is corrupt: {problem}; retrain or re-export it")
        try:
            rule.load_state_dict(state_dict)
        except RuntimeError as error:
            raise CheckpointError(
                f"{source}'s weights do not match its optimizer config {spec['config']!r}: {_state_dict_problems(error)}"
            ) from None
    return rule


def _state_dict_problems(error: RuntimeError) -> str:
    """What ``load_state_dict`` found wrong: its first line only names the module, the next ones the keys."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[1:]) or (lines[0] if lines else "no details")


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``tensors`` whose floating-point tensor holds a NaN or an infinity (meta tensors hold no values)."""
    return [
        key for key, value in tensors.items()
        if value.is_floating_point() and not value.is_meta and not bool(torch.isfinite(value).all())
    ]


def weights_problem(state_dict: Any) -> str | None:
    """What is wrong with a rule's saved weights (not a mapping of dense real floating-point tensors, NaN or infinite values), or None."""
    # A NaN weight would turn every parameter the rule touches into NaN with no gradient ever
    # being non-finite, so it is refused on loading, where the cause is still nameable.
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        return "its weights are not a mapping of names to tensors"
    # load_state_dict would cast integer, boolean or complex weights into the rule without a word.
    kinds = {key: str(value.layout) if value.layout != torch.strided else str(value.dtype)
             for key, value in state_dict.items() if value.layout != torch.strided or not value.is_floating_point()}
    if kinds:
        return f"weights {', '.join(kinds)} are {', '.join(sorted(set(kinds.values())))}, not dense real floating-point tensors"
    bad = non_finite_keys(state_dict)
    return f"weights {', '.join(bad)} hold NaN or infinite values" if bad else None


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint."""
    return {"l2l": __version__, "torch": str(torch.__version__)}


def save_use_checkpoint(path: str | os.PathLike, rule: nn.Module, metadata: dict[str, Any]) -> Path:
    """Writes a use checkpoint of ``rule`` (weights copied to CPU) with ``metadata``.

    Args:
        path: destination file (written atomically).
        rule: a learned rule (``CoordinateWiseLSTM``).
        metadata: JSON-like facts about its training: task, steps, validation score, ...
    """
    payload = {
        "format": USE_FORMAT,
        "format_version": FORMAT_VERSION,
        "rule": rule_spec(rule),
        "state_dict": {key: value.detach().cpu().clone() for key, value in rule.state_dict().items()},
        "metadata": {**metadata, "versions": versions(), "saved_at": _now()},
    }
    return atomic_save(payload, path)


def load_use_checkpoint(name_or_path: str | os.PathLike, *, device: torch.device | str | None = None) -> UseCheckpoint:
    """Loads a learned optimizer from a path or a shipped checkpoint name (see :func:`shipped_checkpoints`)."""
    path = resolve_checkpoint(name_or_path)
    payload = _read(path, USE_FORMAT)
    _require_keys(path, payload, ("rule", "state_dict", "metadata"))
    if not isinstance(payload["metadata"], dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is a {type(payload['metadata']).__name__}, not a mapping")
    rule = build_rule(payload["rule"], payload["state_dict"], source=f"checkpoint {path}")
    if device is not None:
        rule = rule.to(device)
    return UseCheckpoint(rule, payload["metadata"])


def load_optimizer(name_or_path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module:
    """The learned update rule stored in a use checkpoint (path or shipped name)."""
    return load_use_checkpoint(name_or_path, device=device).rule


RESUME_KEYS = ("train_config", "rule", "state_dict", "best_state_dict", "meta_optimizer", "epoch", "rng", "progress")


def save_resume_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes a resume checkpoint; ``payload`` must hold every key of ``RESUME_KEYS``."""
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise ValueError(f"resume payload lacks {', '.join(missing)}")
    return atomic_save(
        {"format": RESUME_FORMAT, "format_version": FORMAT_VERSION, **payload, "versions": versions(), "saved_at": _now()},
        path,
    )


def load_resume_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a resume checkpoint written by :func:`save_resume_checkpoint` (a leading ``~``: the home directory)."""
    path = home_path(path)
    payload = _read(path, RESUME_FORMAT)
    _require_keys(path, payload, RESUME_KEYS)
    kinds = {"train_config": dict, "rule": dict, "state_dict": dict, "best_state_dict": dict, "meta_optimizer": dict,
             "rng": dict, "progress": dict}
    wrong = [f"{key} is a {type(payload[key]).__name__}, not a {kind.__name__}"
             for key, kind in kinds.items() if not isinstance(payload[key], kind)]
    epoch = payload["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        wrong.append(f"epoch is {epoch!r}, not a non-negative integer")
    if isinstance(payload["progress"], dict) and not isinstance(payload["progress"].get("history"), list):
        wrong.append("progress.history is not a list")
    if wrong:
        raise CheckpointError(f"resume checkpoint {path} is damaged: {'; '.join(wrong)}")
    return payload


def shipped_checkpoints() -> dict[str, Path]:
    """Checkpoints shipped with l2l (``checkpoints/*.pt``), by name."""
    found: dict[str, Path] = {}
    for directory in _shipped_directories():
        for file in sorted(directory.glob(f"*{CHECKPOINT_SUFFIX}")):
            found.setdefault(file.stem, file)
    return found


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint file from a path (a leading ``~``: the home directory), or from the name of a shipped checkpoint (``"quadratic"``)."""
    path = home_path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_checkpoints()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the use checkpoint in it (for example {path / 'optimizer.pt'})")
    raise CheckpointError(
        f"no checkpoint file {str(name_or_path)!r}, and no shipped checkpoint of that name "
        f"(shipped: {', '.join(shipped) or 'none'})"
    )


def _shipped_directories() -> list[Path]:
    directories = []
    try:  # Installed: checkpoints/ is the data package l2l.checkpoints.
        directories.append(Path(str(resources.files("l2l.checkpoints"))))
    except (ModuleNotFoundError, TypeError):
        pass
    # Imported from a source checkout: checkpoints/ sits beside the package directory.
    directories.append(Path(__file__).resolve().parent.parent / "checkpoints")
    return [directory for directory in directories if directory.is_dir()]


# torch's own advice in its load errors: to load without weights_only or to allowlist a class,
# that is, to run what the file says. Never repeated to a user whose checkpoint was refused.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|trust|allowlist|file an issue|documentation of torch\.load", re.I)


def _reason(error: Exception) -> str:
    """The informative part of a torch.load error, without torch's advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return (
            f"refused to unpickle an object that is not plain data: it holds a {unsafe.group(1)}, which l2l "
            "never writes, and unpickling it could run arbitrary code"
        )
    for line in text.splitlines():
        line = re.sub(r"^\(\d\)\s*", "", line.strip()).removeprefix("WeightsUnpickler error:").strip()
        if line and not _UNSAFE_ADVICE.search(line) and not line.startswith("Weights only load failed"):
            return line
    return "not a file torch.save wrote with plain data only"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
