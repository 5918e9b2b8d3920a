"""Safety of the fused kernel (siftlens.core.fused) where its inputs or its surroundings are hostile or unusual: a
planted kernel in a cache folder that others can write, torch's global default dtype, shapes that do not fit at
the ctypes boundary, and one build of two that fails (issue 22, items 12 to 15)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest
import torch
from _sums import direct_layer_sums
from test_fused import assert_within, layer

from siftlens.core import fused, reductions

CPU = torch.device("cpu")
CC = shutil.which("cc")
needs_cc = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or CC is None,
                              reason="the kernel is built on x86-64 with a C compiler (cc) only")
HAS_AVX512 = Path("/proc/cpuinfo").exists() and "avx512f" in Path("/proc/cpuinfo").read_text()

# a "kernel" whose constructor runs as soon as it is loaded, and leaves a file behind to say so
PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted kernel ran\n", f); fclose(f); }
}
int siftlens_supported(void) { return 1; }
int siftlens_layer_sums(void) { return 0; }
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """A cache of this test's own (never the user's), the default compiler and widths, and no kernel loaded."""
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path / "cache"))
    for var in ("SIFTLENS_FUSED", "SIFTLENS_FUSED_WIDTH"):
        monkeypatch.delenv(var, raising=False)
    if CC:
        monkeypatch.setenv("CC", CC)
    fused._load.cache_clear()
    yield
    fused._load.cache_clear()


def planted_kernel(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library that writes a marker file when loaded; (the library, the marker's path)."""
    marker = tmp_path / "the-planted-kernel-ran"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    lib = tmp_path / "planted.so"
    subprocess.run([CC, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)], check=True,
                   capture_output=True)
    return lib, marker


def predictable_names() -> list[str]:
    """The file names the kernel's builds get in a cache: a hash of the source and the command, which anyone
    who has the package can compute."""
    source = resources.files("siftlens.core").joinpath("kernels", "layer_sums.c").read_bytes()
    names = []
    for width in fused.WIDTHS:
        cmd = [CC, *fused._FLAGS, f"-DVW={width}"]
        names.append(f"layer_sums{width}-{hashlib.sha256(source + ' '.join(cmd).encode()).hexdigest()[:16]}.so")
    return names


def plant(folder: Path, planted: Path) -> None:
    """The planted library under every predictable name in ``folder``, which anyone may write (mode 777)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in predictable_names():
        shutil.copy(planted, folder / name)
    for p in (folder, *folder.parents[:1]):
        p.chmod(0o777)


def load_and_count_warnings() -> tuple[bool, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = fused.available(CPU)
    return ok, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def check_kernel_numbers() -> None:
    attn, lhs, dmat = layer(2, 3, 4, 4, 3, seed=7)
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    assert_within(got, direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3), 16, 3, 3)


# ---- item 12: a planted kernel is never loaded ----------------------------------------------------------------

@needs_cc
def test_a_world_writable_shared_cache_is_refused_and_its_planted_kernel_never_runs(monkeypatch, tmp_path):
    planted, marker = planted_kernel(tmp_path)
    shared = tmp_path / "shared"
    monkeypatch.setenv("SIFTLENS_CACHE", str(shared))
    plant(shared / "kernels", planted)
    ok, warned = load_and_count_warnings()
    assert not marker.exists(), "the planted kernel ran"
    assert ok, "the kernel is built in a private folder instead"
    assert len(warned) == 1 and "refused" in warned[0] and "\n" not in warned[0], warned
    check_kernel_numbers()
    assert not marker.exists()


@needs_cc
def test_a_planted_temporary_directory_fallback_is_refused(monkeypatch, tmp_path):
    planted, marker = planted_kernel(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    # someone else made $TMPDIR/siftlens-<uid>/kernels first, writable by all, with kernels under the names
    plant(tmp_path / "tmp" / f"siftlens-{os.getuid()}" / "kernels", planted)
    ok, warned = load_and_count_warnings()
    assert not marker.exists(), "the planted kernel ran"
    assert ok and len(warned) == 1 and "refused" in warned[0], warned


@needs_cc
def test_a_cache_folder_owned_by_another_user_is_refused(monkeypatch, tmp_path):
    planted, marker = planted_kernel(tmp_path)
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    for name in predictable_names():
        shutil.copy(planted, folder / name)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)  # as if another user had made the folder (mode 700)
    _, warned = load_and_count_warnings()
    assert not marker.exists(), "the planted kernel ran"
    assert len(warned) == 1 and f"uid {real}" in warned[0], warned


@needs_cc
def test_a_kernel_swapped_in_after_the_rename_is_not_loaded(monkeypatch, tmp_path):
    # between the build's rename into the cache and the load, the file is replaced by one that others may write
    planted, marker = planted_kernel(tmp_path)
    real_replace, swapped = os.replace, []

    def replace_then_swap(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if str(dst).endswith(".so") and not swapped:
            shutil.copy(planted, dst)
            os.chmod(dst, 0o666)
            swapped.append(dst)

    monkeypatch.setattr(os, "replace", replace_then_swap)
    ok, _ = load_and_count_warnings()
    assert swapped
    assert not marker.exists(), "the planted kernel ran"
    assert ok
    check_kernel_numbers()


@needs_cc
def test_cache_folders_are_created_private(monkeypatch, tmp_path):
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path / "new" / "cache"))
    assert fused.available(CPU)
    for p in (tmp_path / "new", tmp_path / "new" / "cache", tmp_path / "new" / "cache" / "kernels"):
        assert p.stat().st_mode & 0o777 == 0o700, p
    for lib in (tmp_path / "new" / "cache" / "kernels").iterdir():
        assert lib.stat().st_mode & 0o022 == 0, lib


# ---- item 13: buffers do not follow torch's default dtype --------------------------------------------------------

@pytest.mark.parametrize("default", [torch.float16, torch.float64], ids=["float16", "float64"])
@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_the_default_dtype_does_not_change_the_numbers(monkeypatch, default, path):
    if path == "eager":
        monkeypatch.setenv("SIFTLENS_FUSED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if path == "kernel" and not fused.available(CPU):
            pytest.skip(f"no fused kernel here: {fused.unavailable_reason(CPU)}")
    attn, lhs, dmat = layer(2, 3, 5, 5, 3, seed=8)
    want = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    finally:
        torch.set_default_dtype(before)
    for f in fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.dtype == b.dtype and torch.equal(a, b), f.name


# ---- item 14: shapes are checked at the ctypes boundary ----------------------------------------------------------

def one_line_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_lhs_for_one_image_with_attention_for_four_raises(monkeypatch, path):
    if path == "eager":
        monkeypatch.setenv("SIFTLENS_FUSED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if path == "kernel" and not fused.available(CPU):
            pytest.skip(f"no fused kernel here: {fused.unavailable_reason(CPU)}")
    attn, lhs, dmat = layer(4, 3, 3, 3, 2)
    patch = attn[:, :, 1:, 1:]
    one_line_value_error(lambda: reductions.layer_sums(patch, lhs[:1], dmat, 2, pattern=True),
                         r"lhs of shape \(1, 3, 9\) does not fit attention for 4 image")
    one_line_value_error(lambda: reductions.layer_sums(patch, lhs[..., :5], dmat, 2, pattern=True),
                         r"lhs of shape \(4, 3, 5\)")
    one_line_value_error(lambda: reductions.layer_sums(patch, lhs, dmat[:5, :5], 2, pattern=True),
                         r"dmat of shape \(5, 5\) does not fit 9 patches")
    one_line_value_error(lambda: reductions.layer_sums(patch[..., :5], lhs, dmat, 2, pattern=True),
                         r"attention of shape \(4, 3, 9, 5\)")
    if path == "kernel":  # the module's own entry point checks too
        one_line_value_error(lambda: fused.layer_sums(patch, lhs[:1], dmat, pattern=True),
                             r"lhs of shape \(1, 3, 9\) does not fit attention for 4 image")
        one_line_value_error(lambda: fused.layer_sums(patch, lhs, dmat[:5], pattern=True), r"dmat of shape \(5, 9\)")


# ---- item 15: builds fall back lane by lane ----------------------------------------------------------------------

def failing_compiler(tmp_path: Path, width: int) -> Path:
    """A ``cc`` that fails for the ``width``-lane build only, as a compiler without AVX-512 support would."""
    script = tmp_path / f"cc-without-{width}"
    script.write_text(f'#!/bin/sh\ncase " $* " in *" -DVW={width} "*) echo "error: no -DVW={width} here" >&2; exit 1;; '
                      f'esac\nexec {CC} "$@"\n')
    script.chmod(0o755)
    return script


@needs_cc
def test_a_failed_16_lane_build_leaves_the_8_lane_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(failing_compiler(tmp_path, 16)))
    ok, warned = load_and_count_warnings()
    assert ok, fused.unavailable_reason(CPU)
    assert sorted(fused._load()[0]) == [8]
    assert len(warned) == 1 and "16-lane build failed" in warned[0] and "8-lane build serves" in warned[0], warned
    attn, lhs, dmat = layer(1, 2, 12, 12, 3, seed=9)  # 144 patches: where the 16-lane build would serve
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    assert_within(got, direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3), 144, 3, 2)


@needs_cc
@pytest.mark.skipif(not HAS_AVX512, reason="the 16-lane build serves alone only on a CPU with AVX-512")
def test_a_failed_8_lane_build_leaves_the_16_lane_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(failing_compiler(tmp_path, 8)))
    ok, warned = load_and_count_warnings()
    assert ok, fused.unavailable_reason(CPU)
    assert sorted(fused._load()[0]) == [16]
    assert len(warned) == 1 and "8-lane build failed" in warned[0], warned
    check_kernel_numbers()  # 16 patches: below WIDE_FROM, served by the 16-lane build
