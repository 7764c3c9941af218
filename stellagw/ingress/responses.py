# TEMPORARY alias while the layout moves (issue 17 item 2); removed before the last commit.
import sys as _sys
from .. import replies as _moved
_sys.modules[__name__] = _moved
