"""`python -m megatron_matpo.rollout.sglang_main ARGS`: `sglang.launch_server ARGS` for CPU engines,
with SGLang's scheduler and detokenizer processes forked instead of spawned (see
`compat.sglang_fork_children`: they inherit the imports instead of repeating them), and their imports
made cheaper: `compat.cache_packages_distributions`, and `compat.lazy_torch_compile` for the server's
life (the scheduler decorates functions with torch.compile while it starts, e.g. its diffusion-LM
algorithms; they compile on their first call, which a CPU engine never makes)."""
import runpy

from megatron_matpo.compat import cache_packages_distributions, lazy_torch_compile, sglang_fork_children

if __name__ == "__main__":
    sglang_fork_children()
    cache_packages_distributions()
    with lazy_torch_compile():
        runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
