"""Deprecated: `expertbits.tasks.loader` is now `expertbits.tasks.model.load`.

Kept because every quantized folder's config.json tells plain transformers users to
`import expertbits.tasks.loader`; importing it still registers the format with transformers.
"""

import warnings

from .model.load import *  # noqa: F401,F403  (the public names: load, register, ...)
from .model.load import __all__  # noqa: F401

warnings.warn("expertbits.tasks.loader is deprecated: import expertbits.tasks.model.load instead",
              DeprecationWarning, stacklevel=2)
