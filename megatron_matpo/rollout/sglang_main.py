"""`python -m megatron_matpo.rollout.sglang_main ARGS`: `sglang.launch_server ARGS` for CPU engines,
with SGLang's scheduler and detokenizer processes forked instead of spawned (see
`compat.sglang_fork_children`: they inherit the imports instead of repeating them)."""
import runpy

from megatron_matpo.compat import sglang_fork_children

if __name__ == "__main__":
    sglang_fork_children()
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
