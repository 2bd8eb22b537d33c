"""End-to-end tests use the generated models through the host-importing fixtures."""
from _host import import_host

import_host()
