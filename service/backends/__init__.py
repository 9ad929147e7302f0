"""Engine backends behind one Protocol (``base.py``): ``tensorrt`` (enterprise TensorRT 10/11 + cuda-python,
GPU only), ``tensorrt-rtx`` (ahead-of-time builds on any host) and ``onnxruntime`` (CPU).

Look backends up through ``registry.get_backend`` / ``resolve_backend``; nothing here imports a heavy
library at import time.
"""
