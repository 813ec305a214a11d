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
    # MAPoRL's served verifier: one more bundle in stack 0 only (a GPU of its own unless colocated)
    ver = plan_bundles(2, 4, False, 1, 2, 1.0, False, False, verifier_engine=True)
    assert ver.sizes == [6, 5] and ver.bundles[5] == {"CPU": 1, "GPU": 1.0} and ver.offset(1) == 6
    assert "verifier" in ver.what


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


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("config,error", [
    ({"rope_theta": 1e6}, None),  # plain RoPE, as older configs write it
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, None),  # ... and transformers 5
    ({"rope_scaling": LLAMA3}, None),  # Llama-3.1 (the tiny llama's: equal logits, tests/test_megatron_parity.py)
    ({"rope_parameters": dict(LLAMA3, original_max_position_embeddings=4096)},
     "rope_parameters.original_max_position_embeddings: 4096 is not supported with rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type: 'linear' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type: 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type: 'dynamic' is not supported"),
])
def test_rope_variants_equal_transformers_or_are_refused_by_field(config, error):
    from megatron_matpo.model.rope import check_rope

    if error is None:
        check_rope(config)
    else:
        with pytest.raises(LayoutError, match="^" + error.replace("(", r"\(")):
            check_rope(config, "m")


def test_unsupported_rope_refused_before_anything_starts(tiny_models, tmp_path, capsys):
    """`matpo train` on a Llama whose rope scaling megatron-core does not reproduce: one line, exit 2."""
    import json
    import shutil

    from megatron_matpo.cli import main

    model = tmp_path / "llama-rope4096"
    shutil.copytree(tiny_models["llama"], model)
    cfg = json.loads((model / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["original_max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "data.parquet").write_bytes(b"")
    (tmp_path / "corpus.jsonl").write_text("")
    rc = main(["train", "--config", str(REPO / "configs/tiny_cpu.yaml"), f"model={model}",
               f"data={tmp_path}/data.parquet", f"corpus={tmp_path}/corpus.jsonl", f"run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("matpo train: error: rope_"), err
    assert "original_max_position_embeddings: 4096" in err, err
    assert f"(model: {model})" in err and not (tmp_path / "run").exists()
