"""Ray orchestration: the cluster, the actor ranks (one torch.distributed world), the services
(SGLang engines, the MCP tool server) placed with placement groups. The Ray seam.

A Ray worker imports this package before the module of the actor it hosts, so it prepares the process
here, before anything else is imported (compat.prepare_process; on a joined cluster Ray's
worker_process_setup_hook has already run it)."""
from megatron_matpo.compat import prepare_process

prepare_process()
