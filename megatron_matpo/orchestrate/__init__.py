"""Ray orchestration: the cluster, the actor ranks (one torch.distributed world), the services
(SGLang engines, the MCP tool server) placed with placement groups. The Ray seam."""
