"""run_compiled_ahead: the calls' results, in order, each program compiled once (the calls find
what the workers compiled), tracing never concurrent, errors raised by the call itself, and the
plain loop where threads cannot help (disable_jit)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.compile_ahead import run_compiled_ahead

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Records the thread of each XLA backend compilation while active."""

    def __init__(self):
        self.threads = []
        self.on = False

    def __call__(self, event, duration, **kw):
        if self.on and event == _COMPILE_EVENT:
            self.threads.append(threading.get_ident())


_counter = Compiles()
jax.monitoring.register_event_duration_secs_listener(_counter)


def _traced_fn(log):
    """A jitted function whose trace records the thread and how many traces overlap."""
    state = {"inside": 0}

    def f(x, *, scale):
        state["inside"] += 1
        log.append((threading.get_ident(), state["inside"]))
        y = x
        for _ in range(20):  # some tracing work, so overlaps would show
            y = jnp.sin(y) * scale + x.shape[0]
        state["inside"] -= 1
        return y.sum()

    return jax.jit(f, static_argnames=("scale",))


def test_results_in_order_each_program_compiled_once():
    log = []
    f = _traced_fn(log)
    calls = [((jnp.arange(n, dtype=jnp.float32),), {"scale": float(s)}) for n, s in
             [(3, 1), (4, 1), (5, 2), (6, 2), (7, 3)]]
    _counter.threads, _counter.on = [], True
    try:
        got = run_compiled_ahead(f, calls, workers=2)
    finally:
        _counter.on = False
    want = [f(*a, **k) for a, k in calls]
    assert [float(g) for g in got] == [float(w) for w in want]
    # the workers compiled every program, and the calls ran those: none compiled in this thread
    assert len(_counter.threads) == len(calls) and threading.get_ident() not in _counter.threads
    assert {t for t, _ in log} - {threading.get_ident()}  # the workers traced too
    assert max(depth for _, depth in log) == 1  # never two traces at once


def test_an_error_is_raised_by_the_call_itself():
    @jax.jit
    def f(x):
        if x.shape[0] == 4:
            raise ValueError("four is not allowed")
        return x.sum()

    calls = [((jnp.ones(n),), {}) for n in (2, 3, 4, 5)]
    with pytest.raises(ValueError, match="four is not allowed"):
        run_compiled_ahead(f, calls, workers=2)
    assert [float(v) for v in run_compiled_ahead(f, calls[:2], workers=2)] == [2.0, 3.0]


def test_disable_jit_and_one_worker_run_the_plain_loop():
    log = []
    f = _traced_fn(log)
    calls = [((jnp.arange(n, dtype=jnp.float32),), {"scale": 1.0}) for n in (3, 4, 5)]
    want = [float(f(*a, **k)) for a, k in calls]
    log.clear()
    with jax.disable_jit():  # eager: the function runs, in this thread only
        got = [float(v) for v in run_compiled_ahead(f, calls, workers=2)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(log) == len(calls) and {t for t, _ in log} == {threading.get_ident()}
    log.clear()
    calls = [((jnp.arange(n, dtype=jnp.float32),), {"scale": 1.0}) for n in (6, 7)]  # new programs
    run_compiled_ahead(f, calls, workers=1)
    assert len(log) == len(calls) and {t for t, _ in log} == {threading.get_ident()}
