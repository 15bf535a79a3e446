"""Hypothesis strategies for sequences of engine calls (see tests/fuzz/twin.py)."""
from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz.twin import FAULTS, N_BATCHES, POISONS

batch = st.integers(0, N_BATCHES - 1)
# mostly clean batches, so sequences train for a while before a poisoned one
poison = st.sampled_from(POISONS[1:]).flatmap(lambda p: st.sampled_from(("none",) * 5 + (p,)))

plain_ops = st.one_of(
    st.tuples(st.just("train"), batch, poison),
    st.tuples(st.just("step")),
    st.tuples(st.just("train"), batch, st.just("none")),
    st.tuples(st.just("step")),
    st.tuples(st.just("forward"), batch, st.sampled_from(("eval", "no_grad"))),
    st.tuples(st.just("save")),
    st.tuples(st.just("load")),
    st.tuples(st.just("zero_grad")),
)


def ops(nvme: bool, max_size: int = 12):
    """A list of calls; with ``nvme`` some run under an injected one-shot IO fault."""
    if nvme:
        faulty = st.tuples(st.just("fault"), st.sampled_from(FAULTS), st.integers(0, 12), plain_ops)
        op = st.one_of(plain_ops, plain_ops, plain_ops, faulty)
    else:
        op = plain_ops
    return st.lists(op, min_size=1, max_size=max_size)
