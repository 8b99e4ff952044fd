"""Pure scoring: streaming forecast metrics, forecast baselines and twin-validity statistics.

Nothing here knows the model, the trainer or a run directory: inputs are arrays or tensors of
predictions, targets and matrices. ``train`` (validation, warm start), ``twin`` (personalisation) and
``eval`` (the report) all score with these functions, so the package sits below all three.
"""
