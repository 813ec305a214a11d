import pytest

from megatron_matpo.model.builder import UnsupportedArchitecture, check_layout
from megatron_matpo.model.layout import LayoutError, ParallelLayout


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
