"""The CPU integer class decides the INT8 weight range of ONNX Runtime engines and is in their key."""

from __future__ import annotations

import numpy as np
import pytest

from service.backends.cpu_isa import cpu_isa_from_flags, host_cpu_isa
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.data_factory import classifier_samples
from tests.model_factory import resnet_block_classifier
from tests.quantize.support import amax_by_running


@pytest.mark.parametrize(
    ("flags", "isa", "weight_max"),
    [
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "avx512-vnni", 127),
        ({"avx2", "avx_vnni"}, "avx-vnni", 127),
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}, "amx", 127),
        ({"avx2", "avx512f", "avx512bw"}, "avx512", 64),
        ({"avx2", "fma"}, "avx2", 64),
        ({"sse4_2"}, "other", 64),
    ],
)
def test_u8s8_saturating_classes_get_seven_bit_weights(flags: set[str], isa: str, weight_max: int) -> None:
    found = cpu_isa_from_flags(flags)
    assert found.isa == isa and found.int8_weight_max == weight_max
    assert cpu_isa_from_flags(set(), "aarch64").int8_weight_max == 127


def test_the_forced_class_is_part_of_the_engine_device() -> None:
    assert host_cpu_isa("avx2").forced and host_cpu_isa("avx2").int8_weight_max == 64
    vnni = OnnxRuntimeBackend(cpu_isa="avx512-vnni").describe().device
    avx2 = OnnxRuntimeBackend(cpu_isa="avx2").describe().device
    assert "int8 avx512-vnni" in vnni and "int8 avx2" in avx2 and vnni != avx2
    with pytest.raises(ValueError, match="unknown CPU ISA class"):
        host_cpu_isa("avx3")


def test_seven_bit_weights_fit_a_16_bit_pair_of_u8_products() -> None:
    model = resnet_block_classifier()
    batches = [{"input": classifier_samples(8)}]
    amax = amax_by_running(model, tensors_to_calibrate(model, target="onnxruntime"), batches)
    result = qdq_model_from_scales(model, amax, target="onnxruntime", ort_weight_max=64)
    weights = [
        np.frombuffer(t.raw_data, dtype=np.int8) if t.raw_data else np.array(t.int32_data)
        for t in result.model.graph.initializer
        if t.data_type == 3 and t.name.endswith("_int8")  # INT8 weight initializers
    ]
    assert weights and all(int(np.abs(w).max()) <= 64 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == 64  # the range is used, not just capped
    assert 2 * 255 * 64 <= 32767
