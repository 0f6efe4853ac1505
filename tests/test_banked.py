"""The packed payload's slot tables with fused projections (:meth:`BankSet.fuse`): one grouped bank per group,
each projection's bank a view of it, kept right as experts come, widen it, go and grow the tables."""

from __future__ import annotations

import pytest
import torch

from meswitch.compression.delta import DeltaConfig, compress_delta
from meswitch.kernels import mixed_delta_reference
from meswitch.serving.banked import BankSet, ExpertTables

K = 128
WIDTHS = {"q": 64, "k": 32, "v": 32, "o": 128}
QKV = ("q", "k", "v")


def _expert(seed: int, salient: int, names=tuple(WIDTHS)) -> ExpertTables:
    """Compressed deltas of the linears ``names``; ``salient`` columns in q, one fewer in k, none in v."""
    g = torch.Generator().manual_seed(seed)
    counts = {"q": salient, "k": max(salient - 1, 0), "v": 0, "o": 2}
    banked = {
        n: compress_delta(torch.randn(WIDTHS[n], K, generator=g) * 0.01, None, DeltaConfig(bits=2, salient=counts[n]))
        for n in names
    }
    return ExpertTables(banked=banked, lookups={}, dense={}, vocab=10)


def _banks(capacity: int = 0) -> BankSet:
    return BankSet(lambda name, like: torch.zeros_like(like), capacity=capacity)


def _assert_same_deltas(fused: BankSet, plain: BankSet, keys: list[str]) -> None:
    """Every resident expert's delta of every linear is the same in both sets (slots may differ)."""
    for key in keys:
        (g1, s1), (g2, s2) = fused.index(key), plain.index(key)
        for name in WIDTHS:
            want = plain.grids[g2].banks.get(name)
            got = fused.grids[g1].banks[name]
            expect = torch.zeros(WIDTHS[name], K) if want is None else want.dequantize(s2)
            torch.testing.assert_close(got.dequantize(s1), expect, rtol=0, atol=0)


def _assert_views(banks: BankSet) -> None:
    for gb in banks.grids.values():
        group = gb.groups[QKV]
        assert group.splits == (64, 32, 32) and gb.grouped() == set(QKV)
        for name in QKV:
            assert gb.banks[name].packed.untyped_storage().data_ptr() == group.packed.untyped_storage().data_ptr()
            assert gb.banks[name].kmax == group.kmax


def test_fused_projections_are_held_once_and_hold_each_experts_deltas():
    fused, plain = _banks(), _banks()
    fused.fuse(QKV, (64, 32, 32))
    for key, tables in (("a", _expert(0, 3)), ("b", _expert(1, 6)), ("c", _expert(2, 1))):  # b widens the group
        fused.add(key, tables)
        plain.add(key, tables)
    _assert_views(fused)
    gb = next(iter(fused.grids.values()))
    assert gb.capacity == 3 and gb.groups[QKV].kmax == 6 and "o" not in gb.grouped()
    _assert_same_deltas(fused, plain, ["a", "b", "c"])
    # the group's one launch adds what the projections' own banks add
    x = torch.randn(3, K)
    got = mixed_delta_reference(x, gb.groups[QKV], [2, 0, 1], torch.zeros(3, 128))
    parts = [mixed_delta_reference(x, gb.banks[n], [2, 0, 1], torch.zeros(3, WIDTHS[n])) for n in QKV]
    torch.testing.assert_close(got, torch.cat(parts, 1), rtol=1e-6, atol=1e-6)


def test_a_freed_slot_is_rewritten_in_place_and_full_tables_grow():
    fused, plain = _banks(capacity=2), _banks(capacity=2)
    fused.fuse(QKV, (64, 32, 32))
    for banks in (fused, plain):
        banks.add("a", _expert(0, 3))
        banks.add("b", _expert(1, 3))
    gb = next(iter(fused.grids.values()))
    version, storage = gb.version, gb.groups[QKV].packed.data_ptr()
    for banks in (fused, plain):
        banks.remove("a")
        banks.add("c", _expert(2, 2))  # fewer salient columns: the slot is rewritten, nothing reallocated
    assert (gb.version, gb.groups[QKV].packed.data_ptr()) == (version, storage)
    for banks in (fused, plain):
        banks.add("d", _expert(3, 4, names=("q", "v", "o")))  # full: the tables grow; no k delta, wider q
    assert gb.version > version and gb.capacity == 3
    _assert_views(fused)
    _assert_same_deltas(fused, plain, ["b", "c", "d"])


def test_fusing_joins_the_banks_already_there_and_a_missing_projection_holds_zeros():
    fused, plain = _banks(), _banks()
    for banks in (fused, plain):
        banks.add("a", _expert(0, 3, names=("q", "o")))  # k and v: no bank yet
    fused.fuse(QKV, (64, 32, 32))
    fused.fuse(QKV, (64, 32, 32))  # a second decoder on the same model: nothing more
    _assert_views(fused)
    for banks in (fused, plain):
        banks.add("b", _expert(1, 2))
    _assert_same_deltas(fused, plain, ["a", "b"])
    with pytest.raises(ValueError, match="cannot fuse"):
        fused.fuse(("q", "o"), (64, 128))  # q is in a group already
    with pytest.raises(ValueError, match="cannot fuse"):
        fused.fuse(("o",), (128,))
