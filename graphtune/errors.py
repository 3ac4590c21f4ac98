"""Exceptions graphtune raises on purpose, so callers can tell them from model bugs."""


class GraphtuneError(Exception):
    """Base class."""


class CaptureError(GraphtuneError):
    """The model's forward could not be captured as one graph, or the graph cannot serve the inputs."""


class VerificationError(GraphtuneError, AssertionError):
    """``verify=True`` found outputs or gradients that differ from eager; the message names the pass."""
