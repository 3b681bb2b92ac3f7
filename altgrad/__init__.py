"""AltGrad: which 8-bit float format benefits most from geometry-aware weight updates?"""

from .runtime import configure_threads

__version__ = "0.1.0"

configure_threads()  # before anything imports torch: threads that fit the CPUs this process may use
