"""The system under diagnosis: TRM's recursion, ETRM's demo encoder and the ACT wrapper with its carry."""

from etrm.model.act import ACTModel, ModelShape, StepOutput
from etrm.model.carry import Carry

__all__ = ["ACTModel", "Carry", "ModelShape", "StepOutput"]
