"""Segment tables and whole-row layouts, checked in one process against brute-force slicing
(every rank simulated; the point-to-point payloads are routed by hand)."""

from __future__ import annotations

import random

import pytest
import torch

from cage_ds.zero.rows import RowLayout
from cage_ds.zero.shardmap import Piece, zero3_maps, zero12_maps

GARBAGE = 3.7e28


def _shapes(rng: random.Random, block: int) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(rng.randint(1, 4)):
        shapes.append((rng.randint(1, 7), block * rng.randint(1, 3)))
    shapes.insert(rng.randrange(len(shapes) + 1), (rng.randint(1, 40),))  # an unquantized vector
    return shapes


def _zero3_flats(params: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Brute force: each parameter padded to world * ceil(numel / world), cut, concatenated."""
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for p in params:
        ps = -(-p.numel() // world)
        padded = torch.full((ps * world,), GARBAGE)
        padded[: p.numel()] = p.flatten()
        for r, chunk in enumerate(padded.split(ps)):
            per_rank[r].append(chunk)
    return [torch.cat(c) for c in per_rank]


def _zero12_layout(params: list[torch.Tensor], world: int, align: int) -> tuple[list[int], int]:
    offsets, pos = [], 0
    for p in params:
        offsets.append(pos)
        pos += p.numel()
        pos += (-pos) % align
    return offsets, pos + (-pos) % (2 * world)


def _zero12_flats(params, offsets, flat_numel, world):
    flat = torch.full((flat_numel,), GARBAGE)
    for p, o in zip(params, offsets, strict=True):
        flat[o : o + p.numel()] = p.flatten()
    return list(flat.split(flat_numel // world))


def _check_maps(maps, params, flats):
    for m, flat in zip(maps, flats, strict=True):
        covered = torch.zeros(m.numel, dtype=torch.bool)
        for pc in m.pieces:
            got = flat[pc.flat_start : pc.flat_start + pc.length]
            assert torch.equal(got, params[pc.param].flatten()[pc.elem_start : pc.elem_end])
            covered[pc.flat_start : pc.flat_start + pc.length] = True
        for lo, hi in m.padding():
            assert not covered[lo:hi].any()
            covered[lo:hi] = True
        assert covered.all()
    for j, p in enumerate(params):  # every element owned exactly once
        owned = sum(pc.length for m in maps for pc in m.pieces if pc.param == j)
        assert owned == p.numel()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_zero3_map_matches_brute_force_slicing(world, seed):
    rng = random.Random(seed)
    for _ in range(20):
        params = [torch.randn(s) for s in _shapes(rng, 8)]
        maps = zero3_maps([tuple(p.shape) for p in params], world)
        _check_maps(maps, params, _zero3_flats(params, world))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_zero12_map_matches_brute_force_slicing(world, seed):
    rng = random.Random(seed)
    for _ in range(20):
        params = [torch.randn(s) for s in _shapes(rng, 8)]
        offsets, numel = _zero12_layout(params, world, align=rng.choice([1, 4]))
        maps = zero12_maps([tuple(p.shape) for p in params], offsets, numel, world)
        _check_maps(maps, params, _zero12_flats(params, offsets, numel, world))


def test_piece_rows_and_blocks_by_element(seed):
    rng = random.Random(seed)
    for _ in range(300):
        n, block = rng.choice([(8, 4), (12, 4), (16, 16), (6, 2)])
        numel = n * rng.randint(1, 6)
        a = rng.randrange(numel)
        b = rng.randint(a + 1, numel)
        pc = Piece(0, n, 0, a, b)
        elems = range(a, b)
        assert list(pc.rows) == sorted({e // n for e in elems})
        assert pc.cut_rows() == [
            r for r in pc.rows if not all(r * n + i in elems for i in range(n))
        ]
        partial = [
            e for e in elems if not all((e // block) * block + i in elems for i in range(block))
        ]
        assert [e for lo, hi in pc.partial_blocks(block) for e in range(lo, hi)] == partial
        ea, eb = pc.block_hull(block)
        assert ea == (a // block) * block and eb == -(-b // block) * block


@pytest.mark.parametrize("layout", ["zero3", "zero12"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_row_layout_sees_whole_rows(layout, world, seed):
    """Every rank's runs and cut rows (rows.py), the peers' payloads routed in one process:
    each element of each piece is in exactly one run or one cut-row part of its holder, and
    every assembled side row equals the parameter's whole row."""
    rng = random.Random(seed)
    for _ in range(10):
        shapes = [(rng.randint(1, 7), 8 * rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
        params = [torch.randn(s) for s in shapes]
        if layout == "zero3":
            maps, flats = zero3_maps(shapes, world), _zero3_flats(params, world)
        else:
            offsets, numel = _zero12_layout(params, world, align=rng.choice([1, 4]))
            maps = zero12_maps(shapes, offsets, numel, world)
            flats = _zero12_flats(params, offsets, numel, world)
        lays = [RowLayout(maps, r, 4, True) for r in range(world)]
        sent = [lay.outgoing([f, -f]) for lay, f in zip(lays, flats, strict=True)]
        for r, (lay, flat) in enumerate(zip(lays, flats, strict=True)):
            side = lay.assemble([flat, -flat], {q: sent[q][r] for q in lay.peers})
            seen = torch.zeros(flat.numel(), dtype=torch.int64)
            for s in lay.runs:
                got = flat[s.shard_start : s.shard_start + s.numel]
                want = params[s.param_id].flatten()[s.param_offset : s.param_offset + s.numel]
                assert torch.equal(got, want)
                seen[s.shard_start : s.shard_start + s.numel] += 1
            for s in lay.side_segments:
                want = params[s.param_id].flatten()[s.param_offset : s.param_offset + s.row_len]
                assert torch.equal(side[0, s.shard_start : s.shard_start + s.row_len], want)
                assert torch.equal(side[1, s.shard_start : s.shard_start + s.row_len], -want)
            marker = torch.zeros(flat.numel())
            lay.scatter(torch.ones(1, lay.side_numel), [marker])
            seen += marker.long()
            for pc in lay.map.pieces:
                assert (seen[pc.flat_start : pc.flat_start + pc.length] == 1).all()
            assert int(seen.sum()) == sum(pc.length for pc in lay.map.pieces)
