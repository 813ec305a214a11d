"""Not flashinfer: SGLang engines on CPU see this package instead of the real one (see
megatron_matpo/compat.py, `sglang_cpu_pythonpath`)."""
raise ImportError("flashinfer is not imported in CPU SGLang engine processes (megatron_matpo/compat.py)")
