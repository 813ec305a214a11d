"""The model classes our SGLang engines serve, registered through `SGLANG_EXTERNAL_MODEL_PACKAGE`
(see `megatron_matpo.compat.sglang_engine_env`): SGLang imports this package's modules instead of its
own ~260 model modules. An architecture not listed in `served.py` still loads: SGLang then imports its
whole registry, as it would have without this package."""
