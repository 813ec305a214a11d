"""`matpo convert` end to end through the real launcher, resharding across layouts."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _matpo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_matpo.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_layout_fails_fast_with_numbers(tiny_models, tmp_path):
    r = _matpo("convert", "hf-to-megatron", tiny_models["qwen3"], str(tmp_path / "x"), "--tp", "3", timeout=120)
    assert r.returncode == 2
    assert "parallel.tp=3 does not divide num_attention_heads=4" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing was launched or written


@pytest.mark.slow
def test_convert_reshards_tp2_to_pp2(tiny_models, tmp_path):
    from safetensors.torch import load_file

    src, ckpt, out = tiny_models["llama"], tmp_path / "ckpt", tmp_path / "hf"
    r = _matpo("convert", "hf-to-megatron", src, str(ckpt), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _matpo("convert", "megatron-to-hf", str(ckpt), str(out), "--pp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(f"{src}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
