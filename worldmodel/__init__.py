"""The LeJEPA world model: encoder, SIGReg, predictor, training, probes."""

from worldmodel.model import CheckpointError, WorldModel, WorldModelConfig
from worldmodel.sigreg import sigreg_loss

__all__ = ["CheckpointError", "WorldModel", "WorldModelConfig", "sigreg_loss"]
