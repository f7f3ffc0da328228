"""One module per compression method; importing this package registers every one of them.

A new method is a new file here (config + math + transform + hooks, registered with
``compress.stages.register``): nothing else in the spine is edited.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
