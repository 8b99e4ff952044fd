"""Digital-twin inference on an exported TwinBrain model (no trainer imports).

    Twin.from_checkpoint(path, device=None) -> Twin   forecast, rollout, perturb, effective_connectivity,
                                                       personalize, attribute, save
    load_export(path, device=None) -> LoadedModel      strict loading from the checkpoint's own config
"""
from twinbrain.twin.loader import CheckpointError, LoadedModel, load_export, save_export
from twinbrain.twin.twin import Twin

__all__ = ["Twin", "load_export", "save_export", "LoadedModel", "CheckpointError"]
