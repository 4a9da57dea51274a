"""``--help`` without importing torch: the training flags from ``pce_timm/train/flags.py`` alone.

Importing any pce_timm module runs ``pce_timm/__init__.py``, which registers the models with timm and so
imports torch, timm and more (~5 s); printing the flags needs none of it. When ``-h`` / ``--help`` is on the
command line, the scripts load that one file (stdlib + PyYAML) by its path, found without importing the
package, print the help and exit. Any other command line imports the package as usual.
"""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def wants_help(argv=None) -> bool:
    """Whether the command line asks for ``-h`` / ``--help``."""
    return any(arg in ('-h', '--help') for arg in (sys.argv[1:] if argv is None else argv))


def flags_module() -> ModuleType:
    """``pce_timm.train.flags``, loaded from its file without running the package's ``__init__``."""
    package = importlib.util.find_spec('pce_timm')  # locates the package, does not import it
    path = Path(package.submodule_search_locations[0]) / 'train' / 'flags.py'
    spec = importlib.util.spec_from_file_location('_pce_timm_train_flags', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
