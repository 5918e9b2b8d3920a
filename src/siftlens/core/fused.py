"""The fused CPU kernel for :func:`siftlens.core.reductions.layer_sums`: one pass over each query row instead of
about twelve eager passes over the whole attention (``kernels/layer_sums.c``; benchmark in docs/performance.md).

The kernel is plain C (no Python or torch headers). On first use it is compiled with the system's C compiler
(``$CC``, else ``cc``) into a per-user cache, ``$SIFTLENS_CACHE`` or ``$XDG_CACHE_HOME/siftlens`` or
``~/.cache/siftlens`` (``$TMPDIR/siftlens-<uid>`` where none can be created), under a name that hashes the
source and the command, and loaded with :mod:`ctypes`. Compiling takes about a second per build, once.

The cache is trusted as ssh trusts its keys: folders are created 0700, and a build is loaded only from a
folder and a file that this user owns and that neither group nor others can write, in a folder whose parents
no one else can replace it in (the folder and the file are checked through the open descriptors that the bytes
are read from; the bytes are then loaded from a fresh ``mkdtemp`` folder inside the checked one, so nothing can
swap the file between the check and the load). A cache folder that fails the check is not used: the kernel is
built in a private temporary folder instead, with one warning; a cached file that fails it, in a folder that
passes, is rebuilt.

Two builds of the one source: 8 lanes (AVX2 and FMA: Intel CPUs since 2013, AMD since 2015) and, where the
CPU has AVX-512, 16 lanes, used for rows of at least
:data:`WIDE_FROM` patches (10 % faster on ViT-S/16's 196; slower on the built-in model's 64, where the
per-row work is a few vectors). Each build stands alone: where one fails to compile, the other serves (one
warning). ``SIFTLENS_FUSED_WIDTH=8`` or ``16`` builds and uses only that one (for tests and benchmarks).
Where the kernel cannot serve, the eager path does, with the same numbers to float32 rounding: on a non-x86-64
machine, on a CPU without AVX2 and FMA, without a C compiler (one warning names the reason), for tensors on an
accelerator, and with ``SIFTLENS_FUSED=0``.

The row sums, column sums, ``xx`` and ``xxt`` (the terms behind the null variance) are those of the centred
matrix ``Y = Bt - c`` (:func:`centre`: ``c`` = 1/N as a float32): near uniform attention these are sums of small
deviations, rounded relative to the deviations rather than to 1/N. ``xx`` and ``xxt`` are float64: float32
per-row partial sums, added across rows in float64. :func:`siftlens.core.reductions.layer_sums` adds the constant
parts back in float64.

:func:`layer_sums` splits a batch's images over ``torch.get_num_threads()`` threads; ctypes releases the GIL
during the call, so the threads run in parallel like an eager operation's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

from ..errors import ConfigError

_SOURCE = "layer_sums.c"
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]
WIDTHS = (8, 16)  # VW in the C source, per build: rows are padded to a multiple of it
WIDE_FROM = 128  # patches per row from which the 16-lane build is used
MAX_ROWS = 8  # MAX_R in the C source: contraction rows per image (the weight row and up to 7 levels)
WIDTH_ENV = "SIFTLENS_FUSED_WIDTH"  # 8 or 16: build and use only that build
_ELEMS_PER_THREAD = 1 << 21  # a thread of its own only for this many attention elements (8 MB)
_OUTPUTS = ("rowsum", "colsum", "diag", "dist", "ent", "qk", "xx", "xxt")  # the kernel's outputs, in order
_DOUBLE_OUTPUTS = ("xx", "xxt")  # double * in the C source


class _UnsafeCache(OSError):
    """A cache folder or file that someone other than this user could have written."""


def _uid() -> int | None:
    """This user's id, or None where the OS has none (no ownership checks there)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _not_private(st: os.stat_result, path: Path | str) -> str:
    """Why a folder or file with status ``st`` may hold someone else's code, or "" where only this user (and the
    superuser) can have written it: owned by this user, not writable by group or others."""
    uid = _uid()
    if uid is None:
        return ""
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _folder_not_private(folder: Path) -> str:
    """Why ``folder`` may hold someone else's code, or "": it must pass :func:`_not_private`, and each folder
    above it must be owned by this user or the superuser and be writable by no one else unless sticky (like
    ``/tmp``), so that no one can move another folder into its place (ssh's check of its keys)."""
    why = _not_private(os.stat(folder), folder)
    uid = _uid()
    if why or uid is None:
        return why
    for above in folder.resolve().parents:
        st = os.stat(above)
        if st.st_uid not in (uid, 0):
            return f"{above}, above the cache, is owned by uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return f"{above}, above the cache, is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (existing ones are left as they are)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")


def cache_dir() -> Path:
    """Where compiled kernels are kept: the first of ``$SIFTLENS_CACHE``, ``$XDG_CACHE_HOME/siftlens`` and
    ``~/.cache/siftlens`` (its ``kernels`` folder), or ``siftlens-<uid>/kernels`` in the system's temporary
    directory where that one cannot be created (a read-only home on a cluster). Missing folders are created
    0700; whether the folder is private enough to load from is checked by the loader, not here."""
    if os.environ.get("SIFTLENS_CACHE"):
        wanted = Path(os.environ["SIFTLENS_CACHE"]) / "kernels"
    else:
        wanted = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siftlens" / "kernels"
    try:
        _make_private_dirs(wanted)
        return wanted
    except OSError:
        user = _uid() if _uid() is not None else "user"
        fallback = Path(tempfile.gettempdir()) / f"siftlens-{user}" / "kernels"
        _make_private_dirs(fallback)
        return fallback


def _compile(source: bytes, compiler: str, width: int, folder: Path, rebuild: bool = False) -> Path:
    """The shared library built from ``source`` with ``width`` lanes in ``folder``, compiled now unless the
    folder holds it (or ``rebuild``); written atomically (0755, whatever the umask), so that ranks of one
    torchrun job compiling at the same time never load a partial file."""
    cmd = [compiler, *_FLAGS, f"-DVW={width}"]
    key = hashlib.sha256(source + " ".join(cmd).encode()).hexdigest()[:16]
    lib = folder / f"layer_sums{width}-{key}.so"
    if lib.exists() and not rebuild:
        return lib
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # mkdtemp: 0700, this user's
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        built = Path(tmp) / lib.name
        res = subprocess.run([*cmd, "-o", str(built), str(src)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or ["no message"])[0]
            raise OSError(f"{compiler} failed: {first}")
        os.chmod(built, 0o755)
        os.replace(built, lib)
    return lib


def _read_private(lib: Path) -> bytes:
    """The bytes of ``lib``, read through a descriptor of its folder and one of the file, each checked by
    :func:`_not_private` (so the file checked is the file read); raises :class:`_UnsafeCache` where either
    fails the check."""
    dfd = os.open(lib.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        why = _not_private(os.fstat(dfd), lib.parent)
        if why:
            raise _UnsafeCache(why)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(lib.name, flags, dir_fd=dfd) if os.open in os.supports_dir_fd else os.open(lib, flags)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        why = "" if stat.S_ISREG(st.st_mode) else f"{lib} is not a regular file"
        why = why or _not_private(st, lib)
        if why:
            raise _UnsafeCache(why)
        return f.read()


def _dlopen(data: bytes, name: str, folder: Path) -> ctypes.CDLL:
    """The shared library ``data``, loaded from a fresh private folder in ``folder`` (``mkdtemp``: 0700, this
    user's), which is removed again once the library is mapped; a unique path, so the loader never confuses two
    builds, and the cache's file system, which can map code (a ``noexec`` /tmp cannot)."""
    with tempfile.TemporaryDirectory(prefix="load-", dir=folder) as tmp:
        path = Path(tmp) / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o700)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(str(path))


def _build(source: bytes, compiler: str, width: int, folder: Path) -> ctypes.CDLL | None:
    """The loaded build of ``width`` lanes from ``folder`` (compiled there if absent), or None where this CPU
    lacks its instructions. A cached file that fails the ownership check, in a folder that passes it, is
    rebuilt in place; a folder that fails it raises :class:`_UnsafeCache`."""
    lib = _compile(source, compiler, width, folder)
    try:
        data = _read_private(lib)
    except _UnsafeCache:
        if _folder_not_private(folder):
            raise
        data = _read_private(_compile(source, compiler, width, folder, rebuild=True))
    dll = _dlopen(data, lib.name, folder)
    if not dll.siftlens_supported():
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    dll.siftlens_layer_sums.argtypes = [ptr, *[i64] * 7, ptr, i64, ptr, ctypes.c_int, ctypes.c_float, *[ptr] * 9]
    dll.siftlens_layer_sums.restype = ctypes.c_int
    return dll


def _forced_width() -> int | None:
    """The width that ``$SIFTLENS_FUSED_WIDTH`` forces, or None where it is unset."""
    value = os.environ.get(WIDTH_ENV, "").strip()
    if not value:
        return None
    if value not in {str(w) for w in WIDTHS}:
        raise ConfigError(f"{WIDTH_ENV}={value}: use one of {', '.join(map(str, WIDTHS))}, or leave it unset")
    return int(value)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[int, ctypes.CDLL], str]:
    """The loaded builds by width and "", or none and why not. Builds stand alone: where one fails, the others
    serve. One warning when something is wrong rather than just absent: no compiler, a failed build, a cache
    folder that is not private (then the builds are made in a private temporary folder)."""
    if os.environ.get("SIFTLENS_FUSED", "1") == "0":
        return {}, "disabled by SIFTLENS_FUSED=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}, f"not an x86-64 CPU ({platform.machine()})"
    forced = _forced_width()
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        why = f"no C compiler ({compiler})"
        _warn(f"fused attention kernel unavailable: {why}; siftlens uses the slower eager path")
        return {}, why
    source = resources.files("siftlens.core").joinpath("kernels", _SOURCE).read_bytes()
    notes: list[str] = []
    builds: dict[int, ctypes.CDLL] = {}
    failed: list[str] = []
    lacking: list[int] = []
    with contextlib.ExitStack() as stack:
        private = functools.cache(lambda: Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="siftlens-build-"))))  # made on first use only: mkdtemp, 0700, this user's
        try:
            folder: Path | None = cache_dir()
            refused = _folder_not_private(folder)
        except OSError as e:
            folder, refused = None, f"no cache folder ({e})"
        if refused:
            notes.append(f"cache refused: {refused}; built in a private temporary folder")
            folder = None
        for width in (forced,) if forced else WIDTHS:
            if lacking and not forced:  # no AVX2 and FMA: no AVX-512 either
                break
            try:
                try:
                    lib = _build(source, compiler, width, folder or private())
                except _UnsafeCache as e:
                    notes.append(f"cache refused: {e}; built in a private temporary folder")
                    folder = None
                    lib = _build(source, compiler, width, private())
            except (OSError, subprocess.SubprocessError) as e:
                failed.append(f"the {width}-lane build failed: {e}")
                continue
            if lib is None:
                lacking.append(width)
            else:
                builds[width] = lib
    if builds:
        if failed or notes:
            served = " and ".join(f"{w}-lane" for w in builds)
            _warn(f"fused attention kernel: {'; '.join(notes + failed)}; the {served} build serves")
        return builds, ""
    if failed:
        why = "; ".join(failed)
    elif forced and forced != WIDTHS[0] and WIDTHS[0] not in lacking:
        why = f"the CPU lacks AVX-512 ({WIDTH_ENV}={forced})"
    else:
        return {}, "the CPU lacks AVX2 or FMA"
    _warn(f"fused attention kernel unavailable: {'; '.join(notes + [why])}; siftlens uses the slower eager path")
    return {}, why


def unavailable_reason(device: torch.device) -> str:
    """Why :func:`layer_sums` does not run on ``device`` here, or "" where it does."""
    return "not a CPU tensor" if device.type != "cpu" else _load()[1]


def available(device: torch.device) -> bool:
    """Whether :func:`layer_sums` runs on ``device`` here (compiling the kernel on the first call)."""
    return device.type == "cpu" and bool(_load()[0])


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="siftlens-fused")


def centre(n: int) -> float:
    """The constant ``c`` the kernel and the eager path centre ``Bt`` by: 1/n rounded to float32 (the value
    that float32 division gives), returned as the Python float it equals exactly."""
    return float(torch.tensor(1.0, dtype=torch.float32) / n)


def padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (..., n) float32, contiguous, zero-padded on the right to ``width`` columns."""
    out = x.new_zeros(*x.shape[:-1], width, dtype=torch.float32)
    out[..., :x.shape[-1]] = x
    return out


def check_shapes(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor,
                 max_rows: int | None = MAX_ROWS) -> None:
    """Raise a one-line ValueError unless patch_attn is (B, h, N, N), lhs (B, R, N) with 1 <= R <= ``max_rows``
    (None: any R) and dmat (N, N), with h, N >= 1: the sizes the kernel reads its buffers by."""
    where = "layer_sums"
    if patch_attn.dim() != 4 or patch_attn.shape[-1] != patch_attn.shape[-2] or 0 in patch_attn.shape[1:]:
        raise ValueError(f"{where}: attention of shape {tuple(patch_attn.shape)}, not (B, h, N, N) with h, N >= 1")
    bsz, _, n, _ = patch_attn.shape
    if lhs.dim() != 3 or lhs.shape[0] != bsz or lhs.shape[2] != n:
        raise ValueError(f"{where}: lhs of shape {tuple(lhs.shape)} does not fit attention for {bsz} image(s) of "
                         f"{n} patches, which needs ({bsz}, R, {n})")
    if lhs.shape[1] < 1 or (max_rows is not None and lhs.shape[1] > max_rows):
        raise ValueError(f"{where}: {lhs.shape[1]} contraction rows (1 to {max_rows or 'any'})")
    if tuple(dmat.shape) != (n, n):
        raise ValueError(f"{where}: dmat of shape {tuple(dmat.shape)} does not fit {n} patches, which needs ({n}, {n})")


def layer_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor,
               pattern: bool) -> dict[str, torch.Tensor] | None:
    """The one-map reductions of :func:`siftlens.core.reductions.layer_sums` by the kernel, or None where a query
    row sums to 0 (the caller renormalises and runs its own path).

    patch_attn: (B, h, N, N) float32 on the CPU, unit column stride; lhs: (B, R, N), R <= :data:`MAX_ROWS`;
    dmat: (N, N) (all on the CPU; shapes are checked by :func:`check_shapes`). Returns float32 diag, dist, ent
    of ``Bt`` and rowsum, colsum of ``Y = Bt - c`` (c: :func:`centre`): (B, h, N); qk: (B, h * N, R) = ``Bt
    lhs^T``; float64 xx, xxt of ``Y``: (B, h + 1) (``sum Y^2`` and ``sum Y * Y^T``, slot h of the head mean;
    only ``xx``'s per-head slots are filled without ``pattern``, the rest is 0).
    """
    check_shapes(patch_attn, lhs, dmat)
    for name, t in (("attention", patch_attn), ("lhs", lhs), ("dmat", dmat)):
        if t.device.type != "cpu":
            raise ValueError(f"fused layer_sums: {name} on {t.device}, not on the CPU")
    builds = _load()[0]
    if not builds:
        raise ValueError(f"fused layer_sums: no kernel here ({_load()[1]})")
    bsz, nh, n, _ = patch_attn.shape
    width = WIDTHS[1] if n >= WIDE_FROM else WIDTHS[0]
    width = width if width in builds else next(iter(builds))
    lib = builds[width]
    r = lhs.shape[1]
    if patch_attn.dtype != torch.float32 or patch_attn.stride(-1) != 1:
        patch_attn = patch_attn.float().contiguous()
    np_ = -(-n // width) * width
    lhs_p, dmat_p = padded(lhs, np_), padded(dmat, np_)
    f32, f64 = torch.float32, torch.float64  # every buffer's dtype explicit: the C side reads float and double
    out = {k: torch.empty(bsz, nh, n, dtype=f32) for k in _OUTPUTS[:5]}
    out["qk"] = torch.empty(bsz, nh * n, r, dtype=f32)
    out |= {k: torch.empty(bsz, nh + 1, dtype=f64) for k in _DOUBLE_OUTPUTS}
    workers = max(1, min(torch.get_num_threads(), bsz, patch_attn.numel() // _ELEMS_PER_THREAD))
    bounds = [(bsz * k // workers, bsz * (k + 1) // workers) for k in range(workers)]
    s_img, s_head, s_row, _ = patch_attn.stride()

    # every buffer is allocated here, in the calling thread: allocations in the pool's threads would each open a
    # glibc malloc arena of their own, which kept about 70 MB more resident in a ViT-S/16 analysis
    works = torch.empty(workers, 2 * np_ + 3 * n * np_, dtype=f32)
    c = centre(n)
    calls = [(patch_attn[s:e].data_ptr(), e - s, nh, n, np_, s_img, s_head, s_row, lhs_p[s:e].data_ptr(), r,
              dmat_p.data_ptr(), int(pattern), c, *[out[k][s:e].data_ptr() for k in _OUTPUTS], works[i].data_ptr())
             for i, (s, e) in enumerate(bounds)]
    run = lib.siftlens_layer_sums  # one call per span of images; ctypes releases the GIL during each
    codes = [run(*calls[0])] if workers == 1 else list(_pool(workers).map(lambda args: run(*args), calls))
    if any(c == 2 for c in codes):
        raise ValueError(f"fused layer_sums: {r} contraction rows (at most {MAX_ROWS})")
    return None if any(codes) else out
