"""Integration tests import the real host at collection time (see tests/_host.py)."""
from _host import import_host

import_host()

# Modules whose models are large enough that they run before the rest of tests/host: the Flux
# model is about 2 GB in float32 and a LoRA-patched clone of it as much again (Z-Image's 3.6 GB);
# their module-scoped fixtures free them when the module (or its model's parameter) ends, so the session-scoped SD models that the other modules
# accumulate never share memory with it (on the 24 GB CI machine the whole suite with Flux last ran
# out of memory).
FIRST = ("test_flux.py", "test_dit.py")


def pytest_collection_modifyitems(session, config, items):
    first = [i for i in items if i.path.name in FIRST]
    if first:
        rest = [i for i in items if i.path.name not in FIRST]
        host = [k for k, i in enumerate(rest) if "tests/host/" in i.path.as_posix()]
        at = host[0] if host else len(rest)
        items[:] = rest[:at] + first + rest[at:]
