"""The demo expert family: a small Mistral base and fully fine-tuned domain experts, from offline text."""

from meswitch.demo.corpora import CORE_DOMAINS, EXTRA_DOMAINS, CorpusUnavailable, cache_dir, load_corpus
from meswitch.demo.family import SIZES, FamilySpec, TrainConfig, build_family

__all__ = [
    "CORE_DOMAINS",
    "EXTRA_DOMAINS",
    "SIZES",
    "CorpusUnavailable",
    "FamilySpec",
    "TrainConfig",
    "build_family",
    "cache_dir",
    "load_corpus",
]
