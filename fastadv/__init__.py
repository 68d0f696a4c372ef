"""fastadv: fast adversarial attacks and adversarial training on GPUs and CPUs."""
from ._version import __version__
from . import ops

__all__ = ["__version__", "ops"]
