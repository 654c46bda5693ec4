"""advdetect: audit image classifiers for adversarial robustness and adversarial-input detection."""

from advdetect.features import confounding_gradient_features

__version__ = "0.1.0"
__all__ = ["confounding_gradient_features", "__version__"]
