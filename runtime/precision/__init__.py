"""The `precision` section at run time.

`formats` holds the exact quantize/dequantize of planlang's low-precision number formats
(fp8_e4m3, fp8_e5m2, mxfp8, nvfp4, mxfp4), in plain PyTorch on any device; `blackwell`
their native GEMM on sm_100+ (the packed layout and `torch._scaled_mm`); `kv_cache` the
FP8 KV cache.
"""
