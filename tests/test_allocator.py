"""ctvl.allocator: glibc keeps freed memory for reuse in the command-line processes, and only there."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from ctvl import allocator


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result
        outer = self

        class Mallopt:
            argtypes = restype = None

            def __call__(self, param: int, value: int) -> int:
                outer.calls.append((param, value))
                return outer.result

        self.mallopt = Mallopt()


@pytest.fixture
def fake_glibc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: libc)
    return libc


def test_turns_off_mmap_and_trimming_once(fake_glibc):
    assert allocator.retain_freed_memory() is True
    assert fake_glibc.calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = INT_MAX
    assert allocator.retain_freed_memory() is True
    assert len(fake_glibc.calls) == 2


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_environment_turns_it_off(fake_glibc, monkeypatch, value):
    monkeypatch.setenv(allocator.ENV, value)
    assert allocator.retain_freed_memory() is False
    assert fake_glibc.calls == []


def test_other_c_libraries_are_left_alone(fake_glibc, monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_freed_memory() is False
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.retain_freed_memory() is False
    assert fake_glibc.calls == []


def test_a_refused_mallopt_is_reported(fake_glibc):
    fake_glibc.result = 0
    assert allocator.retain_freed_memory() is False
    assert allocator._applied is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_glibc_accepts_the_settings(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.retain_freed_memory() is True


def test_command_lines_apply_it_and_the_library_does_not(monkeypatch, tmp_path):
    from ctvl import cli

    from training import __main__ as training_main

    # the library, imported and used as 3D Slicer does, leaves the allocator alone (a fresh process)
    probe = ("from ctvl import allocator, inference, scene, workflow; from ctvl.model import load_weights; "
             "load_weights('demo'); print(allocator._applied)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False"
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append("ctvl") or True)
    assert cli.main(["info"]) == 0
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("training") or True)
    assert training_main.main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "w")]) == 2
    assert calls == ["ctvl", "training"]
