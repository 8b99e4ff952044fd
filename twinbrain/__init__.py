"""TwinBrain: graph-native digital twins of the human brain from simultaneous EEG-fMRI."""
__version__ = "0.1.0"
