"""Paged decode attention on CPU: a small C kernel that reads K/V in place through the block table.

The torch path gathers every sequence's K/V blocks into a dense padded tensor (one index_select
per layer) and then runs SDPA with an additive mask: at 32 decoding sequences that copy and the
tiny per-sequence matmuls were more than half of a decode step. The kernel (csrc/paged_attention.c)
walks each sequence's block table directly, one work item per (sequence, KV head), online
softmax in fp32, bf16 or fp32 in and out.

It is compiled on first use with the system C compiler (`-O3 -march=native`, the machine it runs
on) into a per-user cache keyed by the source, the flags, the compiler and the CPU, and loaded
with ctypes. The shared object links the libgomp torch already loaded (same soname, resolved to
the copy in the process), so its parallel loop runs on torch's own OpenMP team: a second OpenMP
runtime would bring a second set of spinning threads onto the same cores (see
native/executor.py for what oversubscription costs here). No compiler, a failed build or
LIGHTSPEED_PAGED_ATTENTION=0: a warning once, and the model keeps its torch path.

The SIMD path is picked at compile time from the compiler's predefined macros (csrc/isa.h):
AVX-512, else AVX2 + FMA, else the portable scalar code. LIGHTSPEED_KERNEL_ISA=avx512|avx2|scalar
forces one (avx2 on an AVX-512 CPU compiles with -mno-avx512f: an AVX2-only CPU, emulated), for
tests and benchmarks; the default, auto, is whatever -march=native gives. The ISA is part of the
cache key, and the library reports the one it was built with (`ls_kernel_isa`, logged at load).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
DISABLE_ENV = "LIGHTSPEED_PAGED_ATTENTION"  # "0": never build or use the kernel
CACHE_ENV = "LIGHTSPEED_KERNEL_CACHE"  # directory for built kernels (default ~/.cache/lightspeed)
ISA_ENV = "LIGHTSPEED_KERNEL_ISA"  # auto (default) | avx512 | avx2 | scalar
# Flags on top of -march=native per requested ISA. scalar also defines LS_PA_SCALAR: without
# AVX2 gcc still auto-vectorizes the plain C with SSE/AVX, but no intrinsics path is compiled.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "auto": (),
    "avx512": (),
    "avx2": ("-mno-avx512f",),
    "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-DLS_PA_SCALAR"),
}
# /proc/cpuinfo flags an ISA needs to run (the build would succeed without them, the code not).
ISA_CPU_FLAGS: dict[str, tuple[str, ...]] = {"avx512": ("avx512f",), "avx2": ("avx2", "fma")}
BASE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_GROUP = 16  # query heads per KV head; must match csrc
MAX_DIM = 256
_MADV_HUGEPAGE = 14  # linux/mman.h


class _Args(ctypes.Structure):
    """Mirror of `pa_args` in csrc/paged_attention.c."""

    _fields_ = [
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("query", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("context_lens", ctypes.c_void_p),
        *[
            (name, ctypes.c_int64)
            for name in ("num_seqs", "num_heads", "num_kv_heads", "head_dim", "block_size", "table_stride", "q_stride")
        ],
        ("scale", ctypes.c_float),
        ("is_bf16", ctypes.c_int),
    ]


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """How to build the kernel: the compiler, the SIMD path (a key of ISA_FLAGS) and any extra
    flags."""

    compiler: str = "gcc"
    extra_flags: tuple[str, ...] = ()
    isa: str = "auto"

    @property
    def flags(self) -> tuple[str, ...]:
        return (*BASE_FLAGS, *ISA_FLAGS.get(self.isa, ()), *self.extra_flags)


def default_spec() -> BuildSpec:
    """The spec the model loads: gcc, the ISA LIGHTSPEED_KERNEL_ISA names (auto when unset)."""
    return BuildSpec(isa=os.environ.get(ISA_ENV, "auto").strip().lower() or "auto")


class PagedDecodeAttention:
    """The loaded kernel. Call it with one query token per sequence."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib  # also holds the fused elementwise ops (models/fused_ops.py)
        self._fn = lib.ls_paged_decode_attention
        self._fn.argtypes = [ctypes.POINTER(_Args)]
        self._fn.restype = ctypes.c_int
        self.simd = bool(lib.ls_pa_simd())
        isa_fn = lib.ls_kernel_isa
        isa_fn.restype = ctypes.c_char_p
        self.isa: str = isa_fn().decode()  # the path compiled in: avx512, avx2 or scalar

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and dtype in SUPPORTED_DTYPES
            and num_kv_heads >= 1
            and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_GROUP
            and 1 <= head_dim <= MAX_DIM
        )

    def __call__(
        self,
        query: torch.Tensor,
        cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """query [B, heads, dim] (rows may be strided), cache [2, blocks, block_size, kv_heads,
        dim] contiguous, block_tables [B, max_blocks] int32, context_lens [B] int32 (>= 1 each,
        covered by the table). Returns [B, heads * dim] in the cache dtype."""
        batch, heads, dim = query.shape
        _check_inputs(query, cache, block_tables, context_lens)
        out = torch.empty(batch, heads * dim, dtype=cache.dtype)
        args = _Args(
            cache[0].data_ptr(),
            cache[1].data_ptr(),
            query.data_ptr(),
            out.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            batch,
            heads,
            cache.shape[3],
            dim,
            cache.shape[2],
            block_tables.stride(0),
            query.stride(0),
            scale,
            int(cache.dtype == torch.bfloat16),
        )
        if self._fn(ctypes.byref(args)) != 0:
            raise ValueError(f"paged attention: unsupported shape heads={heads} kv_heads={cache.shape[3]} dim={dim}")
        return out


def _check_inputs(
    query: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> None:
    """The kernel trusts raw pointers: reject anything laid out differently than it assumes."""
    if not cache.is_contiguous() or cache.dtype not in SUPPORTED_DTYPES or cache.dim() != 5:
        raise ValueError("cache must be a contiguous fp32/bf16 [2, blocks, bs, kv_heads, dim]")
    if query.dtype != cache.dtype or query.stride(2) != 1 or query.stride(1) != query.shape[2]:
        raise ValueError("query must be [B, heads, dim] in the cache dtype with dense heads")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError("block_tables rows and context_lens must be contiguous")
    if block_tables.shape[0] != query.shape[0] or context_lens.shape[0] != query.shape[0]:
        raise ValueError("one block table row and one context length per query")


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back a large CPU tensor with 2 MiB pages (call before first touch). Decode
    attention reads blocks scattered over the whole KV cache; with 4 KiB pages every block is a
    TLB miss that also evicts the weights' entries (measured: ~3 ms of a 32-sequence step).
    Best effort: a no-op where madvise or transparent huge pages are unavailable."""
    if t.device.type != "cpu" or platform.system() != "Linux":
        return
    page = 4096
    start = t.data_ptr() // page * page
    length = t.data_ptr() + t.numel() * t.element_size() - start
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- build + load


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lightspeed" / "kernels"


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on CPUs with the same feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}:{flags}"


def _check_isa(isa: str) -> None:
    """Refuse an unknown ISA, or one this CPU cannot run (it would die of SIGILL, not fall back)."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    cpu_flags = set(_cpu_fingerprint().split(":", 1)[1].split())
    missing = [f for f in ISA_CPU_FLAGS.get(isa, ()) if f not in cpu_flags]
    if missing:
        raise ValueError(f"{ISA_ENV}={isa}: this CPU lacks {', '.join(missing)}")


def runnable_isas() -> list[str]:
    """The forced ISAs this CPU can run, widest first (tests and benchmarks build each)."""
    cpu_flags = set(_cpu_fingerprint().split(":", 1)[1].split())
    return [isa for isa in ("avx512", "avx2", "scalar") if set(ISA_CPU_FLAGS.get(isa, ())) <= cpu_flags]


def _compiler_id(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else compiler


def _build(spec: BuildSpec) -> Path:
    """Compile (or reuse) the shared object; raises on any failure."""
    _check_isa(spec.isa)
    compiler = shutil.which(spec.compiler)
    if compiler is None:
        raise FileNotFoundError(f"C compiler {spec.compiler!r} not found")
    sources = [f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".c", ".h")]
    key = hashlib.sha256(
        b"\0".join(
            [
                *sources,
                " ".join(spec.flags).encode(),
                spec.isa.encode(),
                _compiler_id(compiler).encode(),
                _cpu_fingerprint().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = cache_dir() / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name, then rename: concurrent workers never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        # One shared object for every kernel in csrc/ (paged attention, fused elementwise ops).
        c_files = [str(f) for f in sorted(SOURCE.parent.glob("*.c"))]
        subprocess.run(
            [compiler, *spec.flags, *c_files, "-o", tmp, "-lm"], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built paged attention kernel %s (requested isa: %s)", target, spec.isa)
    return target


def build_kernel(spec: BuildSpec = BuildSpec()) -> PagedDecodeAttention:
    """Build and load the kernel now; raises if that fails. (torch, imported above, has already
    loaded its libgomp, so the kernel's libgomp.so.1 dependency resolves to that same copy.)"""
    path = _build(spec)
    kernel = PagedDecodeAttention(ctypes.CDLL(str(path)))
    # The ISA read back from the library, not the one asked for: the two can differ (e.g. a
    # compiler that ignores -march=native), and which path runs is what timings depend on.
    logger.info("CPU kernels (%s): %s SIMD path, %s=%s", path.name, kernel.isa, ISA_ENV, spec.isa)
    if spec.isa not in ("auto", kernel.isa):
        logger.warning("CPU kernels: asked for the %s path, the compiler gave %s", spec.isa, kernel.isa)
    return kernel


_lock = threading.Lock()
_loaded: dict[BuildSpec, PagedDecodeAttention | None] = {}


def load_kernel(spec: BuildSpec | None = None) -> PagedDecodeAttention | None:
    """The kernel, built once per process and spec (default: `default_spec()`); None (after one
    warning) when it cannot be had."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    spec = spec or default_spec()
    with _lock:
        if spec not in _loaded:
            try:
                _loaded[spec] = build_kernel(spec)
            except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as exc:
                detail = getattr(exc, "stderr", "") or ""
                logger.warning(
                    "paged attention kernel unavailable, using the torch path: %s %s", exc, detail.strip()[-2000:]
                )
                _loaded[spec] = None
        return _loaded[spec]


def kernel_isa() -> str:
    """The SIMD path the model's CPU kernels run with ("avx512", "avx2", "scalar"), or "torch"
    when the kernels are disabled or unavailable (the model then runs its torch path)."""
    kernel = load_kernel()
    return kernel.isa if kernel is not None else "torch"
