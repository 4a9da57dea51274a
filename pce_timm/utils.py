"""Helpers shared by the scripts and the tests."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Union

__all__ = ['load_module_from_path']


def load_module_from_path(path: Union[str, Path], name: str) -> ModuleType:
    """Import the Python file at ``path`` (a script, model_cards/render.py) as module ``name``, once.

    Later calls with the same ``name`` return the module already loaded. The module is registered in
    ``sys.modules`` before it runs, because dataclasses resolve their module by name.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f'cannot load {path} as a Python module (is it a .py file?)')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing half-loaded behind
        raise
    return module
