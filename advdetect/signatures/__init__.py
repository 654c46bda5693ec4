"""Model passes that detectors read: batched inference, layer activations and the confounding-label gradient
features. Imports no attack code and no stage.
"""
