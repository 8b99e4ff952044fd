"""TwinBrain model: heterogeneous spatio-temporal graph network, losses and loss balancers.

Public API::

    build_model(cfg, n_subjects, n_sessions, n_fmri_slots, n_eeg_slots, samples_per_tr) -> TwinBrain
    TwinBrain.forward(batch) -> ModelOutput
    TwinBrain.blocks                      nn.ModuleList[STBlock]  (wrap each for checkpointing / FSDP2)
    TwinBrain.shared_parameter()          weight for GradNorm
    TwinBrain.embedding_parameters()      subject/session-specific parameters (train.emb_lr)
    TwinBrain.param_groups_spec()         {'embedding' | 'no_decay' | 'default': [parameter names]} (the optimizer groups)
    TwinBrain.couplings(subject=None)     {relation_key: C[target, source]} learned directed couplings
    ModelOutput.penalty                   prior-weighted L1 on the couplings (added to the loss)
    TwinBrain.linear                      {modality: LinearCore} VAR(p) core (warm-started by the trainer)
    loss_terms(batch, out, train_cfg, model_cfg) -> {term: (sum, count)}
    loss_counts(batch, train_cfg, model_cfg)     -> {term: count}      (no forward needed)
    normalise(terms, global_counts)              -> {term: mean loss}
    make_balancer(train_cfg, term_names)         -> LossBalancer
    build_train_module(model, train_cfg, model_cfg, modalities, objective) -> TrainModule
                                          model + losses + balancer: the one assembly of a train step
    gaussian_std_scale(mean, std, target, weight) -> post-hoc std calibration factor
"""
from twinbrain.model.balancer import LossBalancer, make_balancer
from twinbrain.model.blocks import STBlock
from twinbrain.model.losses import (forecast_targets, forecast_valid, gaussian_std_scale, loss_counts,
                                    loss_term_names, loss_terms, normalise, term_weight)
from twinbrain.model.train_module import TrainModule, build_train_module
from twinbrain.model.twinbrain import ModelOutput, TwinBrain, build_model

__all__ = ["TwinBrain", "ModelOutput", "STBlock", "build_model", "loss_terms", "loss_counts", "normalise",
           "loss_term_names", "term_weight", "forecast_targets", "forecast_valid",
           "gaussian_std_scale", "LossBalancer", "make_balancer", "TrainModule", "build_train_module"]
