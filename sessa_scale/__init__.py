"""sessa_scale: pretraining Sessa language models (arXiv 2604.18580) at scale."""

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

# The repository's top-level kernels/ and data_prep/ install as sessa_scale.kernels and
# sessa_scale.data_prep (setup.py). Imported from a checkout instead (PYTHONPATH, or an editable
# install), this package finds them beside itself, so the two names always mean the folders of the
# checkout this package comes from.
_CHECKOUT = Path(__file__).resolve().parent.parent
_SIBLINGS = {f"{__name__}.{folder}" for folder in ("kernels", "data_prep")
             if not (Path(__file__).parent / folder).exists() and (_CHECKOUT / folder / "__init__.py").is_file()}


class _SiblingFinder:
    """Meta-path finder of sessa_scale.kernels / sessa_scale.data_prep in a source checkout."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname in _SIBLINGS:
            return importlib.machinery.PathFinder.find_spec(fullname, [str(_CHECKOUT)])
        return None


if _SIBLINGS:
    sys.meta_path.insert(0, _SiblingFinder)
