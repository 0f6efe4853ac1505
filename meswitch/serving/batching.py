"""Continuous batching across experts: one forward per step for every running sequence, whatever its expert.

Each step either prefills a cohort of waiting requests (left-padded, one forward) and joins them
to the running batch, or decodes one token for every running sequence. Sequences leave the batch
the step they finish, and waiting ones join at the next step boundary, so a short request never
waits for a long one to end. The KV cache is the stock transformers ``DynamicCache``: one row per
sequence, left-padded, with a 2-D attention mask and explicit position ids; joining two batches
pads the shorter cache on the left and concatenates, leaving a batch trims the rows and any
all-padding columns (the approach of TGI's ``CausalLMBatch.concatenate``/``filter``).

Why not transformers' own ``ContinuousBatchingManager`` (``generate_batch``): its model forward
sees one packed token stream and no request identity, so giving each row its expert means
reaching into private batch-preparation state; greedy vs sampling is one setting per manager;
and the module moves between minor releases. See the serving README section.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from meswitch.serving.engine import MixedExpertEngine
from meswitch.serving.tiers import ExpertSlot

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
# Below this temperature a row is sampled greedily: dividing float32 logits by ~1e-38 overflows and the
# softmax turns to NaN, and sampling that cold is greedy anyway (vLLM's _SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5
# The token _sample gives a row whose logits are not all finite (an expert's forward that overflowed): that
# request fails alone, the batch's other rows go on (their rows of the step are independent of it).
NOT_FINITE = -1


@dataclass
class Event:
    """What the scheduler tells a request: a new token, and/or that it finished (and why)."""

    token: int | None = None
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class GenRequest:
    """One sequence to generate. ``on_event`` is called from the scheduler thread; keep it cheap."""

    prompt: list[int]
    slot: ExpertSlot | None  # None: the base model
    max_new_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for the penalties
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    finished: bool = False
    # the tokens emitted so far, prefilled after the prompt if a failed step sends the request back to the queue
    emitted: list[int] = field(default_factory=list)
    recomputed: bool = False  # it was sent back once: a second failed step fails it

    @property
    def vocab(self) -> int | None:
        return None if self.slot is None else self.slot.vocab

    @property
    def context(self) -> list[int]:
        """What its prefill reads: the prompt, and after a failed step the tokens it had emitted (the last of them
        not yet read by the model), so that the prefill's last position gives the next token."""
        return self.prompt + self.emitted if self.emitted else self.prompt


class StepObserver(Protocol):
    def step(self, kind: str, rows: int, tokens: int, seconds: float) -> None: ...


class SchedulerError(Exception):
    """A request the scheduler cannot take: the message is fit for a 4xx answer, ``param`` names the
    request field at fault and ``code`` is OpenAI's error code, if any."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class SchedulerConfig:
    max_batch: int = 32  # sequences in one forward
    max_prefill_tokens: int = 4096  # padded prompt tokens in one prefill forward
    window_s: float = 0.005  # when idle, wait this long for more requests before a prefill
    # While sequences are decoding, waiting requests join (one prefill forward for all of them) once
    # the oldest has waited this long, or at once when at least half as many wait as run: fewer,
    # fuller prefills instead of one forward per arrival.
    join_wait_s: float = 0.02
    idle_wait_s: float = 0.25
    # Decode through meswitch.serving.decoder (static KV cache, CUDA graphs on a GPU): None = on a GPU
    # with the packed payload. Its cache holds max_batch rows of static_max_len positions.
    static: bool | None = None
    static_max_len: int = 2048
    # static decode: capture every batch size's step at start (StaticDecoder.warm_up), not on its first batch
    warm_up: bool = True


class _Batch:
    """Running sequences: a left-padded KV cache, its mask, and per-row next position and last token."""

    def __init__(self, seqs, cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor):
        self.seqs: list[GenRequest] = seqs
        self.cache, self.mask, self.pos, self.last = cache, mask, pos, last

    def __len__(self) -> int:
        return len(self.seqs)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k, v) for k, v, *_ in self.cache]

    def select(self, idx: list[int]) -> None:
        """Keep rows ``idx`` (in that order) and drop leading columns that are padding in every row."""
        t = torch.tensor(idx, device=self.mask.device)
        mask = self.mask.index_select(0, t)
        real = mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        layers = [(k.index_select(0, t)[:, :, start:], v.index_select(0, t)[:, :, start:]) for k, v in self.layers()]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.pos, self.last = self.pos.index_select(0, t), self.last.index_select(0, t)
        self.seqs = [self.seqs[i] for i in idx]

    def join(self, other: _Batch) -> None:
        """Append ``other``'s rows, left-padding the shorter cache so every row's tokens end at the right."""
        a, b = self.mask.shape[1], other.mask.shape[1]
        length = max(a, b)

        def pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return x
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        def both(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.cat([pad(x, length - a, 2), pad(y, length - b, 2)])

        pairs = zip(self.layers(), other.layers(), strict=True)
        layers = [(both(k1, k2), both(v1, v2)) for (k1, v1), (k2, v2) in pairs]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([pad(self.mask, length - a, 1), pad(other.mask, length - b, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])
        self.seqs = self.seqs + other.seqs


class _StaticBatch:
    """Running sequences in the static decoder's cache: sequence i in cache row i, its next position
    and last token; leaving rows are filled by moving the last rows down (order does not matter)."""

    def __init__(self, decoder, seqs: list[GenRequest], pos: list[int], last: torch.Tensor):
        self.decoder, self.seqs, self.pos, self.last = decoder, seqs, pos, last

    def __len__(self) -> int:
        return len(self.seqs)

    def select(self, idx: list[int]) -> None:
        """Keep rows ``idx`` (ascending): each row past the kept count moves into a freed row below."""
        keep, kept = len(idx), set(idx)
        holes = [r for r in range(keep) if r not in kept]
        movers = [r for r in idx if r >= keep]
        order = list(range(len(self.seqs)))
        for src, dst in zip(movers, holes, strict=True):
            self.decoder.move_row(src, dst, self.pos[src])
            order[dst] = src
        order = order[:keep]
        self.seqs = [self.seqs[i] for i in order]
        self.pos = [self.pos[i] for i in order]
        self.last = self.last.index_select(0, torch.tensor(order, device=self.last.device))

    def join(self, other: _StaticBatch) -> None:
        """Append ``other``, prefilled into the rows right after this batch's."""
        self.seqs, self.pos = self.seqs + other.seqs, self.pos + other.pos
        self.last = torch.cat([self.last, other.last])


def _order_key(req: GenRequest) -> int:
    return -1 if req.slot is None else req.slot.index


class Scheduler:
    """Owns one engine's forward passes: a background thread steps the running batch."""

    def __init__(
        self, engine: MixedExpertEngine, config: SchedulerConfig | None = None, observer: StepObserver | None = None
    ):
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.observer = observer
        self._cond = threading.Condition()
        self._inbox: deque[GenRequest] = deque()
        self._waiting: deque[GenRequest] = deque()
        self._batch: _Batch | _StaticBatch | None = None
        self._cohort: list[GenRequest] = []  # being prefilled: in neither the queue nor the batch
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.decoder = None
        use_static = self.config.static
        if use_static is None:
            use_static = engine.device.type == "cuda" and engine.banks is not None
        if use_static:
            from meswitch.serving.decoder import DecoderConfig, StaticDecoder

            rows = self.config.max_batch
            buckets = tuple(sorted({min(b, rows) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < rows} | {rows}))
            self.decoder = StaticDecoder(engine, DecoderConfig(max_rows=rows, buckets=buckets,
                                                               max_len=min(self.config.static_max_len,
                                                                           engine.max_positions)))  # fmt: skip

    # ---- public API (any thread) -------------------------------------------------------------
    def start(self) -> Scheduler:
        if self.decoder is not None and self.config.warm_up:
            t0 = time.perf_counter()
            graphs = self.decoder.warm_up()
            log.info("decode warm-up: %d graphs in %.1f s", graphs, time.perf_counter() - t0)
        self._thread = threading.Thread(target=self._run, name="meswitch-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Finish what is running and queued, then end the thread (``wait``: block until it has)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if wait and self._thread is not None:
            self._thread.join(timeout)

    def retire(self, slot: ExpertSlot) -> None:
        """Free an expert version once no sequence uses it (now, if none does)."""
        with self._cond:
            slot.retired = True
            free = slot.in_use == 0
        if free:
            self.engine.remove_expert(slot)

    @property
    def max_len(self) -> int:
        """Positions one sequence may use, prompt and answer: the model's context, or the static cache's rows."""
        return self.engine.max_positions if self.decoder is None else self.decoder.config.max_len

    def validate(self, prompt: list[int], slot: ExpertSlot | None, max_new_tokens: int) -> None:
        if not prompt:
            raise SchedulerError("the prompt is empty", param="prompt")
        vocab = self.engine.base_vocab if slot is None else slot.vocab
        if max(prompt) >= vocab or min(prompt) < 0:
            raise SchedulerError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if max_new_tokens < 1:
            raise SchedulerError("max_tokens must be at least 1", param="max_tokens")
        if len(prompt) + max_new_tokens > self.max_len:
            raise SchedulerError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def submit(self, req: GenRequest) -> GenRequest:
        self.validate(req.prompt, req.slot, req.max_new_tokens)
        with self._cond:
            if self._stopping:
                raise SchedulerError("the scheduler is shutting down")
            if req.slot is not None:
                req.slot.in_use += 1
            self._inbox.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: GenRequest) -> None:
        req.cancelled = True
        with self._cond:
            self._cond.notify_all()

    @property
    def load(self) -> dict[str, int]:
        """Requests decoding or in the prefill under way (``running``), and queued (``waiting``)."""
        running = (len(self._batch) if self._batch else 0) + len(self._cohort)
        return {"running": running, "waiting": len(self._waiting) + len(self._inbox)}

    def idle(self) -> bool:
        return not self._batch and not self._waiting and not self._inbox

    # ---- the loop (scheduler thread) ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._inbox and not self._waiting and not self._batch:
                    if self._stopping:
                        break
                    self._cond.wait(self.config.idle_wait_s)
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._step()
            except Exception as e:  # a failed forward sends its rows back once, fails them the second time
                log.exception("batch step failed")
                self._recompute(f"{type(e).__name__}: {e}")

    def _should_prefill(self) -> bool:
        if not self._waiting:
            return False
        if self._batch is None:
            return True
        running = len(self._batch)
        if running >= self.config.max_batch:
            return False
        if len(self._waiting) >= max(1, running // 2):
            return True
        return time.perf_counter() - self._waiting[0].created >= self.config.join_wait_s

    def _step(self) -> None:
        self._drop_cancelled()
        if self._should_prefill():
            if self._batch is None and self.config.window_s > 0 and len(self._waiting) < self.config.max_batch:
                time.sleep(self.config.window_s)  # micro-batching window: let a burst arrive together
                with self._cond:
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
            cohort = self._pick()
            if cohort:
                self._cohort = cohort
                try:
                    self._prefill(cohort)
                except Exception as e:
                    if self._batch is not None and any(r is s for r in cohort for s in self._batch.seqs):
                        raise  # it had joined the batch: the batch's state is in doubt, all of it fails
                    # the running batch never saw it (its own cache, or cache rows past the batch's): it goes on
                    log.exception(
                        "prefill of %d requests failed; the %d running go on", len(cohort), len(self._batch or [])
                    )
                    for r in cohort:
                        self._finish(r, ERROR, f"{type(e).__name__}: {e}")
                finally:
                    self._cohort = []
                return
        if self._batch:
            self._decode()

    def _pick(self) -> list[GenRequest]:
        room = self.config.max_batch - (len(self._batch) if self._batch else 0)
        running = [s.slot for s in self._batch.seqs] if self._batch else []
        cohort: list[GenRequest] = []
        longest = 0
        skipped: list[GenRequest] = []
        while self._waiting and len(cohort) < room:
            req = self._waiting.popleft()
            if req.cancelled:
                self._finish(req, CANCELLED)
                continue
            if req.recomputed and cohort:  # back from a failed step: prefilled alone, to fail alone if it fails again
                skipped.append(req)
                break
            n = max(longest, len(req.context))
            first = not cohort and not running
            over_tokens = n * (len(cohort) + 1) > self.config.max_prefill_tokens
            slots = [*running, *(r.slot for r in cohort), req.slot]
            if not first and (over_tokens or not self.engine.tiers.fits(slots)):
                skipped.append(req)
                if over_tokens:
                    break
                continue
            cohort.append(req)
            longest = n
            if req.recomputed:
                break
        self._waiting.extendleft(reversed(skipped))
        return cohort

    def _prefill(self, cohort: list[GenRequest]) -> None:
        if self.decoder is not None:
            return self._prefill_static(cohort)
        t0 = time.perf_counter()
        cohort.sort(key=_order_key)
        dev = self.engine.device
        contexts = [r.context for r in cohort]
        length = max(len(c) for c in contexts)
        ids = torch.zeros(len(cohort), length, dtype=torch.long)
        mask = torch.zeros(len(cohort), length, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, length - len(c) :] = torch.tensor(c)
            mask[i, length - len(c) :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        mask = mask.to(dev)
        logits = self.engine.forward(ids, [r.slot for r in cohort], mask, pos, cache, logits_to_keep=1)[:, -1]
        tokens = self._sample(logits, cohort)
        lengths = torch.tensor([len(c) for c in contexts], device=dev)
        new = _Batch(list(cohort), cache, mask, lengths, tokens)
        if self._batch is None:
            self._batch = new
        else:
            self._batch.join(new)
            order = sorted(range(len(self._batch)), key=lambda i: _order_key(self._batch.seqs[i]))
            if order != list(range(len(order))):
                self._batch.select(order)
        self._emit(cohort, tokens.tolist())
        self._observe("prefill", len(cohort), int(mask.sum()), t0)

    def _prefill_static(self, cohort: list[GenRequest]) -> None:
        t0 = time.perf_counter()
        start = len(self._batch) if self._batch else 0
        rows = range(start, start + len(cohort))
        contexts = [r.context for r in cohort]
        logits = self.decoder.prefill(rows, contexts, [r.slot for r in cohort])
        tokens = self._sample(logits, cohort)
        new = _StaticBatch(self.decoder, list(cohort), [len(c) for c in contexts], tokens)
        if self._batch is None:
            self._batch = new
        else:
            self._batch.join(new)
        self._emit(cohort, tokens.tolist())
        self._observe("prefill", len(cohort), sum(len(c) for c in contexts), t0)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        b = self._batch
        if self.decoder is not None:
            logits = self.decoder.decode(b.last, b.pos, [r.slot for r in b.seqs])
            b.pos = [p + 1 for p in b.pos]
            b.last = self._sample(logits, b.seqs)
            self._emit(list(b.seqs), b.last.tolist())
            self._observe("decode", len(b.seqs), len(b.seqs), t0)
            return
        b.mask = torch.cat([b.mask, b.mask.new_ones(len(b), 1)], dim=1)
        logits = self.engine.forward(
            b.last[:, None], [r.slot for r in b.seqs], b.mask, b.pos[:, None], b.cache, logits_to_keep=1
        )[:, -1]
        b.pos = b.pos + 1
        b.last = self._sample(logits, b.seqs)
        self._emit(list(b.seqs), b.last.tolist())
        self._observe("decode", len(b.seqs), len(b.seqs), t0)

    def _observe(self, kind: str, rows: int, tokens: int, t0: float) -> None:
        self.steps += 1
        if self.observer is not None:
            self.observer.step(kind, rows, tokens, time.perf_counter() - t0)

    # ---- tokens out --------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[GenRequest]) -> torch.Tensor:
        """Greedy where temperature is (nearly) 0, else temperature + nucleus sampling (seeded per request if asked);
        OpenAI's frequency and presence penalties first, for the rows that ask for them. A row with a NaN or
        infinite logit gets ``NOT_FINITE`` (checked on the device, read with the tokens: no sync of its own)."""
        logits = logits.float()
        broken = ~torch.isfinite(logits).all(-1)
        penalised = [i for i, r in enumerate(seqs) if r.counts and (r.frequency_penalty or r.presence_penalty)]
        if penalised:
            logits = logits.clone()  # the model's output is an inference tensor: not updated in place
        for i in penalised:
            r = seqs[i]
            ids = torch.tensor(list(r.counts), device=logits.device)
            n = torch.tensor(list(r.counts.values()), device=logits.device, dtype=logits.dtype)
            logits[i, ids] -= r.frequency_penalty * n + r.presence_penalty
        out = logits.argmax(-1)
        hot = [i for i, r in enumerate(seqs) if r.temperature >= MIN_TEMPERATURE]
        if not hot:
            return out.masked_fill(broken, NOT_FINITE)
        idx = torch.tensor(hot, device=logits.device)
        temps = torch.tensor([seqs[i].temperature for i in hot], device=logits.device)
        top_p = torch.tensor([seqs[i].top_p for i in hot], device=logits.device)
        # a broken row still needs a valid distribution for multinomial (its token is replaced below)
        hot_logits = logits.index_select(0, idx).masked_fill(broken.index_select(0, idx)[:, None], 0.0)
        probs = F.softmax(hot_logits / temps[:, None], dim=-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        for j, i in enumerate(hot):
            r = seqs[i]
            gen = None
            if r.seed is not None:
                gen = getattr(r, "_gen", None)
                if gen is None:
                    gen = torch.Generator(device=logits.device).manual_seed(r.seed)
                    r._gen = gen
            out[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return out.masked_fill(broken, NOT_FINITE)

    def _emit(self, seqs: list[GenRequest], tokens: list[int]) -> None:
        for r, tok in zip(seqs, tokens, strict=True):
            if tok == NOT_FINITE:
                who = f"expert {r.slot.name!r}" if r.slot is not None else "the base model"
                log.error("request %s: %s gave non-finite logits at token %d", r.id, who, r.generated + 1)
                self._finish(
                    r,
                    ERROR,
                    f"{who} gave NaN or infinite logits at token {r.generated + 1}; "
                    "the other requests of the batch go on",
                )
                continue
            r.generated += 1
            r.emitted.append(tok)
            if r.frequency_penalty or r.presence_penalty:
                r.counts[tok] = r.counts.get(tok, 0) + 1
            reason = None
            if tok in r.stop_ids:
                reason = STOP
            elif r.generated >= r.max_new_tokens:
                reason = LENGTH
            elif r.cancelled:
                reason = CANCELLED
            self._deliver(r, Event(token=None if reason == STOP else tok))
            if reason:
                self._finish(r, reason)
        self._drop_finished()

    def _deliver(self, r: GenRequest, ev: Event) -> None:
        if ev.token is None and ev.finish is None:
            return
        try:
            r.on_event(ev)
        except Exception:  # a broken consumer must not stop the batch
            log.exception("request %s: event handler failed", r.id)
            r.cancelled = True

    def _finish(self, r: GenRequest, reason: str, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if r.slot is not None:
            with self._cond:
                r.slot.in_use -= 1
                free = r.slot.retired and r.slot.in_use == 0
            if free:
                self.engine.remove_expert(r.slot)
        self._deliver(r, Event(finish=reason, error=error))

    def _drop_cancelled(self) -> None:
        if self._batch and any(r.cancelled for r in self._batch.seqs):
            for r in self._batch.seqs:
                if r.cancelled:
                    self._finish(r, CANCELLED)
            self._drop_finished()

    def _drop_finished(self) -> None:
        if self._batch is None or not any(r.finished for r in self._batch.seqs):
            return
        alive = [i for i, r in enumerate(self._batch.seqs) if not r.finished]
        if alive:
            self._batch.select(alive)
        else:
            self._batch = None

    def _recompute(self, error: str) -> None:
        """After a step that raised (a GPU out of memory while the batch held the most, say), the batch's state is
        in doubt: every request in it goes back to the front of the queue, to be prefilled again with what it has
        emitted (vLLM's preemption by recompute), each in a prefill of its own (:meth:`_pick`). A passing failure
        costs its requests a prefill, not their answers; a prefill that fails again fails its one request; a
        request caught in a second failed step fails with the error."""
        rows = (list(self._batch.seqs) if self._batch else []) + self._cohort
        self._batch, self._cohort = None, []
        again = [r for r in rows if not r.finished and not r.recomputed]
        for r in rows:
            if r.recomputed:
                self._finish(r, ERROR, error)
        for r in again:
            r.recomputed = True
        self._waiting.extendleft(reversed(again))
        if again:
            log.warning("%d requests go back to the queue, to be prefilled with what they emitted", len(again))
