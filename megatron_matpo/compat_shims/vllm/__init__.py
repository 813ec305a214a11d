"""Not vLLM. A one-function stand-in so SGLang's generic (non-Intel) CPU path can import
`vllm._custom_ops.rotary_embedding`; see megatron_matpo/compat.py."""
