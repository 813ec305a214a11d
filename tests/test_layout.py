from pathlib import Path

import pytest

from megatron_matpo.model.builder import UnsupportedArchitecture, check_layout
from megatron_matpo.model.layout import LayoutError, ParallelLayout

REPO = Path(__file__).resolve().parents[1]


def test_bad_tp_names_field_and_numbers(tiny_models):
    with pytest.raises(LayoutError, match=r"parallel.tp: 3 does not divide num_attention_heads=4"):
        check_layout(tiny_models["qwen3"], ParallelLayout(tp=3))


def test_bad_pp_names_field_and_numbers(tiny_models):
    with pytest.raises(LayoutError, match=r"parallel.pp: 3 does not divide num_hidden_layers=4"):
        check_layout(tiny_models["llama"], ParallelLayout(pp=3))


def test_kv_heads_checked(tiny_models):
    with pytest.raises(LayoutError, match=r"num_key_value_heads=2"):
        check_layout(tiny_models["qwen3"], ParallelLayout(tp=4))


def test_good_layout_passes(tiny_models):
    assert check_layout(tiny_models["qwen2"], ParallelLayout(tp=2, pp=2, dp=3)).world_size == 12


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel"):
        check_layout(tmp_path, ParallelLayout())


def test_bundle_plan_per_stack():
    """Actor ranks, critic ranks, engines, then (stack 0 only) the tool server; colocated engines take
    no GPUs of their own."""
    from megatron_matpo.orchestrate.bringup import plan_bundles

    cpu = plan_bundles(1, 2, False, 1, 1, 0.0, False, True)  # the MATPO toy: DP=2 + engine + tools, on CPU
    assert cpu.bundles == [{"CPU": 1}] * 4 and cpu.sizes == [4] and cpu.ranks == 2 and cpu.offset(0) == 0
    # MAPoRL, 2 distinct policies with a critic each, TP=2 engines, 1 GPU per rank, no tool server
    gpu = plan_bundles(2, 4, True, 1, 2, 1.0, False, False)
    assert gpu.sizes == [9, 9] and gpu.offset(1) == 9 and gpu.ranks == 8
    assert gpu.bundles[:8] == [{"CPU": 1, "GPU": 1.0}] * 8 and gpu.bundles[8] == {"CPU": 1, "GPU": 2.0}
    colo = plan_bundles(1, 4, False, 2, 2, 1.0, True, True)
    assert colo.engine_gpus == 0.0 and colo.bundles[4:] == [{"CPU": 1}] * 3


@pytest.mark.slow
def test_placement_larger_than_the_ray_cluster_is_refused_at_once(tmp_path):
    """A placement the Ray cluster cannot hold is one ConfigError with both numbers, not a wait of
    orchestrate.placement_timeout_s (a real 2-CPU Ray cluster; 8 one-CPU bundles asked)."""
    import ray

    from megatron_matpo import config
    from megatron_matpo.config import ConfigError
    from megatron_matpo.orchestrate.bringup import _check_fits, plan_for
    from megatron_matpo.train.config import TrainConfig

    cfg = config.load(TrainConfig, REPO / "configs/tiny_cpu.yaml", [f"run_dir={tmp_path}", "actor.dp=3"]).validate()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        with pytest.raises(ConfigError, match=r"orchestrate: the placement \(1 x \(6 actor ranks \+ 1 engine\(s\)\) "
                                              r"\+ the tool server\) needs 8 CPUs, the cluster has 2"):
            _check_fits(plan_for(cfg, 0.0))
    finally:
        ray.shutdown()
