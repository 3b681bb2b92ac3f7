"""The GEMMs of a quantized Linear as a C++ autograd function (``linear_op.cpp``).

Why: at nanoGPT-small sizes on a CPU a training step runs 17 quantized Linears, and the Python
autograd Function cost about 15 us a forward and 27 us a backward more than this node (its
apply, its Python backward and a dozen tensor calls from Python; measured on a tiny layer, one
thread: 208 -> 166 us a forward and backward, against 94 us for ``nn.Linear``), about 1.5% of a
BF16 step. The C++ function does the same arithmetic op for op (bit-identical, tested against
`linear._QuantizedLinearFunction`, which stays the reference and the fallback); the casts stay in
Python, which owns the scale histories, random streams and statistics, and the backward calls
Python back once, for the gradient cast.

It is built with the first quantized layer, by torch's extension builder and the system C++
compiler (about 30 s, once), and cached in ``$ALTGRAD_CACHE_DIR/linear_op``. Where it cannot be
built, `function()` returns None once and for all and the Python Function is used.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from .native import SOURCE, cache_dir

log = logging.getLogger(__name__)

_state: dict = {}
_lock = threading.Lock()


def _build() -> Callable:
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
    return module.quantized_linear


def function() -> Callable | None:
    """``quantized_linear(x, weight, bias, qx, qw, sx, sw, exact, wide, out_dtype, cast_gradient)``,
    building it if needed; None (logged once) where it cannot be had."""
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" not in _state:
            try:
                _state["fn"] = _build()
            except Exception as error:  # noqa: BLE001 - any build or load failure: use the Python Function
                lines = str(error).strip().splitlines() or [type(error).__name__]
                _state["error"] = next((line.strip() for line in lines if "error:" in line), lines[-1])
                _state["fn"] = None
                log.warning("C++ quantized-linear op unavailable (%s); using the Python autograd Function",
                            _state["error"])
    return _state["fn"]


def unavailable_reason() -> str | None:
    return _state.get("error") if function() is None else None
