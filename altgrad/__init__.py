"""AltGrad: which 8-bit float format benefits most from geometry-aware weight updates?"""

__version__ = "0.1.0"
