"""Fixtures for the serving tests: the micro demo family, compressed, with a router; servers on loopback.

``served_family`` builds once per session (registered in conftest, so pytest holds one fixture for every module):
the session's micro family, every core expert compressed (2-bit, calibrated), an embedding router over the experts'
domains, and a sealed ``base`` artifact for the registry test.
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from meswitch.artifacts import seal_base
from meswitch.checkpoints import Checkpoint, scan
from meswitch.compression.api import CompressJob, run_compress
from meswitch.compression.calibration import CalibConfig
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo
from meswitch.compression.reconstruct import reconstruct
from meswitch.expert_card import load_card
from meswitch.serving.engine import _cache_kwarg

CALIB = CalibConfig(samples=8, seq_len=64, batch_size=4)


@dataclass
class ServedFamily:
    root: Path  # the demo family folder
    base: Path
    experts: dict[str, Path]  # expert name -> full expert folder
    domains: dict[str, str]  # expert name -> domain
    artifacts: dict[str, Path]  # expert name -> compressed artifact
    router: Path
    base_artifact: Path  # the base sealed as a kind="base" artifact (for the registry)

    def artifact_dir(self) -> Path:
        return next(iter(self.artifacts.values())).parent


def compress(base: Path, expert: Path, out: Path, name: str, domain: str | None, **delta) -> Path:
    """An expert artifact, compressed as the pipeline does (method meswitch, calibrated)."""
    calib = expert / "calib.jsonl"
    run_compress(
        CompressJob(
            base=base,
            expert=expert,
            calib=calib,
            out=out,
            info=ExpertInfo(name, domain),
            delta=DeltaConfig(**delta),
            calib_cfg=CALIB,
            device="cpu",
        )
    )
    return out


def base_artifact(base: Path, out: Path, name: str = "micro") -> Path:
    """The base model folder sealed as a ``kind="base"`` artifact (HF files at the top, fingerprint in the manifest)."""
    seal_base(base, out, name, scan(Checkpoint(base)).fingerprint)
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """Small models on a shared 2-core machine run far faster (and steadier) on one intra-op thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def served_family(tmp_path_factory, micro_family) -> ServedFamily:
    """The session's micro family (conftest) and its four core experts, compressed, with a router."""
    return _build(tmp_path_factory, micro_family)


def _build(tmp_path_factory, root: Path) -> ServedFamily:
    from meswitch.routing import RouterJob, train_router
    from meswitch.routing.embedding import EmbeddingConfig

    with torch_threads(1):
        work = tmp_path_factory.mktemp("served")
        experts, domains, artifacts = {}, {}, {}
        for folder in sorted((root / "experts").iterdir()):
            card = load_card(folder)
            experts[card.name], domains[card.name] = folder, card.domain
            artifacts[card.name] = compress(
                root / "base", folder, work / "artifacts" / card.name, card.name, card.domain
            )
        router = work / "router"
        # The mean-pooling encoder over the family's own base: a few times faster to train on CPU
        # than the packaged sentence encoder, and it routes the micro family's held-out queries ~96% right.
        embedding = EmbeddingConfig(encoder=str(root / "base"))
        job = RouterJob(
            experts=list(experts.values()), out=router, backend="embedding", device="cpu", embedding=embedding
        )
        train_router(job)
        return ServedFamily(
            root=root,
            base=root / "base",
            experts=experts,
            domains=domains,
            artifacts=artifacts,
            router=router,
            base_artifact=base_artifact(root / "base", work / "base-artifact"),
        )


@pytest.fixture(scope="module")
def reconstructed(served_family, tmp_path_factory):
    """Each expert as `meswitch reconstruct` writes it, loaded with transformers: the reference."""
    out = tmp_path_factory.mktemp("reconstructed")
    base = Checkpoint(served_family.base)
    models = {}
    for name, art in served_family.artifacts.items():
        folder = reconstruct(base, art, out / name)
        models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    models[None] = AutoModelForCausalLM.from_pretrained(served_family.base, dtype=torch.float32).eval()
    return models


def greedy(model, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    out, cache = [], DynamicCache()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), **{_cache_kwarg(type(model)): cache}, use_cache=True).logits
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            if tok in stop:
                break
            out.append(tok)
            logits = model(input_ids=torch.tensor([[tok]]), **{_cache_kwarg(type(model)): cache}, use_cache=True).logits
    return out


def check_continuous_batching(eng, slots, reconstructed, config) -> None:
    """16 requests over every expert and the base, arriving while others run: each generates what its
    expert alone generates greedily (``reconstructed`` models), and sequences share forward passes."""
    from meswitch.serving.batching import LENGTH, STOP, GenRequest, Scheduler

    sched = Scheduler(eng, config).start()
    rng = random.Random(1)
    stop = {2}
    jobs, outputs, finishes = [], {}, {}
    done = threading.Semaphore(0)
    for _ in range(16):
        name = rng.choice([*sorted(slots), None])
        prompt = [rng.randrange(3, eng.base_vocab) for _ in range(rng.randint(1, 30))]
        jobs.append((name, prompt, rng.randint(1, 12)))
    try:
        for k, (name, prompt, n) in enumerate(jobs):
            outputs[k] = []

            def on_event(ev, k=k):
                if ev.token is not None:
                    outputs[k].append(ev.token)
                if ev.finish:
                    finishes[k] = ev.finish
                    done.release()

            sched.submit(GenRequest(prompt, slots[name] if name else None, n, on_event, stop_ids=frozenset(stop)))
            if k % 3 == 0:
                assert done.acquire(timeout=60)  # let some finish while others join: rows come and go
                done.release()
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        sched.stop()
    assert sched.steps < sum(n for *_, n in jobs)  # sequences shared forward passes
    for k, (name, prompt, n) in enumerate(jobs):
        want = greedy(reconstructed[name], prompt, n, stop)
        assert outputs[k] == want, (k, name)
        assert finishes[k] == (LENGTH if len(want) == n else STOP)
