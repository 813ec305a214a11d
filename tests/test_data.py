import hashlib
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_matpo.agents.prompts import planner_user_prompt, single_user_prompt, system_prompt
from megatron_matpo.data import (
    DatasetError, MultihopConfig, avg_at_k, expand_repeats, generate, read_corpus, read_dataset,
    repeat_k_from_name, sample_from_row, write_multihop, write_parquet,
)
from megatron_matpo.data.schema import check_repeats
from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS

SMALL = MultihopConfig(seed=3, n_entities=60, n_train=24, n_val=8, val_repeat=2)


def musique_row(i: int, gt: str = "1994") -> dict:
    """Shaped exactly like a matpo_train_musique row of MATPO-data."""
    return {
        "dataset": "musique_train",
        "data_source": "musique_train",
        "prompt": [{"content": "\nIn this environment you have access to a set of tools...", "role": "system"},
                   {"content": f"Question {i}?\n\nPut the answer in \\boxed{{}}.", "role": "user"}],
        "ability": "qa",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {
            "answer": gt, "evidence_list": [], "index": i, "need_tools_kwargs": True,
            "question": f"What year saw the creation of region {i}?", "question_type": "inference_query",
            "split": "test",
            "tools_kwargs": {"google_search": {"create_kwargs": {"ground_truth": gt}},
                             "scrape": {"create_kwargs": {"ground_truth": gt}}},
        },
    }


def write_raw(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----- MATPO-data rows -----

def test_reads_matpo_data_shaped_rows(tmp_path):
    f = write_raw([musique_row(1), musique_row(2, "1999")], tmp_path / "matpo_train_musique" / "train-00000.parquet")
    ds = read_dataset(f.parent)
    assert ds.name == "matpo_train_musique" and ds.repeat_k == 1 and len(ds) == 2
    s = ds[1]
    assert s.question == "What year saw the creation of region 2?" and s.ground_truth == "1999"
    assert s.index == 2 and s.split == "test" and s.data_source == "musique_train"
    assert s.prompt[0]["role"] == "system" and s.prompt[1]["content"].startswith("Question 2?")
    assert s.extra["tools_kwargs"]["scrape"]["create_kwargs"]["ground_truth"] == "1999"
    assert s.extra["question_type"] == "inference_query" and s.extra["evidence_list"] == []
    assert s.columns == {"dataset": "musique_train"}
    assert s.uid == "musique_train:2#0" and s.group == "musique_train:2"
    assert s.to_row() == musique_row(2, "1999") | {"dataset": "musique_train"}


def test_frames_and_gaia_like_rows(tmp_path):
    frames = musique_row(0)
    frames["extra_info"] = {"answer": "Jane", "index": "frames-17", "metadata": {"level": 2, "wiki_links": ["u"]},
                            "need_tools_kwargs": True, "question": "Who?", "split": "test"}
    frames["reward_model"]["ground_truth"] = "Jane"
    frames |= {"level": "1", "task_id": "abc"}
    s = sample_from_row(frames)
    assert s.index == "frames-17" and s.extra["metadata"]["level"] == 2
    assert s.columns == {"dataset": "musique_train", "level": "1", "task_id": "abc"}


def test_question_falls_back_to_last_user_message():
    row = musique_row(5)
    row["extra_info"] = None
    s = sample_from_row(row)
    assert s.question.startswith("Question 5?") and s.index is None and s.group.startswith("musique_train:q")


BROKEN = [
    (lambda r: r["reward_model"].__setitem__("ground_truth", None),
     "field reward_model.ground_truth: expected a string, got None"),
    (lambda r: r["reward_model"].__setitem__("ground_truth", "  "),
     "field reward_model.ground_truth: expected a non-empty string"),
    (lambda r: r["prompt"][1].__setitem__("content", None), "field prompt[1].content: expected a string, got None"),
    (lambda r: r.__setitem__("prompt", []), "field prompt: expected at least one message"),
    (lambda r: r.__setitem__("data_source", None), "field data_source: expected a string, got None"),
    (lambda r: (r["extra_info"].__setitem__("question", None), r.__setitem__("prompt", [r["prompt"][0]])),
     "field extra_info.question: missing"),
]


@pytest.mark.parametrize("breaker, message", BROKEN)
def test_one_broken_row_is_named_precisely(tmp_path, breaker, message):
    rows = [musique_row(i) for i in range(20)]
    breaker(rows[17])
    f = write_raw(rows, tmp_path / "cfg" / "train-00000.parquet")
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path / "cfg")
    assert f"train-00000.parquet row 17: {message}" in str(err.value)
    assert str(f) in str(err.value)


def test_wrong_column_types(tmp_path):
    rows = [musique_row(i) for i in range(3)]
    for r in rows:
        r["extra_info"]["index"] = 1.5
    write_raw(rows, tmp_path / "a.parquet")
    with pytest.raises(DatasetError, match=r"a.parquet row 0: field extra_info.index: expected an int or a string, got float"):
        read_dataset(tmp_path / "a.parquet")
    rows = [musique_row(i) for i in range(3)]
    for r in rows:
        del r["reward_model"]
    write_raw(rows, tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match=r"b.parquet row 0: field reward_model: missing column"):
        read_dataset(tmp_path / "b.parquet")


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "root" / "matpo_train_x").mkdir(parents=True)
    with pytest.raises(DatasetError, match="config folders here: matpo_train_x"):
        read_dataset(tmp_path / "root")


def test_reads_every_parquet_file_in_order(tmp_path):
    write_raw([musique_row(0), musique_row(1)], tmp_path / "cfg" / "train-00000-of-00002.parquet")
    write_raw([musique_row(2)], tmp_path / "cfg" / "train-00001-of-00002.parquet")
    assert [s.index for s in read_dataset(tmp_path / "cfg")] == [0, 1, 2]
    assert len(read_dataset(tmp_path / "cfg", limit=2)) == 2


def test_write_parquet_validates_rows_and_mixed_index(tmp_path):
    bad = musique_row(0)
    bad["reward_model"]["ground_truth"] = None
    with pytest.raises(DatasetError, match="row 0 to write: field reward_model.ground_truth"):
        write_parquet([bad], tmp_path / "x.parquet")
    a, b = musique_row(3), musique_row(4)
    b["extra_info"]["index"] = "q4"
    ds = read_dataset(write_parquet([a, b], tmp_path / "mixed.parquet"))
    assert [s.index for s in ds] == ["3", "q4"]


# ----- repeat_k / avg@k -----

def test_repeat_k_from_name():
    assert repeat_k_from_name("matpo_val_gaia_repeat_8") == 8
    assert repeat_k_from_name("single_agent_val_frames_repeat_2/") == 2
    assert repeat_k_from_name("matpo_train_musique") == 1


def test_expand_and_group_repeats(tmp_path):
    base = [sample_from_row(musique_row(i)) for i in range(3)]
    rep = expand_repeats(base, 2)
    assert [s.uid for s in rep] == ["musique_train:0#0", "musique_train:0#1", "musique_train:1#0",
                                    "musique_train:1#1", "musique_train:2#0", "musique_train:2#1"]
    check_repeats(rep, 2, "x")
    with pytest.raises(DatasetError, match="has 3 rows"):
        check_repeats([*rep, base[0]], 2, "x")
    with pytest.raises(ValueError, match="distinct groups"):
        expand_repeats(rep, 2)

    write_parquet(rep, tmp_path / "matpo_val_toy_repeat_2" / "train-00000.parquet")
    ds = read_dataset(tmp_path / "matpo_val_toy_repeat_2")
    assert ds.repeat_k == 2 and len(ds.groups()) == 3 and [s.uid for s in ds] == [s.uid for s in rep]
    write_parquet(rep[:-1], tmp_path / "matpo_val_bad_repeat_2" / "train-00000.parquet")
    with pytest.raises(DatasetError, match=r"repeat_2 set, but group 'musique_train:2' has 1 rows"):
        read_dataset(tmp_path / "matpo_val_bad_repeat_2")
    assert read_dataset(tmp_path / "matpo_val_bad_repeat_2", repeat_k=1).repeat_k == 1


def test_avg_at_k_hand_computed():
    groups = ["a", "a", "b", "b", "c", "c"]
    assert avg_at_k(groups, [1, 0, 1, 1, 0, 0], k=2) == pytest.approx(0.5)
    assert avg_at_k(["a", "a", "a", "b"], [1, 0, 0, 1]) == pytest.approx((1 / 3 + 1) / 2)
    assert avg_at_k(["x"], [1.0], k=1) == 1.0
    with pytest.raises(ValueError, match="do not have 2 scores"):
        avg_at_k(["a", "a", "b"], [1, 1, 0], k=2)
    with pytest.raises(ValueError):
        avg_at_k(["a"], [1, 0])


# ----- multi-hop generator -----

def test_generated_dataset_round_trip(tmp_path):
    written = write_multihop(tmp_path, SMALL)
    assert set(written) == {"corpus", "matpo_train_multihop", "matpo_val_multihop_repeat_2",
                            "single_agent_train_multihop", "single_agent_val_multihop_repeat_2"}
    assert written["matpo_train_multihop"] == tmp_path / "matpo_train_multihop" / "train-00000.parquet"
    data = generate(SMALL)
    for name, role, tools, user, qs, k in [
        ("matpo_train_multihop", "planner", PLANNER_TOOLS, planner_user_prompt, data.train, 1),
        ("matpo_val_multihop_repeat_2", "planner", PLANNER_TOOLS, planner_user_prompt, data.val, 2),
        ("single_agent_train_multihop", "single", SINGLE_AGENT_TOOLS, single_user_prompt, data.train, 1),
        ("single_agent_val_multihop_repeat_2", "single", SINGLE_AGENT_TOOLS, single_user_prompt, data.val, 2),
    ]:
        ds = read_dataset(tmp_path / name)
        assert ds.repeat_k == k and len(ds) == len(qs) * k and len(ds.groups()) == len(qs)
        for s, q in zip(ds.samples[::k], qs):
            assert s.question == q.text and s.ground_truth == q.answer
            assert s.prompt == [{"role": "system", "content": system_prompt(role, tools)},
                                {"role": "user", "content": user(q.text)}]
            assert s.extra["question_type"] == f"{len(q.hops)}hop"
            assert set(s.extra["tools_kwargs"]) == {"google_search", "scrape"}
        # write -> read again gives the same samples
        again = read_dataset(write_parquet(ds.samples, tmp_path / "again" / name / "train-00000.parquet").parent)
        assert again.samples == ds.samples
    assert len(read_corpus(tmp_path / "corpus.jsonl")) == SMALL.n_entities


def test_generator_is_deterministic(tmp_path):
    write_multihop(tmp_path / "a", SMALL)
    write_multihop(tmp_path / "b", SMALL)
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da == db and len(da) == 5
    write_multihop(tmp_path / "c", MultihopConfig(seed=4, n_entities=60, n_train=24, n_val=8))
    assert digest(tmp_path / "c")["corpus.jsonl"] != da["corpus.jsonl"]


def test_hop_facts_are_on_exactly_their_pages(tmp_path):
    write_multihop(tmp_path, SMALL)
    pages = {p.url: p for p in read_corpus(tmp_path / "corpus.jsonl")}
    assert len(pages) == SMALL.n_entities and len({p.title for p in pages.values()}) == SMALL.n_entities
    train = read_dataset(tmp_path / "matpo_train_multihop")
    val = read_dataset(tmp_path / "matpo_val_multihop_repeat_2")
    assert not {s.question for s in train} & {s.question for s in val}
    n_hops = []
    for s in [*train, *val]:
        hops = s.extra["metadata"]["hops"]
        n_hops.append(len(hops))
        assert hops[0]["subject"] in s.question and s.ground_truth not in s.question
        assert hops[-1]["object"] == s.ground_truth
        for h, nxt in zip(hops, hops[1:]):
            assert h["object"] == nxt["subject"]
        for h in hops:
            page = pages[h["url"]]
            assert page.title == h["subject"]
            assert h["fact"] in page.text and h["object"] in h["fact"] and h["subject"] in h["fact"]
            assert [u for u, p in pages.items() if h["fact"] in p.text] == [h["url"]]
    assert set(n_hops) == {2, 3}


def test_rl_split_is_disjoint_and_leaves_train_and_val_as_they_were(tmp_path):
    """`n_rl` adds matpo_rl_<name> / single_agent_rl_<name> after val: the train and val files are
    byte-identical to a set written without it, and no RL question is a train or val question."""
    write_multihop(tmp_path / "a", SMALL)
    with_rl = MultihopConfig(**{**SMALL.__dict__, "n_rl": 10})
    written = write_multihop(tmp_path / "b", with_rl)
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert {k: v for k, v in db.items() if "_rl_" not in k} == da
    assert sorted(k for k in db if "_rl_" in k) == ["matpo_rl_multihop/train-00000.parquet",
                                                   "single_agent_rl_multihop/train-00000.parquet"]
    rl = read_dataset(written["matpo_rl_multihop"].parent)
    seen = {s.question for name in ("matpo_train_multihop", "matpo_val_multihop_repeat_2")
            for s in read_dataset(tmp_path / "b" / name)}
    assert len(rl) == 10 and len({s.question for s in rl}) == 10 and not {s.question for s in rl} & seen
    assert {s.split for s in rl} == {"rl"} and all(s.extra["metadata"]["hops"] for s in rl)
    with pytest.raises(ValueError, match="raise n_entities"):
        generate(MultihopConfig(**{**SMALL.__dict__, "n_rl": 500}))
    with pytest.raises(ValueError, match="n_rl must be >= 0"):
        MultihopConfig(n_rl=-1)


def test_generator_defaults_are_small_and_fast():
    t0 = time.perf_counter()
    data = generate()
    assert time.perf_counter() - t0 < 5.0
    assert len(data.pages) == 200 and len(data.train) == 256 and len(data.val) == 64
    answers = {q.answer for q in data.train}
    assert all(len(a.split()) <= 4 for a in answers)


def test_generator_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="raise n_entities"):
        generate(MultihopConfig(n_entities=30, n_train=500))
    with pytest.raises(ValueError, match="n_entities"):
        MultihopConfig(n_entities=5)


def test_cli_writes_configs(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_multihop_data", Path(__file__).parents[1] / "tools" / "make_multihop_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path), "--seed", "0", "--entities", "60", "--train", "8",
                     "--val", "4", "--val-repeat", "3"]) == 0
    assert "matpo_val_multihop_repeat_3" in capsys.readouterr().out
    ds = read_dataset(tmp_path / "single_agent_val_multihop_repeat_3")
    assert ds.repeat_k == 3 and len(ds) == 12
    assert len(read_dataset(tmp_path / "matpo_train_multihop")) == 8
