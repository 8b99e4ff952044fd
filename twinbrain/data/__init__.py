"""Data sources, graphs and window loaders."""
# Each source with settings of its own registers their check with the config on import
# (twinbrain.config.SOURCE_CHECKS); importing the package registers them all.
from twinbrain.data import hcp as _hcp  # noqa: F401
