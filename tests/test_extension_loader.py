"""The extension's build on first use (amdim_kernels/extension_loader.py): one process builds
while the others wait, a damaged cache is built again, a failed build is not retried at every
start, an installed extension built for another torch is not loaded, and a missing compiler
is a reason, not an error. The compile itself is stood in for by a tiny C module (a real
compile of the sources takes tens of seconds; CI's install check does one)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from amdim_kernels import environment, extension_loader, registry

# A stand-in for compile_sources: a C module named _C with BUILT_FOR, built in the cache folder.
FAKE_COMPILE = textwrap.dedent('''
    import os, subprocess, sys, sysconfig, time
    from pathlib import Path
    from amdim_kernels import extension_loader

    def fake_compile(folder, with_cuda, archs):
        time.sleep(float(os.environ.get("FAKE_COMPILE_SECONDS", "0")))
        if os.environ.get("FAKE_COMPILE_FAILS"):
            raise RuntimeError("Error building extension '_C': [1/2] c++ ... exit status 1")
        src = Path(folder) / "fake.c"
        src.write_text(
            "#include <Python.h>\\n"
            "static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \\"_C\\", 0, -1, 0};\\n"
            "PyMODINIT_FUNC PyInit__C(void) { PyObject* m = PyModule_Create(&d);\\n"
            "  PyModule_AddObject(m, \\"BUILT_FOR\\", Py_BuildValue(\\"(s)\\", \\"cpu\\")); return m; }\\n")
        library = Path(folder) / "_C.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"], str(src), "-o",
                        str(library)], check=True)
        return extension_loader.import_built(library)

    extension_loader.compile_sources = fake_compile
    module, origin, path = extension_loader.build_or_load(False, None)
    print("RESULT", origin, module.BUILT_FOR, flush=True)
''')

needs_cc = pytest.mark.skipif(subprocess.run(["which", "cc"], capture_output=True).returncode != 0,
                              reason="no C compiler")


def _start(tmp_path: Path, **env) -> subprocess.Popen:
    script = tmp_path / "fake_build.py"
    script.write_text(FAKE_COMPILE)
    environ = {"PATH": "/usr/bin:/bin", "AMDIM_KERNELS_CACHE": str(tmp_path / "cache"), **env}
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen([sys.executable, str(script)], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out, err


@needs_cc
def test_one_process_builds_the_others_wait_then_load(tmp_path):
    processes = [_start(tmp_path, FAKE_COMPILE_SECONDS="1") for _ in range(3)]
    results = [_finish(p) for p in processes]
    outs = sorted(out.strip() for out, _ in results)
    assert outs == sorted(["RESULT built on first use ('cpu',)"] + ["RESULT cached build ('cpu',)"] * 2)
    compiling = [err for _, err in results if "compiling the C++ extension (CPU kernels)" in err]
    assert len(compiling) == 1 and "done in" in compiling[0]
    # a later process loads the cached build, saying nothing
    out, err = _finish(_start(tmp_path))
    assert out.strip() == "RESULT cached build ('cpu',)" and err == ""


@needs_cc
def test_a_damaged_cache_is_built_again(tmp_path):
    _finish(_start(tmp_path))
    (library,) = (tmp_path / "cache").glob("*/_C.so")
    library.write_bytes(library.read_bytes()[:100])  # a build cut short
    out, err = _finish(_start(tmp_path))
    assert "does not load" in err and "compiling it again" in err and "done in" in err
    assert out.strip() == "RESULT built on first use ('cpu',)"
    assert _finish(_start(tmp_path))[0].strip() == "RESULT cached build ('cpu',)"


def test_a_failed_build_is_recorded_and_not_retried_at_every_start(tmp_path):
    first = _start(tmp_path, FAKE_COMPILE_FAILS="1")
    _, err = first.communicate(timeout=120)
    assert first.returncode != 0 and "... failed" in err and "Error building extension '_C'" in err
    (record,) = (tmp_path / "cache").glob("*/failed.txt")
    assert "Error building extension '_C' (the compiler's output: " in record.read_text()
    assert "exit status 1" in (record.parent / "build.log").read_text()  # the whole message, kept
    again = _start(tmp_path)  # would build fine now, but the failure stands until the folder goes
    _, err = again.communicate(timeout=120)
    assert again.returncode != 0 and "EarlierFailure" in err and "compiling" not in err


def test_build_folders_differ_by_torch_kernels_and_archs(monkeypatch):
    import torch

    cpu = extension_loader.build_folder(False, None)
    assert cpu == extension_loader.build_folder(False, None)
    assert len({cpu, extension_loader.build_folder(True, "8.0"), extension_loader.build_folder(True, "9.0")}) == 3
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert extension_loader.build_folder(False, None) != cpu


def test_installed_extension_for_another_torch_is_not_loaded(tmp_path, monkeypatch):
    import importlib.util

    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not loaded")
    (tmp_path / "_C.json").write_text(json.dumps({"torch": "1.0.0"}))
    spec = SimpleNamespace(origin=str(library))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "amdim_kernels._C" else None)
    module, path, reason = extension_loader.installed_extension()
    assert module is None and path == str(library)
    assert reason.startswith("the installed extension was built for torch 1.0.0, this is torch ")
    import torch

    (tmp_path / "_C.json").write_text(json.dumps({"torch": torch.__version__, "sources": "0" * 64}))
    module, _, reason = extension_loader.installed_extension()
    assert module is None and reason == "the installed extension was built from other sources than those installed"
    (tmp_path / "_C.json").write_text("{not json")
    module, _, reason = extension_loader.installed_extension()
    assert module is None and reason.startswith("the installed extension's record ") and "unreadable" in reason


def test_no_compiler_and_no_build_are_reasons(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler found ('/nonexistent/c++' is not on PATH" in extension_loader.compiler_missing(False)
    monkeypatch.setattr(extension_loader, "STATE", None)
    monkeypatch.setattr(extension_loader, "installed_extension",
                        lambda: (None, None, "no compiled extension was installed with the package"))
    state = extension_loader.load()
    assert state.module is None and "it cannot be compiled here: no C++ compiler found" in state.reason
    monkeypatch.setattr(extension_loader, "STATE", None)
    monkeypatch.setattr(environment, "BUILD_ON_USE", False)
    state = extension_loader.load()
    assert state.reason == "no compiled extension was installed with the package, and AMDIM_KERNELS_BUILD_ON_USE=0"
    monkeypatch.setattr(registry, "KERNEL_IMAGE_ERRORS", {})
    import torch

    reason = registry.unavailable_reason("cpp", torch.device("cpu"))
    assert reason == ("the compiled extension amdim_kernels._C is not available: no compiled extension was "
                      "installed with the package, and AMDIM_KERNELS_BUILD_ON_USE=0")
    assert registry.resolve("auto", torch.device("cpu")) == "reference"
    assert "\n" not in reason


def test_gencode_flags():
    from amdim_kernels.extension_build import gencode_flags

    assert gencode_flags("8.0;9.0+PTX") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                            "-gencode=arch=compute_90,code=compute_90"]


def test_self_check_command_passes_and_fails(monkeypatch, capsys):
    """`python -m amdim_kernels` prints every backend and its check, exit 0; a backend that
    computes something else fails its check, exit 1."""
    from amdim_kernels import __main__ as command

    assert command.main([]) == 0
    out = capsys.readouterr().out
    assert "compiled extension:" in out and "backends:" in out and "reference available" in out
    runnable = [line for line in out.splitlines() if line.endswith(" pass")]
    assert len(runnable) == len([1 for b in registry.available_backends("cpu") if b != "reference"])

    real = registry.implementation

    def off_by_a_bit(name):
        impl = real(name)
        if name == "reference":
            return impl
        return lambda p, s: tuple(x * 1.01 for x in impl(p, s))

    monkeypatch.setattr(registry, "implementation", off_by_a_bit)
    if runnable:
        assert command.main([]) == 1
        out = capsys.readouterr().out
        assert "FAIL" in out and "loss off by" in out


def test_self_check_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "amdim_kernels", "--no-check"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("amdim_kernels ") and "backends:" in out.stdout
