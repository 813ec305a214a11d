"""Not megatron: SGLang engines on CPU see this package instead of the real one (see
megatron_matpo/compat.py, `sglang_cpu_pythonpath`)."""
raise ImportError("megatron is not imported in SGLang engine processes (megatron_matpo/compat.py)")
