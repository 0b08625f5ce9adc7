"""least-load and cache-aware: pure choices over node snapshots with the engines' figures."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core import POLICIES, LoadFigures, cache_aware, load_rank
from blyanproxy.core.selection import BALANCE_ABS, Candidate, Turn, least_load
from tests.core.test_selection import node


def loaded(index: int, waiting: float = 0.0, running: float = 0.0, kv: float = 0.0, **fields) -> Candidate:
    return Candidate(node(index), load=LoadFigures(waiting, running, kv), **fields)


def test_both_policies_are_registered():
    assert POLICIES["least-load"] is least_load and POLICIES["cache-aware"] is cache_aware


def test_least_load_ranks_by_queue_then_running_then_kv_use():
    assert least_load([loaded(0, waiting=1), loaded(1, running=30)], Turn(), None).node.id == "n1"
    assert least_load([loaded(0, running=3), loaded(1, running=2, kv=0.9)], Turn(), None).node.id == "n1"
    assert least_load([loaded(0, running=2, kv=0.5), loaded(1, running=2, kv=0.4)], Turn(), None).node.id == "n1"


def test_dispatches_since_the_last_scrape_count_as_running():
    idle_but_busy = loaded(0, running=0, dispatched=5)
    assert least_load([idle_but_busy, loaded(1, running=3)], Turn(), None).node.id == "n1"
    assert load_rank(idle_but_busy) == (0.0, 5.0, 0.0)
    ended_since = loaded(1, running=2, dispatched=-3)  # more of ours ended than the engine showed
    assert load_rank(ended_since) == (0.0, 0.0, 0.0)


def test_nodes_without_figures_rank_by_in_flight():
    unknown = Candidate(node(0), in_flight=1)
    assert load_rank(unknown) == (0.0, 1.0, 0.0)
    assert least_load([unknown, loaded(1, running=4)], Turn(), None).node.id == "n0"
    assert least_load([Candidate(node(0), in_flight=3), Candidate(node(1), in_flight=2)], Turn(), None).node.id == "n1"


@given(st.integers(1, 6), st.integers(1, 10))
def test_least_load_spreads_equal_nodes_evenly(count, cycles):
    pool = [loaded(i, running=2) for i in range(count)]
    turn = Turn()
    picks = Counter(least_load(pool, turn, None).node.id for _ in range(count * cycles))
    assert set(picks.values()) == {cycles}


@given(st.binary(min_size=1, max_size=32), st.permutations(range(5)))
def test_cache_aware_is_deterministic_whatever_the_order_or_process(key, order):
    pool = [loaded(i, running=1) for i in range(5)]
    shuffled = [pool[i] for i in order]
    assert cache_aware(pool, Turn(), None, key).node.id == cache_aware(shuffled, Turn(counter=7), None, key).node.id


def test_cache_aware_keeps_a_prefix_on_its_node_and_spreads_prefixes():
    pool = [loaded(i, running=1) for i in range(4)]
    homes = {cache_aware(pool, Turn(), None, b"prefix-%d" % k).node.id for k in range(40)}
    assert len(homes) == 4
    assert len({cache_aware(pool, Turn(), None, b"same").node.id for _ in range(10)}) == 1


def test_cache_aware_falls_back_to_least_load_over_both_thresholds():
    key = b"a shared system prompt"
    pool = [loaded(i, running=1) for i in range(3)]
    home = cache_aware(pool, Turn(), None, key).node.id
    index = int(home[1:])
    busy = int(BALANCE_ABS) + 2

    def with_home(running: float) -> list[Candidate]:
        return [loaded(i, running=running if i == index else 1) for i in range(3)]

    assert cache_aware(with_home(busy - 1), Turn(), None, key).node.id == home  # 1 + ABS: not beyond
    moved = cache_aware(with_home(busy + 1), Turn(), None, key).node.id
    assert moved != home
    # relative threshold: everyone busy, the home node not BALANCE_REL times the lightest
    crowded = [loaded(i, running=40 if i == index else 36) for i in range(3)]
    assert cache_aware(crowded, Turn(), None, key).node.id == home


def test_cache_aware_without_a_prompt_is_least_load():
    pool = [loaded(0, running=5), loaded(1, running=1)]
    assert cache_aware(pool, Turn(), None, None).node.id == "n1"
