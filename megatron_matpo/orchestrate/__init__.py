"""Ray orchestration: the cluster, the actor ranks (one torch.distributed world), the services
(SGLang engines, the MCP tool server) placed with placement groups. The Ray seam.

A Ray worker imports this package before the module of the actor it hosts: library probes are quieted
here, before anything else is imported (on a joined cluster Ray's worker_process_setup_hook also does it),
and transformers' import made cheaper (compat.cache_packages_distributions)."""
from megatron_matpo.compat import cache_packages_distributions, quiet_library_noise

quiet_library_noise()
cache_packages_distributions()
