"""The static-cache decoder and the slot tables it reads, against the engine's eager forward.

On the CPU the decoder runs its step eagerly through the same code a CUDA graph captures (device
tile tables, slot tensors, the registered ``meswitch::mixed_delta_tiles`` op on its reference), so
these tests check the captured step's arithmetic; tests/test_kernels.py replays it as a graph on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from serving_fixtures import check_continuous_batching, reconstructed, torch_threads  # noqa: F401

from meswitch.kernels import DeltaBank, ExpertRows, mixed_delta_reference
from meswitch.kernels.bank import device_tiles
from meswitch.kernels.launch_config import ROW_BLOCKS, row_block, row_blocks
from meswitch.kernels.ops import mixed_delta_tiles, tile_rows
from meswitch.kernels.row_sums import SumsPlan, e4m3_inputs, launch_args, launch_inputs, row_sums, sum_weights
from meswitch.serving.batching import SchedulerConfig
from meswitch.serving.decoder import DecoderConfig, StaticDecoder, length_bucket
from meswitch.serving.engine import EngineConfig, EngineError, MixedExpertEngine
from meswitch.serving.mixed import BatchExperts, FusedLinears, MixedLinear

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_device_tiles_cover_every_expert_row_once(block_m):
    gen = torch.Generator().manual_seed(0)
    for m in (1, 5, 33):
        ids = torch.randint(-1, 4, (m,), generator=gen)
        tiles = device_tiles(ids, block_m)
        assert tiles.shape == (m, 2 + block_m)
        used = tiles[tiles[:, 1] > 0]
        assert (used[:, 1] <= block_m).all()
        back = torch.full((m,), -1)
        for e, count, *rows in used.tolist():
            assert (back[rows[:count]] == -1).all()  # no row in two tiles
            back[rows[:count]] = e
        assert torch.equal(back, ids)
        # as many tiles as the host-built table of the same rows, so no expert's codes stream twice
        assert len(used) == len(ExpertRows.from_ids(ids).tiles(block_m, torch.device("cpu")))


def test_tiles_op_equals_the_reference_eagerly_and_under_torch_compile():
    bank = DeltaBank.random(3, (48, 256), bits=2, salient=4, generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(6, 256), torch.randn(6, 48)
    ids = torch.tensor([2, -1, 0, 2, 1, -1])
    want = mixed_delta_reference(x, bank, ids, y.clone())
    tiles = device_tiles(ids, 16)
    torch.testing.assert_close(mixed_delta_tiles(x, bank, tiles, y.clone()), want)
    assert torch.equal(tile_rows(tiles).order, ExpertRows.from_ids(ids).order)
    compiled = torch.compile(lambda x, y, t: mixed_delta_tiles(x, bank, t, y), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, y.clone(), tiles), want)  # the op traces as one opaque node
    with pytest.raises(ValueError, match="tiles must be"):
        mixed_delta_tiles(x, bank, tiles[:3], y.clone())


def test_length_buckets_are_powers_of_two_within_the_cache():
    cfg = DecoderConfig(max_len=1000, min_len_bucket=128)
    assert [length_bucket(n, cfg) for n in (1, 128, 129, 600, 1000)] == [128, 128, 256, 1000, 1000]


@pytest.fixture(scope="module")
def packed(served_family):
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload="packed"))
    slots = {name: eng.add_expert(art) for name, art in served_family.artifacts.items()}
    return eng, slots


def test_decoder_steps_equal_the_engine_forward_for_a_mixed_batch(packed):
    eng, slots = packed
    names = sorted(slots)
    rows = [slots[names[0]], None, slots[names[1]], slots[names[0]], slots[names[2]]]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, eng.base_vocab, (n,), generator=gen).tolist() for n in (5, 9, 1, 7, 3)]
    dec = StaticDecoder(eng, DecoderConfig(max_rows=8, max_len=64, buckets=(2, 8), min_len_bucket=16))
    seqs = [list(p) for p in prompts]
    logits = dec.prefill(range(len(rows)), prompts, rows)
    for step in range(6):
        for i, (seq, slot) in enumerate(zip(seqs, rows, strict=True)):
            want = eng.forward(torch.tensor([seq]), [slot])[0, -1]
            torch.testing.assert_close(logits[i], want, **TOL)
        nxt = logits.argmax(-1)
        for seq, t in zip(seqs, nxt.tolist(), strict=True):
            seq.append(t)
        # the batch shrinks to its first rows after three steps: a smaller bucket, other rows untouched
        live = len(rows) if step < 3 else 2
        logits = dec.decode(nxt[:live], [len(s) - 1 for s in seqs[:live]], rows[:live])
        seqs, rows = seqs[:live], rows[:live]
    assert (logits[0] - logits[1]).abs().max() > 1e-2  # an expert row and a base row differ: the check has teeth


def _prefill_and_step(eng, slots, **config) -> tuple[StaticDecoder, torch.Tensor, torch.Tensor]:
    """A 4-row decoder built with ``config``, its prefill logits for a batch mixing two experts and a base row,
    and the decode step's logits after it."""
    rows = [slots[sorted(slots)[0]], None, slots[sorted(slots)[1]]]
    dec = StaticDecoder(eng, DecoderConfig(max_rows=4, max_len=32, buckets=(4,), min_len_bucket=16, **config))
    first = dec.prefill(range(3), [[5, 6, 7], [9, 10], [11, 12, 13, 14]], rows)
    return dec, first, dec.decode(first.argmax(-1), [3, 2, 4], rows)


def test_compiled_glue_gives_the_same_steps(packed):
    eng, slots = packed
    (_, _, eager), (_, _, compiled) = (_prefill_and_step(eng, slots, compile_glue=glue) for glue in (False, True))
    torch.testing.assert_close(compiled, eager, **TOL)


@pytest.mark.parametrize("glue", [False, True])
def test_the_attention_op_gives_the_sdpa_paths_steps(packed, glue):
    """The decode step through ``meswitch::decode_attention`` (rotary embedding, cache writes and attention in one
    op; its reference here, the Triton kernel on a GPU) against rotary, index writes and SDPA apart."""
    eng, slots = packed
    (_, *apart), (_, *op) = (
        _prefill_and_step(eng, slots, compile_glue=glue, attention_kernel=kernel) for kernel in (False, True)
    )
    torch.testing.assert_close(op, apart, **TOL)


def test_fused_projections_give_the_same_steps_on_one_copy_of_the_weights(packed):
    eng, slots = packed
    (_, *apart), (dec, *fused_steps) = (
        _prefill_and_step(eng, slots, compile_glue=False, fuse_projections=fuse) for fuse in (False, True)
    )
    torch.testing.assert_close(fused_steps, apart, **TOL)
    attn, mlp = dec.layers[0].self_attn, dec.layers[0].mlp
    qkv, gate_up = dec._fused[0]
    for fused, mods in ((qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (gate_up, (mlp.gate_proj, mlp.up_proj))):
        storage = fused.weight.untyped_storage().data_ptr()
        assert all(m.fused is fused and m.base.weight.untyped_storage().data_ptr() == storage for m in mods)
    assert StaticDecoder(eng, dec.config)._fused[0] == (qkv, gate_up)  # a second decoder shares the fusion


@pytest.mark.parametrize("glue", [False, True])
def test_deltas_added_in_the_next_kernels_give_the_same_steps(packed, glue, monkeypatch):
    """overlap_deltas: each projection's deltas come apart from one zeroed buffer a step and are added inside the
    residual add and SwiGLU (on a GPU, computed beside the base GEMM), against the deltas added in place."""
    eng, slots = packed
    _, *serial = _prefill_and_step(eng, slots, compile_glue=glue, overlap_deltas=False)
    sizes, real = [], torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **kw: sizes.append(a[0]) or real(*a, **kw))
    dec, *apart = _prefill_and_step(eng, slots, compile_glue=glue, overlap_deltas=True)
    monkeypatch.undo()
    torch.testing.assert_close(apart, serial, **TOL)
    steps = [n for n in sizes if isinstance(n, int) and n == 4 * dec._delta_width]  # bucket 4 x every projection
    per_projection = [n for n in sizes if isinstance(n, tuple) and len(n) == 3]  # [B, 1, N] (the caches are 4-d)
    assert len(steps) == 1 and not per_projection  # one zeroed buffer for the step, none a projection


def test_grouped_deltas_give_the_per_projection_steps_on_one_copy_of_the_codes(packed):
    """q/k/v's and gate/up's expert deltas in one launch each, from their banks held as one, against a launch per
    projection on its view of the same bank."""
    eng, slots = packed
    (_, *apart), (dec, *grouped) = (
        _prefill_and_step(eng, slots, compile_glue=False, group_deltas=group) for group in (False, True)
    )
    torch.testing.assert_close(grouped, apart, **TOL)
    for gb in eng.banks.grids.values():
        for fused in dec._fused[0]:
            bank = gb.groups[fused.names]
            assert bank.splits == tuple(fused.sizes)
            storage = bank.packed.untyped_storage().data_ptr()
            assert all(gb.banks[name].packed.untyped_storage().data_ptr() == storage for name in fused.names)


def test_fused_linears_take_biases_on_all_or_none():
    torch.manual_seed(0)
    ctx = BatchExperts()
    mods = [MixedLinear(torch.nn.Linear(8, n), f"w{n}", None, ctx) for n in (4, 2, 2)]
    x = torch.randn(3, 1, 8)
    want = [m(x) for m in mods]
    got = FusedLinears(mods)(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert [m(x).shape[-1] for m in mods] == [4, 2, 2]  # each module still runs alone on its block
    with pytest.raises(ValueError, match="bias"):
        FusedLinears([MixedLinear(torch.nn.Linear(8, 4), "a", None, ctx),
                      MixedLinear(torch.nn.Linear(8, 4, bias=False), "b", None, ctx)])  # fmt: skip


def test_compiled_glue_specialises_past_dynamos_recompile_limit(packed):
    """The glue compiles once for batch 1 and once for any larger batch, per grid set: more than dynamo
    allows a function by default with enough grid sets (its limit set to 1 here, which two buckets with base
    rows and one grid exceed); a refused compilation failed the real family's warm-up on the GPU."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eng, _ = packed
    torch._dynamo.reset()
    counters.clear()
    cfg = DecoderConfig(max_rows=4, max_len=32, buckets=(1, 2, 4), min_len_bucket=16, compile_glue=True)
    # torch's config.patch, not monkeypatch: monkeypatch's undo deletes the option (hides it from later tests)
    with torch._dynamo.config.patch(recompile_limit=1):
        dec = StaticDecoder(eng, cfg)
        assert dec.warm_up() == 0  # no compilation refused
        assert torch._dynamo.config.recompile_limit == 1  # the decoder raised it for its own calls only
    # batch 1 and any batch, for the norm and the add + norm with and without the grid's slot tables (and the expert
    # deltas added in it), and SwiGLU with and without deltas (the rotary embedding is in the attention op): 2 x 6
    assert counters["stats"]["unique_graphs"] == 12


def test_the_compiled_glue_gives_the_row_sums_of_what_it_stores(packed):
    """The compiled residual add + norm and SwiGLU also give x's row sums for the delta kernel's epilogue
    (kernels/row_sums.py): the sums of x as stored in bf16, not of the fp32 values the fused kernel held before
    rounding (the epilogue subtracts 2**7·Σx-sized terms, so a rounding's worth of difference there is of the
    delta's own size)."""
    eng, _ = packed
    dec = StaticDecoder(eng, DecoderConfig(max_rows=4, max_len=32, buckets=(4,), compile_glue=True))
    g = torch.Generator().manual_seed(0)
    x, y, d = (torch.randn(4, 1, 512, generator=g).bfloat16() for _ in range(3))
    w = (torch.rand(512, generator=g) + 0.5).bfloat16()
    weights = tuple(sum_weights(SumsPlan(512, 256, 2, bits, True)) for bits in (2, 1))  # two grids
    x2, h, sums = dec._glue["add_norm"](x, y, 1e-5, w, [], d, weights)
    assert torch.equal(x2, x + (y + d)) and len(sums) == 2
    for got, want in zip(sums, row_sums(h, weights), strict=True):
        assert got.shape == (4, 1, 4) and _rel(got, want) < 1e-5
    h1, (sums1,) = dec._glue["norm"](x, 1e-5, w, [], weights[:1])
    assert _rel(sums1, row_sums(h1, weights[:1])[0]) < 1e-5
    gate, up = (torch.randn(4, 1, 512, generator=g).bfloat16() for _ in range(2))
    act, (act_sums,) = dec._glue["swiglu"](gate, up, None, None, weights[:1])
    assert torch.equal(act, torch.nn.functional.silu(gate) * up)
    assert _rel(act_sums, row_sums(act, weights[:1])[0]) < 1e-5
    # FP8 planes: x in e4m3 in their order, its row scales and sums, from what the glue stores
    fp8 = (sum_weights(SumsPlan(512, 256, 2, 2, True, fp8=True)),)
    for h, (got,) in (dec._glue["add_norm"](x, y, 1e-5, w, [], d, fp8)[1:], dec._glue["swiglu"](gate, up, d, y, fp8)):
        x8, r, sums = e4m3_inputs(h, *fp8[0])
        assert got[0].dtype == torch.float8_e4m3fn and torch.equal(got[0].float(), x8.float())
        assert torch.equal(got[1], r) and _rel(got[2], sums) < 1e-6


@pytest.mark.parametrize("fp8", [False, True])
def test_the_glue_hands_each_delta_launch_the_row_sums_of_its_x(packed, monkeypatch, fp8):
    """With ``glue_sums`` the norm before q/k/v and gate/up and SwiGLU before down hand their launches x's row sums
    as each launch plans them, and with FP8 planes x in e4m3 and its row scales too. The plans need the GPU's SM
    count and the Triton kernel, which this machine lacks: both are patched in (the H200's 132 SMs), and the op runs
    its reference, which ignores them, so the steps must equal those without them; every input that reached the op
    is checked against x."""
    from meswitch.kernels import launch_config, ops
    from meswitch.kernels.launch_config import sums_plan
    from meswitch.kernels.ops import launch_tiles

    eng, slots = packed
    monkeypatch.setattr(launch_config, "_sm_count", lambda device: 132)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    if fp8:
        monkeypatch.setenv("MESWITCH_DELTA_CONFIG", '{"fp8_planes": true}')
    seen, real = [], ops.mixed_delta_tiles

    def spy(x, bank, tiles, y, **kw):
        seen.append((x.clone(), bank, tiles.shape[1] - 2, kw))
        return real(x, bank, tiles, y, **kw)

    monkeypatch.setattr(ops, "mixed_delta_tiles", spy)
    glue = {"compile_glue": True, "block_m": 16 if fp8 else None}  # FP8 planes take 16-row tiles or more
    (_, *without), (dec, *given) = (_prefill_and_step(eng, slots, **glue, glue_sums=g) for g in (False, True))
    torch.testing.assert_close(given, without, **TOL)
    summed = [(x, bank, block_m, kw) for x, bank, block_m, kw in seen if kw.get("sums") is not None]
    grids = {eng.banks.index(slots[name].key)[0] for name in sorted(slots)[:2]}  # _prefill_and_step's two experts
    assert len(summed) == 3 * len(dec.layers) * len(grids)  # q/k/v, gate/up, down: a launch each per grid
    for x, bank, block_m, kw in summed:
        plan = sums_plan(bank, block_m, launch_tiles(x.shape[0], bank), x.device, x.dtype)
        assert plan.fp8 == fp8 and set(kw) == ({"sums", "x8", "r"} if fp8 else {"sums"})
        want = launch_args(launch_inputs(x, [sum_weights(plan)])[0], x.shape[0])
        assert kw["sums"].shape == (x.shape[0], plan.splits, 2)
        assert _rel(kw["sums"], want["sums"]) < 1e-5  # the compiled reduction's order, not eager's
        if fp8:
            assert torch.equal(kw["x8"].float(), want["x8"].float()) and torch.equal(kw["r"], want["r"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_a_step_tiles_the_delta_rows_by_8_unless_an_expert_has_more_rows_in_the_batch(packed, monkeypatch):
    """``DecoderConfig.block_m=None``: 8-row delta tiles while no expert has more than 8 rows in the batch (many
    experts with few rows each: half the padding of 16), 16 up to 32, one 64-row tile beyond (an expert's codes
    unpacked once); a fixed ``block_m`` for every batch."""
    assert [row_block(n) for n in (1, 8, 9, 16, 32, 33, 64)] == [8, 8, 16, 16, 16, 64, 64]
    assert [row_blocks(b) for b in (1, 8, 16, 32, 64)] == [(8,), (8,), (8, 16), (8, 16), ROW_BLOCKS]
    eng, slots = packed
    one = slots[sorted(slots)[0]]
    cfg = DecoderConfig(max_rows=16, max_len=32, buckets=(16,), min_len_bucket=16, compile_glue=False)
    picked = []
    for block_m, rows in ((None, [one] * 9), (None, [one] * 8 + [None] * 8), (16, [one] * 2)):
        dec = StaticDecoder(eng, DecoderConfig(**{**cfg.__dict__, "block_m": block_m}))
        step = dec._decode_step
        monkeypatch.setattr(
            dec, "_decode_step", lambda st, grids, *a, step=step: picked.append(a[2]) or step(st, grids, *a)
        )
        last = dec.prefill(range(len(rows)), [[5, 6]] * len(rows), rows).argmax(-1)
        dec.decode(last, [2] * len(rows), rows)
    assert picked == [16, 8, 16]


def test_warm_up_runs_every_bucket_without_touching_the_cache_or_the_answers(packed, monkeypatch):
    eng, slots = packed
    rows = [slots[sorted(slots)[0]], None, slots[sorted(slots)[2]]]
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    cfg = DecoderConfig(max_rows=16, max_len=64, buckets=(1, 16), min_len_bucket=16, compile_glue=False)

    def answers(dec):
        last = dec.prefill(range(3), prompts, rows).argmax(-1)
        return dec.decode(last, [3, 2, 4], rows).argmax(-1).tolist(), dec.decode(last[:1], [3], rows[:1])

    cold, warm = StaticDecoder(eng, cfg), StaticDecoder(eng, cfg)
    steps, step = [], warm._decode_step
    monkeypatch.setattr(
        warm,
        "_decode_step",
        lambda st, grids, *a: steps.append((len(st["tokens"]), grids, a[2])) or step(st, grids, *a),
    )
    assert warm.warm_up(spans=(16, 32)) == 0  # no graphs on the CPU: each step ran once, eagerly
    grids = sorted(eng.banks.grids, key=repr)
    # per span: base rows in each bucket, the one grid at 8 rows a tile in bucket 1 and at 8 and 16 in bucket 16
    # (no batch of 16 rows has more than 32 on an expert: no 64-row tile)
    assert len(grids) == 1 and len(steps) == (2 + 3) * 2
    want = {(b, (), 8) for b in (1, 16)} | {(1, (grids[0],), 8)} | {(16, (grids[0],), m) for m in (8, 16)}
    assert set(steps) == want  # a base batch at the row block it is given (8), unused there
    assert all(k[:16].abs().sum() == 0 for k in warm.k)  # rows 0..15 untouched: warm-up writes the scratch row
    monkeypatch.undo()
    (want_tokens, want_logits), (tokens, logits) = answers(cold), answers(warm)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, **TOL)


def test_slots_are_reused_in_place_and_capacity_avoids_reallocation(served_family):
    arts = sorted(served_family.artifacts.items())
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload="packed", bank_capacity=2))
    a = eng.add_expert(arts[0][1])
    grid = eng.banks.index(a.key)[0]
    gb = eng.banks.grids[grid]
    version, name = gb.version, next(iter(gb.banks))
    storage = gb.banks[name].packed.data_ptr()
    # the same expert again (same salient counts): the reserved slot, no reallocation
    b = eng.add_expert(arts[0][1], version="copy")
    assert (gb.version, gb.banks[name].packed.data_ptr()) == (version, storage)
    eng.remove_expert(a)
    c = eng.add_expert(arts[1][1])  # more salient columns in some matrix: those banks widen
    assert eng.banks.index(c.key) == (grid, 0)  # the freed slot
    ids = torch.randint(3, eng.base_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    want = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload="packed"))
    wc, wb = want.add_expert(arts[1][1]), want.add_expert(arts[0][1])
    torch.testing.assert_close(eng.forward(ids, [c, b]), want.forward(ids, [wc, wb]), **TOL)
    version = gb.version
    eng.add_expert(arts[2][1])
    assert gb.version > version and gb.capacity == 3  # full: the tables grew, graphs must be captured again


def test_the_decoder_refuses_what_it_cannot_serve(served_family):
    dense = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload="dense"))
    with pytest.raises(EngineError, match="needs the packed payload"):
        StaticDecoder(dense)
    eng = MixedExpertEngine(served_family.base, EngineConfig(device="cpu", payload="packed"))
    dec = StaticDecoder(eng, DecoderConfig(max_rows=4, max_len=16, buckets=(4,)))
    with pytest.raises(ValueError, match="largest bucket"):
        dec.decode(torch.zeros(5, dtype=torch.long), [0] * 5, [None] * 5)
    with pytest.raises(ValueError, match="max_len"):
        dec.decode(torch.zeros(1, dtype=torch.long), [16], [None])
    with pytest.raises(ValueError, match="prompt lengths"):
        dec.prefill([0], [list(range(17))], [None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graphs need a GPU; the captured step runs eagerly above")
def test_graph_replay_gives_the_eager_decoders_tokens_on_the_gpu(tmp_path, monkeypatch):
    import shutil

    from serving_fixtures import compress
    from tiny_models import calib_file, make_base, make_expert

    base = make_base(tmp_path / "base")
    calib = calib_file(tmp_path / "calib.jsonl")
    arts = []
    for seed in (3, 4, 5):
        folder = make_expert(base, tmp_path / f"e{seed}", seed=seed)
        shutil.copy(calib, folder / "calib.jsonl")
        arts.append(compress(base, folder, tmp_path / f"art{seed}", f"e{seed}", None))
    eng = MixedExpertEngine(base, EngineConfig(device="cuda", payload="packed"))
    slots = [eng.add_expert(a) for a in arts]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, eng.base_vocab, (n,), generator=gen).tolist() for n in (4, 9, 2, 6, 5)]
    cfg = DecoderConfig(max_rows=8, max_len=64, buckets=(4, 8), min_len_bucket=16)
    graph, eager = StaticDecoder(eng, cfg), StaticDecoder(eng, DecoderConfig(**{**cfg.__dict__, "graphs": False}))
    assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt  # DecoderConfig.blas

    def greedy(dec, rows, steps=10):
        last = dec.prefill(range(len(rows)), prompts[: len(rows)], rows).argmax(-1)
        pos, out = [len(p) for p in prompts[: len(rows)]], []
        for _ in range(steps):
            last = dec.decode(last, pos, rows).argmax(-1)
            out.append(last.tolist())
            pos = [p + 1 for p in pos]
        return out

    rows = [slots[0], None, slots[1], slots[0], slots[2]]
    assert greedy(graph, rows) == greedy(eager, rows)
    captured = graph.captures
    assert captured >= 1
    mix = [slots[2], slots[1], None, slots[2], slots[0]]  # another mix of the same experts: replayed, not recaptured
    assert greedy(graph, mix) == greedy(eager, mix)
    assert graph.captures == captured
    assert greedy(graph, mix[:3]) == greedy(eager, mix[:3])  # a smaller bucket
    # the deltas after the base GEMMs on one stream and added there, not beside them and added in the next kernels
    off = {**cfg.__dict__, "overlap_deltas": False}
    serial, serial_eager = (StaticDecoder(eng, DecoderConfig(**{**off, "graphs": g})) for g in (True, False))
    assert greedy(serial, rows) == greedy(serial_eager, rows) and greedy(serial, mix) == greedy(serial_eager, mix)

    # the Triton decode attention (the default) against PyTorch's SDPA, fed the same tokens
    sdpa = StaticDecoder(eng, DecoderConfig(**{**cfg.__dict__, "attention_kernel": False}))

    def logits(dec, rows, tokens):
        out = [dec.prefill(range(len(rows)), prompts[: len(rows)], rows)]
        pos = [len(p) for p in prompts[: len(rows)]]
        for t in tokens:
            out.append(dec.decode(torch.tensor(t, device="cuda"), pos, rows))
            pos = [p + 1 for p in pos]
        return torch.stack(out).float()

    forced = greedy(graph, rows)
    torch.testing.assert_close(logits(graph, rows, forced), logits(sdpa, rows, forced), atol=5e-2, rtol=2e-2)

    # x's row sums from the compiled glue (the default) against the delta kernel's own
    assert graph._sum_weights, "no delta launch took its row sums from the glue"
    own = StaticDecoder(eng, DecoderConfig(**{**cfg.__dict__, "glue_sums": False}))
    assert greedy(own, rows) == greedy(graph, rows) and not own._sum_weights
    torch.testing.assert_close(logits(graph, rows, forced), logits(own, rows, forced), atol=5e-2, rtol=2e-2)

    # 8- and 16-row tiles, each for every batch (DecoderConfig.block_m; the default picks by the batch): the same
    for block_m in ROW_BLOCKS:
        fixed = StaticDecoder(eng, DecoderConfig(**{**cfg.__dict__, "block_m": block_m}))
        torch.testing.assert_close(logits(graph, rows, forced), logits(fixed, rows, forced), atol=5e-2, rtol=2e-2)

    # FP8 planes (LaunchConfig.fp8_planes, opt-in for an A/B in the step): replayed as eager, and the logits within
    # the rounding of x to e4m3, which touches the delta's product only
    monkeypatch.setenv("MESWITCH_DELTA_CONFIG", '{"fp8_planes": true}')
    rows16 = {**cfg.__dict__, "block_m": 16}  # FP8 planes take 16-row tiles or more
    fp8, fp8_eager = (StaticDecoder(eng, DecoderConfig(**{**rows16, "graphs": g})) for g in (True, False))
    assert greedy(fp8, rows) == greedy(fp8_eager, rows)
    torch.testing.assert_close(logits(graph, rows, forced), logits(fp8, rows, forced), atol=0.15, rtol=5e-2)
    # x in e4m3 from the compiled glue (row_sums.e4m3_inputs) against the kernel's own rounding before each launch
    assert any(plan.fp8 for plan in fp8._sum_weights), "no FP8 launch took x in e4m3 from the glue"
    fp8_own = StaticDecoder(eng, DecoderConfig(**{**rows16, "glue_sums": False}))
    assert greedy(fp8_own, rows) == greedy(fp8, rows)
    torch.testing.assert_close(logits(fp8, rows, forced), logits(fp8_own, rows, forced), atol=5e-2, rtol=2e-2)
    monkeypatch.delenv("MESWITCH_DELTA_CONFIG")

    warm = StaticDecoder(eng, cfg)
    # base rows, and the one grid at each row block a bucket's batch can pick, at the spans 16 and 32 the answers reach
    wanted = sum(1 + len(row_blocks(b)) for b in cfg.buckets) * 2
    assert warm.warm_up(spans=(16, 32)) == wanted
    assert greedy(warm, rows) == greedy(eager, rows)
    assert warm.captures == wanted  # the first real batches replayed what warm-up captured


def test_the_scheduler_through_the_static_decoder_generates_what_each_expert_generates_alone(packed, reconstructed):  # noqa: F811
    eng, slots = packed
    config = SchedulerConfig(max_batch=6, max_prefill_tokens=96, window_s=0.002, static=True, static_max_len=64)
    check_continuous_batching(eng, slots, reconstructed, config)
