"""Integration tests import the real host at collection time (see tests/_host.py)."""
from _host import import_host

import_host()
