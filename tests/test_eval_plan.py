"""Planning an evaluation over workers: every document of every task exactly once, whatever
the task sizes, costs and worker counts; a merge that would score part of a task refuses."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from neoray.evaluation.fanout import coverage_problem, pack

task_costs = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=60)
suites = st.dictionaries(
    st.text("abcdefghij", min_size=1, max_size=6),
    st.tuples(task_costs, st.integers(0, 20), st.booleans()),  # costs, docs past limit, shardable
    min_size=1,
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(suite=suites, workers=st.integers(1, 8))
def test_every_document_is_planned_exactly_once(suite, workers):
    costs = {name: c for name, (c, _, _) in suite.items()}
    sizes = {name: len(c) + extra for name, (c, extra, _) in suite.items()}
    shardable = {name: s for name, (_, _, s) in suite.items()}
    units = pack(costs, sizes, shardable, workers)

    assert 1 <= len(units) <= workers
    covered: Counter = Counter()
    for unit in units:
        for name, docs in unit.docs.items():
            if docs is None:  # the whole task, which only a task evaluated in full may be
                assert len(costs[name]) == sizes[name]
                docs = range(sizes[name])
            else:
                assert docs == sorted(docs)
            covered.update((name, doc) for doc in docs)
    expected = Counter((name, doc) for name, c in costs.items() for doc in range(len(c)))
    assert covered == expected
    for name, is_shardable in shardable.items():
        if not is_shardable:
            assert sum(name in unit.docs for unit in units) == 1
    assert sum(unit.cost for unit in units) == sum(map(sum, costs.values()))


def test_shards_that_land_on_one_unit_are_joined():
    """The reported failure: a task just above an even share is cut in two, and both halves
    go to the unit that stays cheapest; that unit evaluates all of its documents."""
    costs = {"a": [10] * 10, "b": [10] * 11, "c": [10] * 9}
    units = pack(costs, {n: len(c) for n, c in costs.items()}, dict.fromkeys(costs, True), 3)
    assert [unit.docs for unit in units] == [{"a": None}, {"c": None}, {"b": list(range(11))}]


def samples(ids: list[int], result_filter: str = "none") -> list[dict]:
    return [{"doc_id": i, "filter": result_filter} for i in ids]


def test_a_merge_of_part_of_the_documents_is_refused_with_the_reason():
    assert coverage_problem(samples([0, 1, 2]), 3) is None
    assert coverage_problem(samples([2, 0, 1]) + samples([0, 1, 2], "strict"), 3) is None
    half = coverage_problem(samples([0, 1, 2]), 6)
    assert "3 of 6 planned documents came back" in half and "missing [3, 4, 5]" in half
    twice = coverage_problem(samples([0, 1, 1]), 3)
    assert "missing [2]" in twice and "1 repeated" in twice
    one_filter_short = coverage_problem(samples([0, 1]) + samples([0], "strict"), 2)
    assert "filter 'strict'" in one_filter_short
    assert "no samples" in coverage_problem([], 4)
