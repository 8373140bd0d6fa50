"""The compiled extension amdim_kernels._C: the one built at install, or else one compiled on
first use against the torch this process runs with, kept in a cache directory.

An install that could not compile (plain `pip install .` builds in an environment without
torch) carries the C++/CUDA sources. The first process that needs the cpp or cuda backend
then compiles them with torch.utils.cpp_extension and ninja, prints one line saying what it
builds and how long it took, and keeps the result under

    $AMDIM_KERNELS_CACHE, else $XDG_CACHE_HOME/amdim_kernels, else ~/.cache/amdim_kernels

in a folder named for the torch and CUDA versions, the Python version, the kernels (CPU, or
CPU and CUDA with their arch list) and a hash of the sources and flags: another torch or
other sources are another folder, so a build is never loaded under a torch it was not built
for. A file lock makes one process build while the others (torchrun's ranks) wait and then
load its result; a cached build that does not load (a crash mid-build, a damaged file) is
built again once. Where no compiler (or no nvcc, for the CUDA kernels) is found, the reason
is kept for available_backends() and build_info(), and `auto` takes another backend.

An extension installed with the package records the torch it was built against in _C.json
beside it; under another torch it is not loaded (it could crash, or register ops twice) and
the sources are compiled as above. AMDIM_KERNELS_BUILD_ON_USE=0 turns the build on first use
off.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import environment, extension_build

CACHE_ENV = "AMDIM_KERNELS_CACHE"


@dataclass(frozen=True)
class ExtensionState:
    """The extension this process uses, or why there is none."""

    module: ModuleType | None
    built_for: tuple[str, ...]  # ("cpu",), ("cpu", "cuda"), or ()
    origin: str  # "installed", "built on first use", "cached build", or "none"
    path: str | None  # the loaded file
    reason: str | None  # why module is None, or why its CUDA kernels are missing


# The state once loaded (load()); None until the first backend lookup needs it.
STATE: ExtensionState | None = None


class EarlierFailure(RuntimeError):
    """A build that failed in an earlier process, recorded in its folder."""


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "amdim_kernels"


def build_folder(with_cuda: bool, archs: str | None) -> str:
    """The cache folder's name for a build of these kernels under this process's torch."""
    kernels = f"cuda{torch.version.cuda}-{archs}-{extension_build.nvcc_path()}" if with_cuda else "cpu"
    # the interpreter's ABI (EXT_SUFFIX tells 3.13 from free-threaded 3.13t), the machine, the
    # compiler asked for, the sources and flags: any of them changed is another build
    key = json.dumps([torch.__version__, torch.version.cuda, sysconfig.get_config_var("EXT_SUFFIX"),
                      platform.machine(), os.environ.get("CXX", ""), kernels, extension_build.sources_digest(),
                      extension_build.CXX_FLAGS, extension_build.NVCC_FLAGS, extension_build.openmp_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    torch_tag = torch.__version__.replace("+", "-")
    return f"torch{torch_tag}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if with_cuda else 'cpu'}-{digest}"


def installed_extension() -> tuple[ModuleType | None, str | None, str | None]:
    """(module, path, reason): the extension installed with the package, if it is there, was
    built against this torch and from the sources installed beside it (an editable install's
    sources may have changed since its build), and loads."""
    spec = importlib.util.find_spec("amdim_kernels._C")
    if spec is None or spec.origin is None:
        return None, None, "no compiled extension was installed with the package"
    record = Path(spec.origin).with_name("_C.json")
    try:
        built = json.loads(record.read_text()) if record.exists() else {}
    except (OSError, ValueError) as e:
        return None, spec.origin, f"the installed extension's record {record} is unreadable ({e})"
    if built.get("torch", torch.__version__) != torch.__version__:
        return None, spec.origin, (f"the installed extension was built for torch {built['torch']}, this is torch "
                                   f"{torch.__version__}")
    if built.get("sources") and extension_build.CSRC.is_dir() and built["sources"] != extension_build.sources_digest():
        return None, spec.origin, "the installed extension was built from other sources than those installed"
    try:
        from . import _C
    except (ImportError, OSError) as e:
        return None, spec.origin, f"the installed extension does not load ({str(e).strip().splitlines()[0]})"
    return _C, spec.origin, None


@contextlib.contextmanager
def _tools_on_path():
    """This interpreter's scripts folder first on PATH while the block runs: pip installs ninja
    there, and torch's build looks for it on PATH, which lacks that folder when a venv's python
    runs without the venv activated (a Jupyter kernel, cron, an IDE)."""
    scripts = sysconfig.get_path("scripts")
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = scripts + os.pathsep + before if scripts else before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def first_use_archs() -> str:
    """The arch list of a build on first use: TORCH_CUDA_ARCH_LIST where set, else this
    machine's GPUs (the newest with PTX), else the default list."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    return extension_build.DEFAULT_ARCHS


def compiler_missing(with_cuda: bool) -> str | None:
    """Why the extension cannot be compiled here, or None."""
    cxx = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    words = shlex.split(cxx) or [cxx]
    program = words[1] if words[0] == "ccache" and len(words) > 1 else words[0]
    if shutil.which(program) is None:
        return f"no C++ compiler found ({program!r} is not on PATH; install g++ or set CXX)"
    with _tools_on_path():
        if not extension_build.cpp_extension().is_ninja_available():
            return "ninja is not installed (pip install ninja)"
    if not extension_build.CSRC.is_dir():
        return f"the extension's sources are not installed ({extension_build.CSRC} is missing)"
    return None


def compile_sources(folder: Path, with_cuda: bool, archs: str | None) -> ModuleType:
    load = extension_build.cpp_extension().load
    cuda_flags = list(extension_build.NVCC_FLAGS) + extension_build.gencode_flags(archs) if with_cuda else None
    defines = [f"-D{name}" if value is None else f"-D{name}={value}"
               for name, value in extension_build.defines(with_cuda)]
    openmp = extension_build.openmp_flags()
    with _tools_on_path():
        return load(name="_C", sources=[str(p) for p in extension_build.sources(with_cuda)],
                    extra_cflags=list(extension_build.CXX_FLAGS) + openmp + defines, extra_ldflags=openmp,
                    extra_cuda_cflags=(cuda_flags + defines) if with_cuda else None,
                    extra_include_paths=extension_build.include_dirs(with_cuda), build_directory=str(folder),
                    with_cuda=with_cuda, is_python_module=True, verbose=False)


def import_built(library: Path) -> ModuleType:
    # the module's name is the file's (_C, or _C_v1... where torch's tools renamed a rebuild)
    spec = importlib.util.spec_from_file_location(library.name.split(".")[0], library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_or_load(with_cuda: bool, archs: str | None, say=print) -> tuple[ModuleType, str, str]:
    """(module, origin, path): the cached build of these kernels under this torch, compiled
    first where there is none, under a file lock; a cached build that does not load is
    compiled again, once."""
    from filelock import FileLock

    folder = cache_root() / build_folder(with_cuda, archs)
    folder.mkdir(parents=True, exist_ok=True)
    failed = folder / "failed.txt"
    with FileLock(str(folder / "build.lock")):
        if failed.exists():  # this build failed before: not tried again at every start
            raise EarlierFailure(failed.read_text().strip())
        built = sorted((p for p in folder.glob("_C*") if p.suffix in (".so", ".pyd")), key=lambda p: p.stat().st_mtime)
        if built:
            library = built[-1]
            try:
                return import_built(library), "cached build", str(library)
            except (ImportError, OSError) as e:
                # a damaged build: start the folder afresh and compile again
                say(f"amdim_kernels: the cached build {library} does not load ({e}); compiling it again",
                    file=sys.stderr)
                for path in folder.iterdir():
                    if path.name != "build.lock":
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
        kernels = f"CPU and CUDA kernels for {archs}" if with_cuda else "CPU kernels"
        say(f"amdim_kernels: compiling the C++ extension ({kernels}) for torch {torch.__version__} into {folder} ...",
            end="", flush=True, file=sys.stderr)
        started = time.perf_counter()
        try:
            module = compile_sources(folder, with_cuda, archs)
        except Exception as e:
            say(" failed", file=sys.stderr, flush=True)
            (folder / "build.log").write_text(str(e))  # the compiler's output, whole
            failed.write_text(_first_words(e, folder))
            raise
        except BaseException:
            say(" stopped", file=sys.stderr, flush=True)
            raise
        say(f" done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return module, "built on first use", module.__file__


def _first_words(error: Exception, folder: Path | None = None) -> str:
    """A failed compile in a few words: torch's message up to the compiler command it quotes,
    and where the build's files are."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": [")[0] + (f" (the compiler's output: {folder / 'build.log'}; delete {folder} to try "
                                   "again)" if folder else "")


def load(say=print) -> ExtensionState:
    """The extension for this process (kept in STATE): the installed one, else a cached or
    newly compiled build, else none with the reason."""
    global STATE
    if STATE is not None:
        return STATE
    module, path, reason = installed_extension()
    if module is not None:
        STATE = ExtensionState(module, tuple(module.BUILT_FOR), "installed", path, None)
        return STATE
    if not environment.BUILD_ON_USE:
        STATE = ExtensionState(None, (), "none", None, f"{reason}, and AMDIM_KERNELS_BUILD_ON_USE=0")
        return STATE
    with_cuda, why_not_cuda = extension_build.cuda_choice(torch)
    missing = compiler_missing(with_cuda)
    if missing is not None:
        STATE = ExtensionState(None, (), "none", None, f"{reason}, and it cannot be compiled here: {missing}")
        return STATE
    note = None if with_cuda else f"CUDA kernels not compiled: {why_not_cuda}"
    # with CUDA, the CPU kernels alone are the fallback of a failed compile
    attempts = [(True, first_use_archs()), (False, None)] if with_cuda else [(False, None)]
    for cuda, archs in attempts:
        try:
            module, origin, path = build_or_load(cuda, archs, say)
            break
        except Exception as e:  # noqa: BLE001 (a failed compile is a reason, and the CPU kernels tried)
            if not cuda:
                STATE = ExtensionState(None, (), "none", None, f"{reason}, and compiling it failed: {_first_words(e)}")
                return STATE
            note = f"compiling the CUDA kernels failed: {_first_words(e)}"
            if not isinstance(e, EarlierFailure):
                say(f"amdim_kernels: {note}; compiling the CPU kernels alone", file=sys.stderr)
    STATE = ExtensionState(module, tuple(module.BUILT_FOR), origin, path, note)
    return STATE
