"""The global random generators around the forwards fusedconv runs on a user's model by itself.

convert's tracing and self-check, reparameterize's self-check, warmup, export_onnx and the layout check of a
converted model's first call (fusedconv/cpu_boundary.py) run the model's forward. A forward may draw random numbers
(noise injection, MC dropout, a test-time augmentation choice): those draws must neither move the user's
generators (a script that seeds, converts, then draws would see other numbers than without convert) nor differ
between two forwards that are compared (the self-check, the layout check), and a call must return what the original
returns for the same seed. So each such forward starts from the state the user left, and that state is restored
afterwards: torch's CPU generator, the CUDA generators once CUDA is initialized, Python's `random`, and numpy's
global generator when numpy is loaded. A torch.Generator a model holds itself is not covered
(cpu_boundary.holds_a_generator).
"""

from __future__ import annotations

import contextlib
import random
import sys

import torch


def random_states() -> tuple:
    """The states of the global random generators a forward may draw from."""
    np = sys.modules.get("numpy")
    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            random.getstate(), np.random.get_state() if np is not None else None)


def set_random_states(states: tuple) -> None:
    """Put the global random generators back to `states` (from `random_states()`)."""
    cpu_state, cuda_states, python_state, numpy_state = states
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(python_state)
    if numpy_state is not None:
        sys.modules["numpy"].random.set_state(numpy_state)


@contextlib.contextmanager
def kept_random_states():
    """Yields the states found on entry (`set_random_states` them before each forward that must draw what the
    user's next forward would), and restores them on exit, however the block ends."""
    states = random_states()
    try:
        yield states
    finally:
        set_random_states(states)
