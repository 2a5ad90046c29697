"""Run-time checks of the dependencies' versions against the floors this package declares.

The floors live in ``pyproject.toml`` only (the one owner); here they are read back from the
installed package's metadata (``importlib.metadata.requires("mtrank")``) and compared with what is
actually importable. Two checks run before ``mtrank serve`` starts workers:

* exactly one onnxruntime build is installed (the extras ``cpu`` and ``gpu`` are an either/or:
  both builds write the same ``onnxruntime`` package directory);
* redis-py is not older than its floor. The feature store's request path uses redis-py
APIs that older releases lack (``read_response(timeout=...)``, the ``driver_info`` connection
argument); with such a release every ``POST /rank`` failed with a ``TypeError``. Now the service
refuses to start instead, naming both versions.
"""

from __future__ import annotations

import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.version import Version

DIST = "mtrank"


class DependencyError(RuntimeError):
    """The installed dependencies cannot run the service (the message says what to install)."""


class DependencyTooOld(DependencyError):
    """An installed dependency is older than the floor this package declares."""


#: the onnxruntime builds, one of which the service needs (extras ``cpu`` and ``gpu``)
ONNXRUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu")


def declared_floor(package: str, dist: str = DIST) -> Version | None:
    """The lowest version of ``package`` that ``dist``'s requirements admit (its ``>=``, ``==``
    or ``~=`` bound, outside extras); None when ``dist`` is not installed or sets no floor."""
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return None
    floors = []
    for line in reqs:
        req = Requirement(line)
        if req.name.lower() != package.lower():
            continue
        if req.marker is not None and "extra" in str(req.marker):
            continue
        floors += [Version(sp.version) for sp in req.specifier if sp.operator in (">=", "==", "~=", "===")]
    return max(floors) if floors else None


def installed_version(package: str) -> Version | None:
    try:
        return Version(md.version(package))
    except md.PackageNotFoundError:
        return None


def check_floor(package: str, installed: Version | None, floor: Version | None, dist: str = DIST) -> None:
    """:class:`DependencyTooOld` when ``installed`` is below ``floor`` (pure: fed the versions)."""
    if installed is None or floor is None or installed >= floor:
        return
    raise DependencyTooOld(f"{package} {installed} is installed, but {dist} needs {package}>={floor} "
                           f"(declared in its dependencies); upgrade it: pip install '{package}>={floor}'")


def check_redis_py() -> None:
    """Refuse to run with a redis-py older than the declared floor (see the module doc)."""
    check_floor("redis", installed_version("redis"), declared_floor("redis"))


def onnxruntime_problem(installed: list[str], importable: bool) -> str | None:
    """Why the installed onnxruntime builds cannot serve (pure: fed what is installed), or None."""
    if len(installed) > 1:
        return (f"both {' and '.join(installed)} are installed and share one package directory: "
                "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'mtrank[cpu]' (or 'mtrank[gpu]')")
    if not importable:
        return "the service needs onnxruntime: pip install 'mtrank[cpu]' (or 'mtrank[gpu]' for CUDA)"
    return None


def check_onnxruntime() -> None:
    """Exactly one onnxruntime build, importable; else :class:`DependencyError` naming the fix."""
    import importlib.util

    installed = [d for d in ONNXRUNTIME_DISTS if installed_version(d) is not None]
    problem = onnxruntime_problem(installed, importlib.util.find_spec("onnxruntime") is not None)
    if problem:
        raise DependencyError(problem)


def check_runtime() -> None:
    """Everything ``mtrank serve`` checks before it starts workers."""
    check_onnxruntime()
    check_redis_py()
