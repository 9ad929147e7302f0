"""TensorRT INT8/FP16 engine-building service."""

__version__ = "0.1.0"
