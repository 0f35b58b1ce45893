"""Dataset files: presence, download (where allowed) and the error that says how to get them."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DatasetNotFoundError
from .registry import DatasetInfo

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Files: presence, download, the error message
# --------------------------------------------------------------------------------------------


def _ensure_files(info: DatasetInfo, root: Path, given_root: Path, *, download: bool) -> None:
    """Return when all of ``info.files`` exist under ``root``; download them or raise."""
    missing = [f for f in info.files if not (root / f).is_file()]
    if not missing:
        return
    if not download:
        raise DatasetNotFoundError(_not_found_message(info, root, given_root, missing))
    logger.info("dataset %s: downloading into %s (torchvision)", info.name, root)
    try:
        _download(info.name, root)
    # Deliberately broad: a failed download surfaces as URLError, HTTPError, socket and SSL
    # errors, OSError or torchvision's RuntimeError (checksum); all mean the same to the user.
    except Exception as exc:
        reason = f"the download failed ({type(exc).__name__}: {exc})"
        raise DatasetNotFoundError(
            _not_found_message(info, root, given_root, missing, reason=reason)
        ) from exc
    missing = [f for f in info.files if not (root / f).is_file()]
    if missing:
        reason = "the download finished but some files are still missing"
        raise DatasetNotFoundError(_not_found_message(info, root, given_root, missing, reason))


def _download(name: str, root: Path) -> None:
    # Imported here: torchvision is slow to import and only the file-backed datasets need it.
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        cls(str(root), train=True, download=True)  # fetches all four files
    elif name == "cifar10":
        tvd.CIFAR10(str(root), train=True, download=True)
    elif name == "cifar100":
        tvd.CIFAR100(str(root), train=True, download=True)
    else:  # pragma: no cover - only file-backed datasets reach here
        raise AssertionError(name)


def _not_found_message(
    info: DatasetInfo,
    root: Path,
    given_root: Path,
    missing: list[str],
    reason: str | None = None,
) -> str:
    lines = [f"dataset '{info.name}': its files were not found in {root}"]
    if str(given_root) != str(root):
        lines[0] += f" (data-root {str(given_root)!r}, resolved from {Path.cwd()})"
    if reason:
        lines.append(f"{reason[0].upper()}{reason[1:]}.")
    if not root.exists():
        lines.append(f"The folder {root} does not exist.")
    lines.append("Expected files:")
    lines += [f"  {root / f}{'  (missing)' if f in missing else ''}" for f in info.files]
    lines.append(
        "To get them, either set download=true on a machine with internet access, e.g.\n"
        f"  fedmerge run dataset={info.name} data-root={root} download=true\n"
        "or copy the files into that folder in torchvision's layout (as listed above)."
    )
    lines.append("The run-config key that sets this folder is 'data-root'.")
    return "\n".join(lines)


def _unreadable(info_name: str, path: Path, exc: BaseException | str) -> DatasetNotFoundError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return DatasetNotFoundError(
        f"dataset '{info_name}': could not read {path} ({detail}). The file is damaged or "
        "not in the expected format: delete it and set download=true on a machine with "
        "internet access, or copy a good copy there (run-config key 'data-root')."
    )
