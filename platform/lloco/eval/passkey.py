"""Fact recall (``passkey``): long documents of natural prose with random facts planted at known depths.

A document is a run of consecutive Wikipedia paragraphs (``passkey_filler.json``, from SQuAD 2.0 dev,
CC BY-SA 4.0: see NOTICE) cut to a token length, with ``facts_per_document`` one-sentence facts inserted
between sentences at spread depths (fractions of the document's tokens before the fact). The first fact
is the one asked about; one other fact is of the same kind about another subject (so the answer has to
come from the right sentence, not from the kind of question), the rest are of random kinds. Facts are
random (seeded), so no world knowledge answers them:

- ``code``: a project's five-digit access code;
- ``birthday``: a person's date of birth;
- ``city``: a person's favourite city;
- ``leader``: who leads a project.

The train and test splits share nothing: the test split's filler is the SQuAD articles whose questions
SQuAD-long tests on (25-34, which the pretraining corpus excludes), the train split's twelve of the
training articles (0-11); each split has its own sentence templates, project names, first names,
surnames and cities; codes and dates fall in a split by a hash of their text; every document's random
stream is keyed by its split. So anything trained on ``split="train"`` documents (the LoRA modes of
``lloco eval``, compressor pretraining) has seen none of the test split's sentences, entities, values or
filler. The validation split (what ``lloco eval --split validation`` asks) is made of the train split's
material (``MATERIAL``: filler, templates, names, values) with its own random stream, so its documents
are other documents than the train split's, and share nothing with the test split's; its facts are
random draws from the train split's pools, so one repeats a training document's only by chance.

Pure Python on purpose (no torch, no model): other rooms build training documents with it.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

from lloco.errors import Internal, InvalidArgument

Split = Literal["train", "validation", "test"]
Material = Literal["train", "test"]  # whose filler, templates, names and values a document is made of
MATERIAL: dict[Split, Material] = {"train": "train", "validation": "train", "test": "test"}
Kind = Literal["code", "birthday", "city", "leader"]
KINDS: tuple[Kind, ...] = ("code", "birthday", "city", "leader")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
FACTS_PER_DOCUMENT = 4
FILLER_FILE = Path(__file__).with_name("passkey_filler.json")
FILLER_FORMAT = "lloco-passkey-filler/1"


@dataclass(frozen=True)
class Template:
    """A fact's sentence and its question; ``{subject}`` and ``{value}`` are filled in."""

    kind: Kind
    statement: str
    question: str


TEMPLATES: dict[Material, tuple[Template, ...]] = {
    "test": (
        Template(
            "code",
            "The access code of the {subject} project is {value}.",
            "What is the access code of the {subject} project?",
        ),
        Template("birthday", "{subject} was born on {value}.", "On what date was {subject} born?"),
        Template("city", "{subject}'s favourite city is {value}.", "What is {subject}'s favourite city?"),
        Template("leader", "The {subject} project is led by {value}.", "Who leads the {subject} project?"),
    ),
    "train": (
        Template(
            "code",
            "Members of the {subject} project open its archive with the code {value}.",
            "Which code opens the archive of the {subject} project?",
        ),
        Template(
            "code",
            "To enter the laboratory of the {subject} project, one types {value}.",
            "What number lets one into the laboratory of the {subject} project?",
        ),
        Template(
            "birthday", "{subject} came into the world on {value}.", "What is {subject}'s date of birth?"
        ),
        Template(
            "birthday",
            "The birth certificate of {subject} is dated {value}.",
            "Which date is on the birth certificate of {subject}?",
        ),
        Template(
            "city", "Of all places, {subject} loves {value} the most.", "Which city does {subject} love most?"
        ),
        Template(
            "city",
            "{subject} always says that {value} is the best city on earth.",
            "Which city does {subject} call the best on earth?",
        ),
        Template(
            "leader",
            "{value} is in charge of the {subject} project.",
            "Who is in charge of the {subject} project?",
        ),
        Template(
            "leader", "The head of the {subject} project is {value}.", "Who heads the {subject} project?"
        ),
    ),
}


def _names(words: str) -> tuple[str, ...]:
    return tuple(words.split())


@dataclass(frozen=True)
class EntityPools:
    """The names a material draws from; the two materials' pools are disjoint."""

    projects: tuple[str, ...]
    first_names: tuple[str, ...]
    surnames: tuple[str, ...]
    cities: tuple[str, ...]


POOLS: dict[Material, EntityPools] = {
    "test": EntityPools(
        projects=_names(
            "Amberline Bluefinch Cobaltstone Driftmoor Emberfall Foxglove Granitepeak Harborlight Ironbark "
            "Juniperhill Kestrelwing Lanternfish Moonquarry Nightjar Oakshadow Pebblebrook Quartzvale "
            "Ravenmoor Saltmarsh Thistledown Umberfield Velvetmoss Willowcreek Yarrowgate"
        ),
        first_names=_names(
            "Amara Bastian Caoimhe Dario Elif Farid Greta Hiroshi Ingrid Joaquin Kalani Leocadia Mateo Nadia "
            "Oskar Priya Quentin Rosalind Soren Thandiwe"
        ),
        surnames=_names(
            "Abernethy Bergqvist Castellanos Drummond Eriksen Fairweather Galloway Hallorann Ilves Jablonski "
            "Kowalczyk Lindqvist Marchetti Novak Okonkwo Pemberton Quillfeather Rasmussen Szabo "
            "Thorvaldsen"
        ),
        cities=_names(
            "Lisbon Krakow Valparaiso Marrakesh Hobart Tbilisi Ljubljana Cartagena Nagoya Bergen Cusco "
            "Zanzibar Tallinn Porto Quebec Kyoto Edinburgh Salzburg Havana Reykjavik Dubrovnik Seville "
            "Montevideo Hanoi Bruges Kotor Galway Leipzig Mendoza Adelaide"
        ),
    ),
    "train": EntityPools(
        projects=_names(
            "Ashgrove Brambleton Cinderpath Duskwater Elmstead Fernhollow Goldcrest Hazelford Icefern "
            "Jadewing Kingfisher Larkspur Marshglen Nettlebank Orchardine Pinecliff Quillmere Rushwick "
            "Silverbeck Tumbleweed Underhill Vervain Wrenfield Zephyrdale"
        ),
        first_names=_names(
            "Anselm Beatriz Cosmin Delphine Emeka Fiora Gunnar Halima Isidore Jovana Kasimir Liesel Marius "
            "Noor Odalys Pavel Rhiannon Stellan Tamsin Ulrich"
        ),
        surnames=_names(
            "Achterberg Blackwood Carvalho Dunmore Esposito Fitzgerald Grimaldi Hargreaves Iversen "
            "Jankowski Kingsley Lachance Montgomery Nakamura Oyelaran Pettersson Radcliffe Sandoval "
            "Trevelyan Vasquez"
        ),
        cities=_names(
            "Osaka Bologna Antwerp Cork Granada Riga Vilnius Bilbao Lyon Gdansk Tromso Perth Wellington "
            "Nairobi Accra Izmir Pune Cebu Busan Medellin Quito Halifax Aarhus Utrecht Ghent Turin Nantes "
            "Malmo Innsbruck Valencia"
        ),
    ),
}
_FIRST_DATE, _LAST_DATE = date(1931, 1, 1), date(2009, 12, 31)
_MONTHS = _names(
    "January February March April May June July August September October November December"
)  # not strftime's %B, which follows the locale


@dataclass(frozen=True)
class PlantedFact:
    """A fact sentence in a document and where it is.

    ``depth`` is the slot it was planted at (a fraction of the document's tokens before it);
    ``token_position`` the tokens before it as counted while building; ``char_offset`` where its
    ``statement`` starts in the text.
    """

    kind: Kind
    statement: str
    question: str
    answer: str
    depth: float
    token_position: int
    char_offset: int


@dataclass(frozen=True)
class PasskeyDocument:
    """A document with its planted facts; ``facts[0]`` is the one asked about."""

    doc_id: str
    text: str
    tokens: int
    facts: tuple[PlantedFact, ...]

    @property
    def asked(self) -> PlantedFact:
        return self.facts[0]


@cache
def _filler() -> dict[str, Any]:
    data = json.loads(FILLER_FILE.read_text(encoding="utf-8"))
    if data.get("format") != FILLER_FORMAT:
        raise Internal(f"{FILLER_FILE} has format {data.get('format')!r}, expected {FILLER_FORMAT}")
    return data


def _check_split(split: str) -> Split:
    if split not in MATERIAL:
        raise InvalidArgument(f"passkey split must be one of {', '.join(MATERIAL)}, got {split!r}")
    return cast(Split, split)


def _paragraphs(material: Material) -> list[list[str]]:
    """The material's paragraphs (each a list of sentences), articles in order."""
    return [paragraph for article in _filler()["splits"][material] for paragraph in article["paragraphs"]]


def filler_articles(split: Split) -> dict[str, str]:
    """The split's filler articles as plain text (``{title: text}``, paragraphs joined by blank lines):
    prose without planted facts, e.g. held-out text for perplexity (the test split)."""
    return {
        article["title"]: "\n\n".join(" ".join(sentences) for sentences in article["paragraphs"])
        for article in _filler()["splits"][MATERIAL[_check_split(split)]]
    }


def _in_split(value: str, material: Material) -> bool:
    """Codes and dates belong to one material each, by a hash of their text."""
    return zlib.crc32(value.encode()) % 2 == (0 if material == "test" else 1)


class _FactDrawer:
    """Random facts of one document, with distinct subjects and people."""

    def __init__(self, material: Material, rng: random.Random) -> None:
        self.material, self.rng, self.pools = material, rng, POOLS[material]
        self.used: set[str] = set()

    def _fresh(self, draw: Callable[[], str]) -> str:
        while (value := draw()) in self.used:
            pass
        self.used.add(value)
        return value

    def _person(self) -> str:
        pools = self.pools
        return self._fresh(lambda: f"{self.rng.choice(pools.first_names)} {self.rng.choice(pools.surnames)}")

    def _project(self) -> str:
        return self._fresh(lambda: self.rng.choice(self.pools.projects))

    def _of_split(self, draw: Callable[[], str]) -> str:
        while not _in_split(value := draw(), self.material):
            pass
        return value

    def _date(self) -> str:
        span = (_LAST_DATE - _FIRST_DATE).days

        def draw() -> str:
            day = _FIRST_DATE + timedelta(days=self.rng.randint(0, span))
            return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"

        return self._of_split(draw)

    def fact(self, kind: Kind) -> tuple[Template, str, str]:
        """A template of ``kind`` and its subject and value."""
        template = self.rng.choice([t for t in TEMPLATES[self.material] if t.kind == kind])
        if kind == "code":
            return template, self._project(), self._of_split(lambda: str(self.rng.randint(10000, 99999)))
        if kind == "birthday":
            return template, self._person(), self._date()
        if kind == "city":
            return template, self._person(), self._fresh(lambda: self.rng.choice(self.pools.cities))
        return template, self._project(), self._person()


def passkey_documents(
    split: Split,
    length: int,
    count: int,
    count_tokens: Callable[[str], int],
    seed: int = 0,
    facts_per_document: int = FACTS_PER_DOCUMENT,
) -> list[PasskeyDocument]:
    """``count`` documents of at most ``length`` tokens (by ``count_tokens``), each with planted facts.

    Document i asks about a fact at depth ``DEPTHS[i % len(DEPTHS)]``; the other facts take other depths
    at random. A document is deterministic in (split, seed, length, i): the first n of a larger count
    are the same n documents. Filler never repeats within a document. Its filler, templates and pools
    are those of ``MATERIAL[split]``; its random stream is the split's own.

    Raises:
        InvalidArgument: an unknown split, ``facts_per_document`` outside 1..len(DEPTHS), a negative
            count, or a length the split's filler cannot fill without repeating.
    """
    split = _check_split(split)
    if not 1 <= facts_per_document <= len(DEPTHS):
        raise InvalidArgument(f"facts_per_document must be in 1..{len(DEPTHS)}, got {facts_per_document}")
    if count < 0 or length < 1:
        raise InvalidArgument(f"passkey documents need count >= 0 and length >= 1, got {count}, {length}")
    counts: dict[str, int] = {}

    def tokens_of(unit: str) -> int:
        if unit not in counts:
            counts[unit] = count_tokens(unit)
        return counts[unit]

    material = MATERIAL[split]
    paragraphs = _paragraphs(material)
    documents = []
    for index in range(count):
        rng = random.Random(f"lloco-passkey/{split}/{seed}/{length}/{index}")
        drawer = _FactDrawer(material, rng)
        asked_kind = rng.choice(KINDS)
        kinds = [asked_kind, asked_kind][:facts_per_document]  # the asked fact and a same-kind distractor
        kinds += [rng.choice(KINDS) for _ in range(facts_per_document - len(kinds))]
        asked_depth = DEPTHS[index % len(DEPTHS)]
        depths = [asked_depth, *rng.sample([d for d in DEPTHS if d != asked_depth], facts_per_document - 1)]
        facts = []
        for kind, depth in zip(kinds, depths, strict=True):
            template, subject, value = drawer.fact(kind)
            statement = template.statement.format(subject=subject, value=value)
            facts.append((depth, kind, statement, template.question.format(subject=subject), value))
        budget = length - sum(tokens_of(f" {fact[2]}") for fact in facts)
        units = _filler_units(paragraphs, rng.randrange(len(paragraphs)), budget, tokens_of, split, length)
        if not units:
            raise InvalidArgument(f"{length} tokens cannot hold {facts_per_document} facts and filler")
        text, planted = _plant(units, facts, tokens_of)
        doc_id = f"passkey-{split}-{length}-{index:04d}"
        documents.append(PasskeyDocument(doc_id, text, count_tokens(text), planted))
    return documents


def _filler_units(
    paragraphs: list[list[str]],
    start: int,
    budget: int,
    tokens_of: Callable[[str], int],
    split: Split,
    length: int,
) -> list[str]:
    """Consecutive sentences from paragraph ``start`` on (wrapping past the last), each with the
    whitespace that joins it to the one before, while their tokens stay within ``budget``."""
    units: list[str] = []
    total = 0
    for step in range(len(paragraphs)):
        for position, sentence in enumerate(paragraphs[(start + step) % len(paragraphs)]):
            unit = ("\n\n" if position == 0 else " ") + sentence if units else sentence
            if total + tokens_of(unit) > budget:
                return units
            units.append(unit)
            total += tokens_of(unit)
    raise InvalidArgument(
        f"the passkey {split} filler holds {total} tokens, too few for {length}-token documents "
        "without repeating"
    )


def _plant(
    units: list[str], facts: list[tuple[float, Kind, str, str, str]], tokens_of: Callable[[str], int]
) -> tuple[str, tuple[PlantedFact, ...]]:
    """Insert each fact (``depth, kind, statement, question, answer``) at the sentence boundary nearest
    its depth of the finished document; returns the text and the facts in their given order."""
    before = [0]
    for unit in units:
        before.append(before[-1] + tokens_of(unit))
    fact_tokens = [tokens_of(f" {fact[2]}") for fact in facts]
    total = before[-1] + sum(fact_tokens)
    boundary_of: dict[int, int] = {}
    placed_tokens, lowest = 0, 1  # never before the first sentence
    for index in sorted(range(len(facts)), key=lambda i: facts[i][0]):
        target = facts[index][0] * total - placed_tokens
        boundary = min(range(lowest, len(units) + 1), key=lambda b: abs(before[b] - target))
        boundary_of[index], lowest = boundary, boundary
        placed_tokens += fact_tokens[index]
    pieces: list[str] = []
    offsets: dict[int, tuple[int, int]] = {}
    chars, tokens = 0, 0
    for position in range(len(units) + 1):
        for index in sorted((i for i, b in boundary_of.items() if b == position), key=lambda i: facts[i][0]):
            offsets[index] = (chars + 1, tokens)
            pieces.append(f" {facts[index][2]}")
            chars, tokens = chars + len(pieces[-1]), tokens + fact_tokens[index]
        if position < len(units):
            pieces.append(units[position])
            chars, tokens = chars + len(units[position]), tokens + tokens_of(units[position])
    planted = tuple(
        PlantedFact(kind, statement, question, answer, depth, offsets[i][1], offsets[i][0])
        for i, (depth, kind, statement, question, answer) in enumerate(facts)
    )
    return "".join(pieces), planted
