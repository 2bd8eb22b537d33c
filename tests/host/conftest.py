"""Integration tests import the real host at collection time (see tests/_host.py).

Memory: the host keeps the models it last loaded (and the patched clones of them) until told to
unload, so a module-scoped model would outlive its module. Every module of tests/host ends by
unloading them. Tests marked ``large_model`` (DiTs at the widths the host's detection needs) run
first among the host tests, before the session-scoped SD1.5 and SDXL models of the others load.
"""
import gc

import pytest

from _host import import_host

import_host()


def pytest_collection_modifyitems(session, config, items):
    large = [i for i in items if i.get_closest_marker("large_model")]
    if large:
        rest = [i for i in items if not i.get_closest_marker("large_model")]
        host = [k for k, i in enumerate(rest) if "tests/host/" in i.path.as_posix()]
        at = host[0] if host else len(rest)
        items[:] = rest[:at] + large + rest[at:]


@pytest.fixture(scope="module", autouse=True)
def _unload_at_module_end():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
