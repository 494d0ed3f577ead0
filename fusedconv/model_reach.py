"""Whether code outside fusedconv has reached into an armed converted model: the state behind graph/reach.py, kept
below the graph passes so that the fused layers' CPU boundary (fusedconv/cpu_boundary.py) and the guarded
dispatch (graph/specialize.py) can mark their own reads and a reach.

An armed model holds a `Reach` in its instance dict. `escape(model)` ends the arming for good (the model's class
goes back to its guarded class, every later forward runs the full checks); `inside(model)` makes this thread's
reads of the model no reach while fusedconv's own code reads it without handing out what it reads.
"""
from __future__ import annotations

import contextlib
import sys
from _thread import get_ident

REACH = "_fusedconv_reach"
_getattribute = object.__getattribute__


def instance_dict(obj) -> dict:
    """`obj.__dict__`, read around its class's own `__getattribute__`: how fusedconv's own code (the generated
    dispatch and flat graph, the layout boundary, this module) reads an armed model without it counting as a
    reach (it hands nothing out)."""
    return _getattribute(obj, "__dict__")


class Reach:
    """Per armed model: whether it escaped (for good), and the thread in which fusedconv's own code is reading it
    (`inside`), whose reads are no reach. A copy is an escaped one (a copied model is not armed)."""

    __slots__ = ("escaped", "inside")

    def __init__(self, escaped: bool = False):
        self.escaped = escaped
        self.inside = None

    def __deepcopy__(self, memo):
        return Reach(escaped=True)

    def __reduce__(self):
        return Reach, (True,)


def escape(model) -> None:
    """`model` was reached into: full checks from now on, its guarded class back (graph/reach.py). No-op for a
    model that is not armed."""
    d = instance_dict(model)
    reach = d.get(REACH)
    if reach is None:
        return
    reach.escaped = True
    plain = type(model).__dict__.get("__fusedconv_unwatched__")
    if plain is not None:
        object.__setattr__(model, "__class__", plain)
    d.pop(REACH, None)


def armed(model) -> Reach | None:
    """The model's Reach while it is armed and has not escaped, else None."""
    reach = instance_dict(model).get(REACH)
    return reach if reach is not None and not reach.escaped else None


@contextlib.contextmanager
def inside(model):
    """fusedconv's own reads of `model` in this thread are no reach (they hand out nothing they read). Under a
    debugger, tracer or profiler (`sys.settrace` / `sys.setprofile`: user code between any two lines) the model
    escapes instead."""
    reach = armed(model)
    if reach is not None and (sys.gettrace() is not None or sys.getprofile() is not None):
        escape(model)
        reach = None
    if reach is None:
        yield
        return
    previous, reach.inside = reach.inside, get_ident()
    try:
        yield
    finally:
        reach.inside = previous
