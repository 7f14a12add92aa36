"""Keep Python's cyclic garbage collector off the objects that live as long as a model does.

A served model is hundreds of thousands of Python objects (TensorFlow's and Keras's), and a
full collection walks them all: ~150 ms with the shipped models, during which the event loop
and every batch stand still. Under load one came every 3-5 s. `gc.freeze()` moves the objects
alive now into a generation no collection visits; objects freed by reference count are freed
as before. It is redone after models load (a collection then walks only the objects made since
the last freeze) or unload (everything is given back to the collector first, so that the cyclic
garbage of the unloaded model is freed: one full pass).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle(*, unloaded: bool) -> None:
    """Collect what is garbage now, then keep everything alive out of later collections. With
    `unloaded`, first give the collector back what was set aside: a model unloaded since may be
    among it."""
    started = time.perf_counter()
    if unloaded:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.info(
        "%d long-lived objects set aside from garbage collection (%.0f ms)",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )
