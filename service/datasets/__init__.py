"""Calibration and held-out datasets: intake of uploads (archives, arrays, image preprocessing) and the
stored form (set info, batched reading, binding to a model's inputs). No calibration math here.
"""
