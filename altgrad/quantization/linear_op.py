"""The GEMMs of a quantized Linear as a C++ autograd function (``linear_op.cpp``), and the casts
of its operand streams in the common configuration.

Why: at nanoGPT-small sizes on a CPU a training step runs 17 quantized Linears, and the Python
autograd Function cost about 15 us a forward and 27 us a backward more than this node (its
apply, its Python backward and a dozen tensor calls from Python; measured on a tiny layer, one
thread: 208 -> 166 us a forward and backward, against 94 us for ``nn.Linear``), about 1.5% of a
BF16 step. The C++ function does the same arithmetic op for op (bit-identical, tested against
`linear._QuantizedLinearFunction`, which stays the reference and the fallback).

Casts are Python's where a stream needs its state (scale histories, random streams,
statistics): the operands then arrive cast, and the backward calls Python back once, for the
gradient cast. A stream in the common configuration (nearest rounding, current power-of-two
amax scaling; see `native_stream`) gets a ``NativeStream``: the layer's forward then casts x and
the weight, runs the GEMMs and its backward casts the gradient all in C++, calling the same
native.c kernel with the same arguments as ``native.cast`` (bit-identical, tested), without the
~8 us of Python and ctypes around each of a step's 51 casts. Python casts the streams whenever
they collect statistics, and every other configuration.

It is built with the first quantized layer, by torch's extension builder and the system C++
compiler (about 30 s, once), and cached in ``$ALTGRAD_CACHE_DIR/linear_op``. Where it cannot be
built, `module()` returns None once and for all: the Python Function is used and every cast is
Python's.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from types import ModuleType

import torch

from . import native
from .formats import FloatFormat
from .kernel import native_nearest_fits
from .native import SOURCE, cache_dir
from .quantize import _params

log = logging.getLogger(__name__)

_state: dict = {}
_lock = threading.Lock()


def _build() -> ModuleType:
    import warnings

    from torch.utils import cpp_extension

    directory = cache_dir() / "linear_op"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):  # a first build takes a while: say why the run waits
        print("altgrad: building the C++ quantized-linear op (once, about 30 s)", file=sys.stderr, flush=True)
    with warnings.catch_warnings():  # torch's note that ninja is missing: it builds without it
        warnings.simplefilter("ignore")
        module = cpp_extension.load("altgrad_linear_op", [str(SOURCE.with_name("linear_op.cpp"))],
                                    extra_cflags=["-O2", "-ffp-contract=off"], build_directory=str(directory),
                                    verbose=False)
    return module


def module() -> ModuleType | None:
    """The built extension, building it if needed; None (logged once) where it cannot be had."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # noqa: BLE001 - any build or load failure: use the Python Function
                lines = str(error).strip().splitlines() or [type(error).__name__]
                _state["error"] = next((line.strip() for line in lines if "error:" in line), lines[-1])
                _state["module"] = None
                log.warning("C++ quantized-linear op unavailable (%s); using the Python autograd Function",
                            _state["error"])
    return _state["module"]


def native_stream(fmt: FloatFormat | None, rounding: str, mode: str, power_of_two: bool, margin: int):
    """A ``NativeStream`` for an operand stream of this configuration, or None: Python casts it.

    The configuration is the one `scaling.cast_operand` sends to ``native.cast`` with no scale
    history and no random bits: nearest rounding, current amax scaling, power-of-two scales, a
    format whose nearest rounding native.c makes exactly. None also where the extension or
    native.c cannot be had.
    """
    if (fmt is None or rounding != "nearest" or mode != "current" or not power_of_two
            or not native_nearest_fits(fmt.mantissa_bits, fmt.emin, fmt.max)):
        return None
    built, lib = module(), native.library()
    if built is None or lib is None:
        return None
    kernel = ctypes.cast(lib.altgrad_cast, ctypes.c_void_p).value
    return built.NativeStream(kernel, _params(fmt, True, torch.device("cpu")), margin)


def unavailable_reason() -> str | None:
    return _state.get("error") if module() is None else None
