"""bf16 on the CPU: allowed where the CPU has native bf16 units, refused with one line elsewhere."""

from __future__ import annotations

import pytest
import torch

from mnist_ldm.device import BF16_CPU_FLAGS, cpu_has_native_bf16, resolve_precision, runtime
from mnist_ldm.errors import UserError

NATIVE = cpu_has_native_bf16()


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_tile amx_bf16 amx_int8", True), ("fpu avx512_bf16x", False)])
def test_native_bf16_is_read_from_the_kernel_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(info)) is native
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_bf16_on_this_cpu_is_allowed_exactly_when_native():
    if NATIVE:
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    else:
        with pytest.raises(UserError, match=f"no native bf16 units.*{BF16_CPU_FLAGS[0]}.*use fp32"):
            resolve_precision("bf16", torch.device("cpu"))
    with pytest.raises(UserError, match="not a precision; valid: fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 units")
def test_cpu_autocast_computes_in_bf16_with_fp32_weights():
    rt = runtime("cpu", "bf16")
    layer = torch.nn.Linear(64, 64)
    with rt.autocast():
        y = layer(torch.randn(8, 64))
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
