"""The native CPU kernel (``native.c``): the operand cast and rounding without dispatch cost.

Why: on CPU at nanoGPT-small sizes an FP8 step makes ~50 casts of 10^4 to 10^6 elements, and
a torch.compile'd kernel costs ~40 us of Python dispatch per call before any work, plus a
float32 output that must be cast again. The C kernel is called through ctypes (a few us),
reads float32 or bfloat16, writes the GEMM dtype directly, and is bit-identical to the
torch kernels: nearest rounding where `kernel.native_nearest_fits`, stochastic rounding for
every format (tested on every bfloat16 value, across float32 and against gfloat).

It is compiled on first use with the system C compiler (``$CC``, else ``cc``), for the
machine it runs on, and cached in ``$ALTGRAD_CACHE_DIR`` (default ``~/.cache/altgrad``)
under a name that hashes the source, the flags and the CPU. Without a compiler, or where
the build fails, `library()` returns None once and for all and callers use the torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
               "-Wno-unknown-pragmas"]
_BUILD_TIMEOUT_S = 300

_state: dict = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    configured = os.environ.get("ALTGRAD_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "altgrad"


def _cpu_flags() -> str | None:
    """The CPU's feature flags where Linux lists them: what a -march=native build depends on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return None


def _torch_uses_libgomp() -> bool:
    """Whether this process runs GNU OpenMP (pip's Linux torch): then an -fopenmp build shares
    torch's thread pool. Another runtime (libomp, Intel's) must not be loaded beside it."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _flag_sets() -> list[list[str]]:
    """Builds to try, best first: -march=native only where the cache key can name the CPU."""
    native = ["-march=native"] if _cpu_flags() is not None else []
    sets = [native + ["-fopenmp"]] if _torch_uses_libgomp() else []
    return sets + [native] + ([[]] if native else [])


def _build(compiler: list[str], flags: list[str]) -> Path:
    """The library built with these flags (cached); RuntimeError with the compiler's first error."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler).encode(), " ".join(flags).encode(),
                                     (_cpu_flags() or platform.machine()).encode()])).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: it holds code we load
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            error = next((line for line in lines if "error" in line), lines[-1] if lines else "")
            raise RuntimeError(f"{' '.join(compiler)} could not build {SOURCE.name}: "
                               f"{error or f'exit code {result.returncode}'}")
        os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
    return target


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The first flag set that builds and loads: an OpenMP build can compile and still not load
    (clang's OpenMP needs libomp), so loading is part of the test."""
    errors = []
    for extra in _flag_sets():
        try:
            return _bind(_build(compiler, _BASE_FLAGS + extra))
        except (OSError, RuntimeError) as error:
            errors.append(str(error))
    raise RuntimeError(errors[-1] if len(set(errors)) == 1 else "; ".join(errors))


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.altgrad_cast.argtypes = [p, ctypes.c_int, i64, p, p, i32, p, p, ctypes.c_int, ctypes.c_int, p, ctypes.c_int, p,
                                 ctypes.c_float]
    lib.altgrad_cast.restype = ctypes.c_float
    lib.altgrad_round.argtypes = [p, ctypes.c_int, i64, ctypes.c_float, p, p, p, ctypes.c_int, ctypes.c_int]
    lib.altgrad_round.restype = None
    lib.altgrad_measure.argtypes = [p, ctypes.c_int, p, ctypes.c_int, i64, ctypes.c_float, ctypes.c_float,
                                     ctypes.c_float, ctypes.c_float, p, p, p, ctypes.c_int]
    lib.altgrad_measure.restype = None
    lib.altgrad_nonzero_columns.argtypes = [p, ctypes.c_int, i64, i64, p]
    lib.altgrad_nonzero_columns.restype = None
    lib.altgrad_random_bits.argtypes = [i64, i64, p, p]
    lib.altgrad_random_bits.restype = None
    lib.altgrad_amax_bits.argtypes = [p, ctypes.c_int, i64, ctypes.c_int]
    lib.altgrad_amax_bits.restype = i32
    lib.altgrad_manifold_step.argtypes = [p, p, p, p, i64, p, i32, i32, i32, ctypes.c_int]
    lib.altgrad_manifold_step.restype = None
    lib.altgrad_adam_step.argtypes = [p, p, p, p, i64, p, ctypes.c_int]
    lib.altgrad_adam_step.restype = None
    lib.altgrad_grid_step.argtypes = [p, p, p, p, i64, p, i32, i32, i32, i32, p, p, i32, p, ctypes.c_int]
    lib.altgrad_grid_step.restype = None
    lib.altgrad_project.argtypes = [p, i64, p, i32, p, ctypes.c_int]
    lib.altgrad_project.restype = ctypes.c_float
    lib.altgrad_amax_scale.argtypes = [p, i64, i32, i32, ctypes.c_int]
    lib.altgrad_amax_scale.restype = ctypes.c_float
    lib.altgrad_update_stats.argtypes = [p, p, ctypes.c_float, p, i64, i32, i32, p, ctypes.c_int]
    lib.altgrad_update_stats.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None (logged once) where it cannot be had."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:  # one build; other threads wait for it rather than see a half-made state
        if "lib" not in _state:
            compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # CC may carry arguments
            try:
                if shutil.which(compiler[0]) is None:
                    raise RuntimeError(f"no C compiler ({compiler[0]!r} not found; set CC)")
                lib = _load(compiler)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _state["error"] = str(error)
                lib = None
                log.warning("native quantize kernel unavailable (%s); using the torch kernels", error)
            _state["lib"] = lib
    return _state["lib"]


def unavailable_reason() -> str | None:
    return _state.get("error") if library() is None else None


def reset() -> None:
    """Forget the loaded library (tests; a changed ``CC`` or cache directory)."""
    _state.clear()


def supports(x: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the native kernel can take this tensor: on CPU, float32 or bfloat16 in and out."""
    return x.device.type == "cpu" and x.dtype in _TYPES and out_dtype in _TYPES and x.numel() > 0


def _seed_words(seed: torch.Tensor | None) -> ctypes.Array | None:
    """The two int64 seed words of the stochastic kernel (`quantize.draw_seed`), or None: nearest.
    A ctypes array owns its memory, so no temporary tensor can be freed under the C call."""
    return None if seed is None else (ctypes.c_int64 * 2)(*(int(word) for word in seed.tolist()))


def cast(x: torch.Tensor, params: torch.Tensor, reference_amax: torch.Tensor | float | None, margin: int,
         out_dtype: torch.dtype, seed: torch.Tensor | None = None, dequantize: bool = False, guess: float = 0.0
         ) -> tuple[torch.Tensor, float, float, bool]:
    """``(values, scale, amax(x), dequantized)`` with a power-of-two scale: `scaling.cast_to_grid`'s
    contract, with the scale and amax as Python floats (no tensor ops for scalars on CPU). The
    values are ``q(x * scale)``, or with ``dequantize`` ``q(x * scale) / scale`` where
    `scaling.dequantize_exact` holds (then ``dequantized`` is True). Nearest rounding where
    ``seed`` is None (formats where `kernel.native_nearest_fits`), else stochastic rounding with
    the random bits of `kernel.random_bits` (any format). ``guess``: a likely scale (the
    stream's last one) for a one-pass cast; the result never depends on it (``native.c``)."""
    x = x.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)  # x is a contiguous CPU tensor: so is out (1 us faster)
    amax, dequantized = ctypes.c_float(), ctypes.c_int()
    margin = max(-1024, min(1024, margin))  # beyond +-300 every scale is clamped alike; no int overflow in C
    reference = None if reference_amax is None else ctypes.byref(ctypes.c_float(float(reference_amax)))
    scale = library().altgrad_cast(x.data_ptr(), _TYPES[x.dtype], x.numel(), reference, params.data_ptr(), margin,
                                   _seed_words(seed), out.data_ptr(), _TYPES[out_dtype], torch.get_num_threads(),
                                   ctypes.byref(amax), int(dequantize), ctypes.byref(dequantized), guess)
    return out, scale, amax.value, bool(dequantized.value)


def round_to_grid(x: torch.Tensor, params: torch.Tensor, out_dtype: torch.dtype, scale: float = 1.0,
          seed: torch.Tensor | None = None) -> torch.Tensor:
    """``q(x * scale)``: `kernel.round_nearest_by_scaling` (seed None) or the stochastic
    branch of `kernel.round_float32_bits` (seed given), bit for bit."""
    x = x.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    library().altgrad_round(x.data_ptr(), _TYPES[x.dtype], x.numel(), scale, params.data_ptr(), _seed_words(seed),
                            out.data_ptr(), _TYPES[out_dtype], torch.get_num_threads())
    return out


def measure(x: torch.Tensor, scale: float, q: torch.Tensor, fmt_min: float, fmt_max: float, q_scale: float = 1.0
            ) -> tuple[int, int, float, float, int]:
    """One pass over a cast: (overflow, underflow, signal energy, noise energy, how many of the
    format's binades (float32 exponent fields) occur in q) with ``x * scale`` formed on the fly;
    `scaling.measure_quantization`'s quantities (the float sums agree to rounding, their order
    differs). ``fmt_min``, ``fmt_max``: the format's least positive and largest values. A
    dequantized cast's values (``q / scale``) are measured with ``q_scale = scale``."""
    x, q = x.contiguous(), q.contiguous()
    counts = (ctypes.c_int64 * 2)()
    sums = (ctypes.c_double * 2)()
    present = (ctypes.c_uint8 * 256)()
    library().altgrad_measure(x.data_ptr(), _TYPES[x.dtype], q.data_ptr(), _TYPES[q.dtype], x.numel(), scale, q_scale,
                              fmt_min, fmt_max, counts, sums, present, torch.get_num_threads())
    return counts[0], counts[1], sums[0], sums[1], bytes(present).count(1)


def nonzero_columns(q: torch.Tensor) -> torch.Tensor:
    """Per column of q (its last dimension): whether any row holds a non-zero value (bool)."""
    q = q.contiguous()
    alive = torch.zeros(q.shape[-1], dtype=torch.uint8)
    library().altgrad_nonzero_columns(q.data_ptr(), _TYPES[q.dtype], q.numel() // max(q.shape[-1], 1), q.shape[-1],
                                      alive.data_ptr())
    return alive.bool()


def random_bits(start: int, n: int, seed: torch.Tensor) -> torch.Tensor:
    """The stochastic kernel's 30 random bits for flat indices start .. start + n - 1 (int32)."""
    out = torch.empty(n, dtype=torch.int32, device="cpu")
    library().altgrad_random_bits(start, n, _seed_words(seed), out.data_ptr())
    return out


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| (NaN if any NaN), as a float32 scalar tensor."""
    x = x.contiguous()  # held while C reads it
    bits = library().altgrad_amax_bits(x.data_ptr(), _TYPES[x.dtype], x.numel(), torch.get_num_threads())
    return torch.tensor(bits, dtype=torch.int32, device="cpu").view(torch.float32)


def _floats(values: list[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)  # each rounded to float32, as torch rounds a Python scalar


def manifold_step(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: list[float],
                  emin: int, mantissa: int, top_binade: int) -> None:
    """ManifoldAdamW's step on one float32 tensor, in place (``native.c``; the hyper layout is there)."""
    library().altgrad_manifold_step(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(),
                                    _floats(hyper), emin, mantissa, top_binade, torch.get_num_threads())


def adam_step(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: list[float]) -> None:
    """AdamW's step on one float32 tensor, in place, in the operation order of the other steps."""
    library().altgrad_adam_step(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(), _floats(hyper),
                                torch.get_num_threads())


def grid_step(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: list[float], emin: int,
              mantissa: int, top_code: int, clip: int, table: torch.Tensor, seed: torch.Tensor | None,
              sr_bits: int | None = None) -> tuple[int, int, int]:
    """GridOptim's step on one float32 tensor, in place: (flips, updates, moves stopped at the top).
    ``sr_bits``: the random bits of a stochastic move (`grid.random_rungs`; None: the exact rule)."""
    counts = (ctypes.c_int64 * 3)()
    few_bits = 0 if sr_bits is None else int(sr_bits)
    if sr_bits is not None and not 1 <= few_bits <= 30:
        raise ValueError(f"sr_bits must be from 1 to 30 (or None), got {sr_bits!r}")
    library().altgrad_grid_step(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(), _floats(hyper),
                                emin, mantissa, top_code, clip, table.data_ptr(), _seed_words(seed), few_bits, counts,
                                torch.get_num_threads())
    return counts[0], counts[1], counts[2]


def project(w: torch.Tensor, params: torch.Tensor, margin: int, seed: torch.Tensor | None) -> float:
    """``w <- q(w s) / s`` in place with s the power-of-two amax scale of w (one pass after
    the amax), nearest or stochastic as `cast`; returns s."""
    return library().altgrad_project(w.data_ptr(), w.numel(), params.data_ptr(), max(-1024, min(1024, margin)),
                                     _seed_words(seed), torch.get_num_threads())


def amax_scale(x: torch.Tensor, max_bits: int, margin: int) -> float:
    """`scaling.pow2_scale` of amax(x) for a float32 tensor (``max_bits``: the format's max as
    float32 bits), as `cast` would choose it."""
    return library().altgrad_amax_scale(x.data_ptr(), x.numel(), max_bits, max(-1024, min(1024, margin)),
                                        torch.get_num_threads())


def update_stats(before: torch.Tensor, after_scaled: torch.Tensor, after_inverse: float, grad: torch.Tensor,
                 emin: int, mantissa_bits: int) -> tuple[int, int, int, int, int]:
    """(updates, flips, stalled, code sum, code sum of squares) of one weight's step on its grid,
    in one pass (float32 CPU tensors; `monitors.updates.step_counts` defines them)."""
    out = (ctypes.c_int64 * 5)()
    library().altgrad_update_stats(before.data_ptr(), after_scaled.data_ptr(), after_inverse, grad.data_ptr(),
                                   before.numel(), emin, mantissa_bits, out, torch.get_num_threads())
    return out[0], out[1], out[2], out[3], out[4]


def fits_step(*tensors: torch.Tensor) -> bool:
    """Whether the optimizer kernels can take these tensors: CPU, float32, contiguous."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
