"""noisejax: simulate, predict and mitigate noise in neural networks with JAX."""

from noisejax import errors, layers, noise, simulate

__version__ = "0.1.0"

__all__ = ["errors", "layers", "noise", "simulate", "__version__"]
