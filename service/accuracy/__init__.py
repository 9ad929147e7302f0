"""Accuracy of a quantized model against FP32: what the outputs mean (tasks), the task metrics, the
per-output comparison and the FP32 reference runs. Below quantize/ and reports/, which both judge by it.
"""
