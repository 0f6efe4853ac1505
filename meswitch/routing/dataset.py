"""The router's training set, built from expert folders: each expert brings its domain's queries.

For every expert (a folder with ``expert.yaml``), the queries of its domain are:

1. the card's ``examples`` (always all of them), then
2. routing-style queries of the domain: the lines of ``<family>/routing/train.jsonl`` (and of
   ``<family>/routing/*/train.jsonl``, where a family keeps added domains apart) whose ``domain``
   is the expert's, when the expert sits in a family folder (``<family>/experts/<name>/`` or
   ``<family>/extra/<name>/``);
3. topped up, while the domain has fewer than ``max_per_domain``, with short snippets (the first
   ``snippet_chars`` characters) of the domain's texts: ``<family>/data/<domain>/train.jsonl``, or
   for an expert outside a family, its own calibration texts.

Each domain is capped at ``max_per_domain`` queries (examples first, then routing lines sampled
with the seed, then snippets), so one large domain does not drown the others and training time
stays bounded. Held-out
queries come from ``<family>/routing/test.jsonl`` (and ``routing/*/test.jsonl``); a training text
that also appears there is dropped, so the held-out figures are never measured on training queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meswitch.data.loading import DataError, DataNotFound, DataSource, load_rows, load_texts
from meswitch.expert_card import CARD, CardError, ExpertCard, load_card
from meswitch.routing.prompt import Option

log = logging.getLogger(__name__)

ROUTING = "routing"


class RoutingDataError(ValueError):
    """Expert folders or labelled query files cannot make a router's data."""


@dataclass(frozen=True)
class Example:
    """One labelled query."""

    text: str
    domain: str


@dataclass(frozen=True)
class DomainSpec:
    """A domain the router knows: the expert that serves it and the description shown to the router."""

    domain: str
    expert: str
    description: str

    @property
    def option(self) -> Option:
        return Option(self.domain, self.description)

    def to_dict(self) -> dict[str, str]:
        return {"domain": self.domain, "expert": self.expert, "description": self.description}


@dataclass
class RoutingData:
    """Domains (sorted by name), training queries, held-out queries where the family has them."""

    domains: list[DomainSpec]
    train: list[Example]
    test: list[Example] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # domain -> where its training queries came from

    def fingerprint(self) -> str:
        """sha256 over domains and training queries: equal data, equal fingerprint (for caching retrains)."""
        h = hashlib.sha256()
        h.update(json.dumps([d.to_dict() for d in self.domains], sort_keys=True).encode())
        for ex in sorted(self.train, key=lambda e: (e.domain, e.text)):
            h.update(json.dumps([ex.domain, ex.text], ensure_ascii=False).encode())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(ex.domain for ex in self.train).items()))


def find_experts(paths: Iterable[Path]) -> list[ExpertCard]:
    """Expert cards from folders: an expert folder itself, or a folder whose sub-folders are experts.

    A folder that is neither (no ``expert.yaml`` in it or in any sub-folder) is an error naming it.
    """
    cards: list[ExpertCard] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise RoutingDataError(f"{path}: not a folder")
        if (path / CARD).is_file():
            cards.append(load_card(path))
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and (p / CARD).is_file())
        if not children:
            raise CardError(
                f"{path / CARD}: missing; every expert folder needs an expert.yaml "
                f"(name, domain, description, examples), and {path} has no expert sub-folders either"
            )
        skipped = sorted(p.name for p in path.iterdir() if p.is_dir() and not (p / CARD).is_file())
        if skipped:
            log.warning("%s: sub-folders without %s skipped: %s", path, CARD, skipped)
        cards.extend(load_card(p) for p in children)
    if not cards:
        raise RoutingDataError("no expert folders given")
    return cards


def family_root(card: ExpertCard) -> Path | None:
    """The family folder an expert sits in (``<family>/experts/<name>``), if it looks like one."""
    root = card.folder.resolve().parent.parent
    return root if (root / "routing").is_dir() or (root / "data").is_dir() else None


def routing_files(root: Path, split: str) -> list[Path]:
    """``routing/<split>.jsonl`` of a family and those of its sub-folders (e.g. ``routing/extra/``)."""
    folder = root / ROUTING
    return [p for p in [folder / f"{split}.jsonl", *sorted(folder.glob(f"*/{split}.jsonl"))] if p.is_file()]


def read_labelled(source: DataSource | Path | str) -> list[Example]:
    """Labelled queries: rows with a ``text`` and a ``domain`` (a JSONL file of such lines, or any data set)."""
    try:
        return load_rows(source, required=("domain",), convert=lambda row: Example(row["text"], row["domain"]))
    except DataNotFound:
        raise
    except DataError as e:
        raise RoutingDataError(str(e)) from e


def _snippets(source: DataSource, n: int, chars: int) -> list[str]:
    """The first ``n`` texts of a set, whitespace collapsed and cut to ``chars`` characters (none if it is missing
    or unreadable: snippets only top up a domain's queries)."""
    try:
        texts = load_texts(source)
    except DataNotFound:
        return []
    except DataError as e:
        log.warning("no routing snippets from %s: %s", source.name, e)
        return []
    return [t for t in (" ".join(str(x).split())[:chars].strip() for x in texts) if t][:n]


def domain_queries(card: ExpertCard) -> tuple[list[str], str]:
    """Routing queries of the card's domain from its family's ``routing/*train.jsonl`` (none outside a family)."""
    root = family_root(card)
    files = routing_files(root, "train") if root is not None else []
    rows = [ex.text for f in files for ex in read_labelled(f) if ex.domain == card.domain]
    return rows, (f"{len(rows)} lines of {', '.join(str(f) for f in files)}" if rows else "")


def domain_snippets(card: ExpertCard, max_n: int, chars: int) -> tuple[list[str], str]:
    """Short snippets of the domain's texts: ``<family>/data/<domain>/train.jsonl``, else the expert's calibration."""
    root = family_root(card)
    path = root / "data" / card.domain / "train.jsonl" if root is not None else None
    source = DataSource(str(path)) if path is not None and path.is_file() else card.calibration_data
    snippets = _snippets(source, max_n, chars)
    return snippets, (f"{len(snippets)} snippets ({chars} chars) of {source.name}" if snippets else "")


def build_routing_data(
    cards: Sequence[ExpertCard], max_per_domain: int = 256, seed: int = 0, snippet_chars: int = 160
) -> RoutingData:
    """Domains, training queries and held-out queries for a router over the cards' domains."""
    by_domain: dict[str, ExpertCard] = {}
    names: set[str] = set()
    for card in cards:
        if card.name in names:
            raise RoutingDataError(f"{card.folder}: expert name {card.name!r} given twice")
        names.add(card.name)
        if card.domain in by_domain:
            other = by_domain[card.domain]
            raise RoutingDataError(
                f"{card.folder}: domain {card.domain!r} is already served by expert {other.name!r} ({other.folder}); "
                "a router sends each domain to one expert"
            )
        if "\n" in card.description.strip():
            raise RoutingDataError(f"{card.folder / CARD}: description must be one line")
        by_domain[card.domain] = card
    if len(by_domain) < 2:
        raise RoutingDataError(
            f"a router needs at least two domains, got {sorted(by_domain)}; with one expert, send every query to it"
        )
    domains = [DomainSpec(d, by_domain[d].name, " ".join(by_domain[d].description.split())) for d in sorted(by_domain)]

    test: list[Example] = []
    roots = {r for c in cards if (r := family_root(c)) is not None}
    for f in sorted({f for root in roots for f in routing_files(root, "test")}):
        test.extend(ex for ex in read_labelled(f) if ex.domain in by_domain)
    test = list(dict.fromkeys(test))
    held_out = {ex.text for ex in test}

    rng = random.Random(seed)
    train: list[Example] = []
    sources: dict[str, str] = {}
    for spec in domains:
        card = by_domain[spec.domain]
        examples = [e for e in dict.fromkeys(x.strip() for x in card.examples) if e and e not in held_out]
        lines, source = domain_queries(card)
        lines = [q for q in dict.fromkeys(lines) if q.strip() and q not in held_out and q not in examples]
        rng.shuffle(lines)
        queries = (examples + lines)[:max_per_domain]
        if len(queries) < max_per_domain:  # top up with snippets of the domain's own texts
            snips, snip_source = domain_snippets(card, 4 * max_per_domain, snippet_chars)
            snips = [q for q in dict.fromkeys(snips) if q not in held_out and q not in queries]
            rng.shuffle(snips)
            added = snips[: max_per_domain - len(queries)]
            queries += added
            if added:
                source = "; ".join(x for x in (source, f"{len(added)} of {snip_source}") if x)
        if not queries:
            raise RoutingDataError(
                f"{card.folder}: no training queries for domain {spec.domain!r} "
                f"(no examples in {CARD}, no routing lines, no calibration texts)"
            )
        train.extend(Example(q, spec.domain) for q in queries)
        sources[spec.domain] = f"{len(examples)} examples from {CARD}; {source}; {len(queries)} used"
    rng.shuffle(train)
    log.info("router data: %d domains, %d training queries, %d held-out", len(domains), len(train), len(test))
    return RoutingData(domains=domains, train=train, test=test, sources=sources)
