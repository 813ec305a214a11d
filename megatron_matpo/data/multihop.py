"""Offline, seeded MuSiQue-like multi-hop QA over an invented wiki (for tests and tiny-model runs).

Entities (people, cities, countries, rivers, companies, films) get short invented names and
functional relations (a person is born in one city, a city lies on one river, ...). Each entity
becomes a page that states its own relations, a few attributes and some distractor sentences. A
question chains 2-3 relations ("In which country is the birthplace of the founder of Zenol Corp?")
and its answer is one entity name. A relation fact is stated only on its subject's page, so an
agent that searches for each intermediate entity and reads its page can answer every hop.

Everything flows from one `random.Random(seed)`: same config -> byte-identical output files.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_matpo.agents.prompts import planner_user_prompt, single_user_prompt, system_prompt
from megatron_matpo.data.parquet import write_parquet
from megatron_matpo.data.schema import Sample, assign_uids, expand_repeats, sample_from_row
from megatron_matpo.toolbox.local_search import Page
from megatron_matpo.toolbox.local_search import read_corpus as iter_corpus
from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS, WORKER_TOOLS

URL_PREFIX = "https://wiki.local/"
DATA_SOURCE = "multihop"


@dataclass(frozen=True)
class Relation:
    name: str
    subject: str       # entity kind
    object: str
    fact: str          # sentence on the subject's page: {s} subject name, {o} object name
    phrase: str        # noun phrase for the object, in terms of the subject description {x}
    question: str      # question asking for the object of {x}


# Order matters for determinism (enumeration order of chains).
RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "person", "city", "{s} was born in the city of {o}.",
             "the birthplace of {x}", "In which city was {x} born?"),
    Relation("in_country", "city", "country", "{s} is a city in {o}.",
             "the country of {x}", "In which country is {x}?"),
    Relation("on_river", "city", "river", "{s} lies on the {o}.",
             "the river through {x}", "Which river flows through {x}?"),
    Relation("rises_in", "river", "country", "The {s} rises in {o}.",
             "the country where {x} rises", "In which country does {x} rise?"),
    Relation("founded_by", "company", "person", "{s} was founded by {o}.",
             "the founder of {x}", "Who founded {x}?"),
    Relation("headquartered_in", "company", "city", "{s} is headquartered in {o}.",
             "the headquarters city of {x}", "In which city is {x} headquartered?"),
    Relation("directed_by", "film", "person", "{s} was directed by {o}.",
             "the director of {x}", "Who directed {x}?"),
    Relation("produced_by", "film", "company", "{s} was produced by {o}.",
             "the studio that produced {x}", "Which company produced {x}?"),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}
KINDS = ("country", "river", "city", "person", "company", "film")
_KIND_SHARE = {"country": 0.05, "river": 0.07, "city": 0.2, "company": 0.18, "film": 0.2}  # person: rest

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "nrlsktmd"
_OCCUPATIONS = ("painter", "engineer", "writer", "chemist", "architect", "singer", "pilot", "teacher")
_INDUSTRIES = ("shipping", "software", "textiles", "mining", "foods", "toys", "furniture")
_GENRES = ("drama", "comedy", "thriller", "western", "musical", "documentary")
_COMPANY_SUFFIXES = ("Corp", "Labs", "Works", "Group")
_FILM_PATTERNS = ("{b} Rising", "Return of {b}", "{b} Nights", "Last Days of {b}")


@dataclass(frozen=True)
class MultihopConfig:
    seed: int = 0
    n_entities: int = 200
    n_train: int = 256
    n_val: int = 64
    # a third split for RL after SFT on `train` (matpo_rl_<name>): questions the fine-tuned model has not
    # memorized, so only searching and copying what it finds answers them. Taken after val: train and val
    # are the same with or without it
    n_rl: int = 0
    val_repeat: int = 2            # val configs repeat every question k times (avg@k)
    three_hop_fraction: float = 0.5
    distractors_per_page: int = 2
    name: str = "multihop"         # config suffix: matpo_train_<name>, matpo_val_<name>_repeat_<k>

    def __post_init__(self) -> None:
        if self.n_entities < 24:
            raise ValueError(f"n_entities must be >= 24 to cover every entity kind, got {self.n_entities}")
        if self.n_train < 1 or self.n_val < 1 or self.val_repeat < 1:
            raise ValueError("n_train, n_val and val_repeat must be >= 1")
        if self.n_rl < 0:
            raise ValueError(f"n_rl must be >= 0, got {self.n_rl}")
        if not 0.0 <= self.three_hop_fraction <= 1.0:
            raise ValueError(f"three_hop_fraction must be in [0, 1], got {self.three_hop_fraction}")
        if self.distractors_per_page < 0:
            raise ValueError("distractors_per_page must be >= 0")


@dataclass
class Entity:
    name: str
    kind: str
    url: str
    attrs: dict[str, Any] = field(default_factory=dict)
    relations: dict[str, str] = field(default_factory=dict)   # relation name -> object entity name


@dataclass(frozen=True)
class Hop:
    subject: str
    relation: str
    object: str
    url: str     # the subject's page, where `fact` is stated
    fact: str


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    hops: tuple[Hop, ...]


@dataclass
class MultihopSet:
    entities: list[Entity]
    pages: list[Page]
    train: list[Question]
    val: list[Question]
    rl: list[Question] = field(default_factory=list)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _base_name(rng: random.Random, used: set[str]) -> str:
    # Fixed shape CVCVC: equal lengths, so no base name is a substring of another one.
    while True:
        b = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
             + rng.choice(_CODAS)).capitalize()
        if b not in used:
            used.add(b)
            return b


def _display(kind: str, base: str, rng: random.Random) -> str:
    if kind == "country":
        return base + "ia"
    if kind == "river":
        return f"{base} River"
    if kind == "company":
        return f"{base} {rng.choice(_COMPANY_SUFFIXES)}"
    if kind == "film":
        return rng.choice(_FILM_PATTERNS).format(b=base)
    if kind == "person":
        given = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)).capitalize()
        return f"{given} {base}"
    return base


def _kind_counts(n: int) -> dict[str, int]:
    counts = {k: max(2, int(n * share)) for k, share in _KIND_SHARE.items()}
    counts["person"] = n - sum(counts.values())
    return {k: counts[k] for k in KINDS}


def _attrs(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "person":
        return {"occupation": rng.choice(_OCCUPATIONS), "birth_year": rng.randint(1900, 1990)}
    if kind == "city":
        return {"population": rng.randint(5, 900) * 1000}
    if kind == "country":
        return {"area_km2": rng.randint(10, 900) * 1000}
    if kind == "river":
        return {"length_km": rng.randint(40, 2500)}
    if kind == "company":
        return {"industry": rng.choice(_INDUSTRIES), "founded": rng.randint(1850, 2015)}
    return {"genre": rng.choice(_GENRES), "year": rng.randint(1930, 2020)}  # film


def _attr_sentences(e: Entity) -> list[str]:
    a, n = e.attrs, e.name
    if e.kind == "person":
        return [f"{n} was born in {a['birth_year']}."]
    if e.kind == "city":
        return [f"{n} has about {a['population']:,} inhabitants."]
    if e.kind == "country":
        return [f"{n} covers about {a['area_km2']:,} square kilometres."]
    if e.kind == "river":
        return [f"The {n} is {a['length_km']} km long."]
    if e.kind == "company":
        return [f"{n} was established in {a['founded']}."]
    return [f"{n} was released in {a['year']}."]


def _intro(e: Entity) -> str:
    a, n = e.attrs, e.name
    return {
        "person": f"{n} is a {a.get('occupation')}.",
        "city": f"{n} is a city.",
        "country": f"{n} is a country.",
        "river": f"The {n} is a river.",
        "company": f"{n} is a {a.get('industry')} company.",
        "film": f"{n} is a {a.get('genre')} film.",
    }[e.kind]


_DISTRACTORS = (
    "{s} is sometimes confused with {o}.",
    "A local magazine once compared {s} with {o}.",
    "{s} is mentioned in several travel guides.",
    "Many visitors first hear about {s} from friends.",
)


def fact_sentence(subject: str, relation: str, obj: str) -> str:
    return RELATION_BY_NAME[relation].fact.format(s=subject, o=obj)


def _page(e: Entity, others: list[Entity], n_distractors: int, rng: random.Random) -> Page:
    body = [fact_sentence(e.name, r, o) for r, o in e.relations.items()] + _attr_sentences(e)
    # templates without replacement: a page never repeats a sentence
    for template in rng.sample(_DISTRACTORS, min(n_distractors, len(_DISTRACTORS))):
        other = rng.choice(others)
        while other.name == e.name:
            other = rng.choice(others)
        body.append(template.format(s=e.name, o=other.name))
    rng.shuffle(body)
    return Page(url=e.url, title=e.name, text=" ".join([_intro(e), *body]))


def _make_entities(cfg: MultihopConfig, rng: random.Random) -> list[Entity]:
    used: set[str] = set()
    by_kind: dict[str, list[Entity]] = {}
    for kind, n in _kind_counts(cfg.n_entities).items():
        by_kind[kind] = []
        for _ in range(n):
            name = _display(kind, _base_name(rng, used), rng)
            by_kind[kind].append(Entity(name=name, kind=kind, url=URL_PREFIX + slug(name), attrs=_attrs(kind, rng)))
    for kind in KINDS:
        for e in by_kind[kind]:
            for r in RELATIONS:
                if r.subject == kind:
                    e.relations[r.name] = rng.choice(by_kind[r.object]).name
    return [e for kind in KINDS for e in by_kind[kind]]


def _chains(entities: list[Entity], max_hops: int = 3) -> list[tuple[Hop, ...]]:
    """Every relation path of 2..max_hops hops, in a deterministic order."""
    by_name = {e.name: e for e in entities}
    pages = {e.name: e.url for e in entities}
    out: list[tuple[Hop, ...]] = []

    def walk(e: Entity, path: tuple[Hop, ...]) -> None:
        if len(path) >= 2:
            out.append(path)
        if len(path) == max_hops:
            return
        for r, obj in e.relations.items():
            hop = Hop(subject=e.name, relation=r, object=obj, url=pages[e.name], fact=fact_sentence(e.name, r, obj))
            walk(by_name[obj], path + (hop,))

    for e in entities:
        walk(e, ())
    return out


def _question(chain: tuple[Hop, ...], kinds: dict[str, str]) -> Question:
    start = chain[0].subject
    x = f"the film {start}" if kinds[start] == "film" else start
    for hop in chain[:-1]:
        x = RELATION_BY_NAME[hop.relation].phrase.format(x=x)
    text = RELATION_BY_NAME[chain[-1].relation].question.format(x=x)
    return Question(text=text, answer=chain[-1].object, hops=chain)


def generate(cfg: MultihopConfig = MultihopConfig()) -> MultihopSet:
    rng = random.Random(cfg.seed)
    entities = _make_entities(cfg, rng)
    pages = [_page(e, entities, cfg.distractors_per_page, rng) for e in entities]
    kinds = {e.name: e.kind for e in entities}
    pools: dict[int, list[Question]] = {2: [], 3: []}
    for chain in _chains(entities):
        q = _question(chain, kinds)
        if q.answer not in q.text:  # never leak the answer (names are distinct, so this is a guard)
            pools[len(chain)].append(q)
    for n in (2, 3):
        rng.shuffle(pools[n])

    def take(n: int) -> list[Question]:
        n3 = round(n * cfg.three_hop_fraction)
        if n3 > len(pools[3]) or n - n3 > len(pools[2]):
            raise ValueError(f"not enough distinct questions for {n} more ({n3} 3-hop of {len(pools[3])}, "
                             f"{n - n3} 2-hop of {len(pools[2])} left): raise n_entities")
        picked = pools[3][:n3] + pools[2][:n - n3]
        del pools[3][:n3], pools[2][:n - n3]
        rng.shuffle(picked)
        return picked

    train = take(cfg.n_train)
    val = take(cfg.n_val)
    rl = take(cfg.n_rl) if cfg.n_rl else []
    return MultihopSet(entities=entities, pages=pages, train=train, val=val, rl=rl)


# ----- MATPO-data rows -----

def question_row(q: Question, index: int, split: str, role: str, system: str) -> dict[str, Any]:
    """One row in MATPO-data layout; `system` is the role's (shared) system prompt."""
    user = planner_user_prompt(q.text) if role == "planner" else single_user_prompt(q.text)
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "ability": "qa",
        "reward_model": {"ground_truth": q.answer, "style": "rule"},
        "extra_info": {
            "answer": q.answer,
            "question": q.text,
            "index": index,
            "split": split,
            "need_tools_kwargs": True,
            # like MATPO-data: the web tools get the ground truth (e.g. to filter answer leaks)
            "tools_kwargs": {t.name: {"create_kwargs": {"ground_truth": q.answer}} for t in WORKER_TOOLS},
            "question_type": f"{len(q.hops)}hop",
            "metadata": {"hops": [asdict(h) for h in q.hops]},
        },
    }


def to_samples(questions: list[Question], role: str, split: str, repeat: int = 1) -> list[Sample]:
    if role not in ("planner", "single"):
        raise ValueError(f"role must be 'planner' or 'single', got {role!r}")
    system = system_prompt(role, PLANNER_TOOLS if role == "planner" else SINGLE_AGENT_TOOLS)
    samples = assign_uids(sample_from_row(question_row(q, i, split, role, system), where=f"{split} question {i}")
                          for i, q in enumerate(questions))
    return expand_repeats(samples, repeat) if repeat > 1 else samples


def config_names(cfg: MultihopConfig) -> dict[tuple[str, str], str]:
    """(role, split) -> MATPO-style config folder name."""
    val = f"val_{cfg.name}_repeat_{cfg.val_repeat}" if cfg.val_repeat > 1 else f"val_{cfg.name}"
    splits = (("train", f"train_{cfg.name}"), ("val", val)) + ((("rl", f"rl_{cfg.name}"),) if cfg.n_rl else ())
    return {(role, split): f"{prefix}_{suffix}"
            for role, prefix in (("planner", "matpo"), ("single", "single_agent")) for split, suffix in splits}


def write_corpus(pages: list[Page], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for p in pages:
            f.write(json.dumps({"url": p.url, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
    return out


def read_corpus(path: str | Path) -> list[Page]:
    return list(iter_corpus(path))


def write_multihop(out_dir: str | Path, cfg: MultihopConfig = MultihopConfig()) -> dict[str, Path]:
    """corpus.jsonl + train/val parquet configs for the planner (matpo_*) and single agent."""
    out = Path(out_dir)
    data = generate(cfg)
    written = {"corpus": write_corpus(data.pages, out / "corpus.jsonl")}
    for (role, split), name in config_names(cfg).items():
        qs = {"train": data.train, "val": data.val, "rl": data.rl}[split]
        repeat = cfg.val_repeat if split == "val" else 1
        written[name] = write_parquet(to_samples(qs, role, split, repeat), out / name / "train-00000.parquet")
    return written
