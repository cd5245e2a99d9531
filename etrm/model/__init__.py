"""The system under diagnosis: TRM's recursion, ETRM's demo encoder and the ACT wrapper with its carry."""

from etrm.model.act import ACTModel, ModelShape, StepOutput
from etrm.model.carry import Carry
from etrm.model.faults import build_model

__all__ = ["ACTModel", "Carry", "ModelShape", "StepOutput", "build_model"]
