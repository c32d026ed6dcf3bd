"""Inference backends behind one small interface (:class:`Backend`)."""

from edgeseg.backends.base import Backend, TensorInfo

__all__ = ["Backend", "TensorInfo"]
