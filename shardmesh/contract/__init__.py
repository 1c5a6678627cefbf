"""The ground floor: the types every room of shardmesh shares, and no torch.

``placement`` imports nothing of ours; ``mesh``, ``api`` and ``backends`` import this
package (and ``mesh`` also ``placement``); only ``node`` and ``tools`` import more than
one room. See ``docs/ARCHITECTURE.md``.
"""

from .chains import Chain, ChainOpener
from .drafts import Drafts, DraftSource
from .errors import BadInput, BadRequest, CacheBudgetExceeded, ChainFailed, ModelUnavailable, NoRoute, NonFiniteInput, StageError, UnknownSession
from .hop import HopCompute, Sampler
from .sampling import MAX_TOP_LOGPROBS, SampledToken, SamplingParams
from .stage import MAX_DRAFT_TOKENS, Stage, StageInfo, StepOutput, StepRequest, check_step
from .tensors import DTYPE_SIZES, RawTensor

__all__ = [
    "BadInput",
    "BadRequest",
    "CacheBudgetExceeded",
    "Chain",
    "ChainFailed",
    "ChainOpener",
    "DTYPE_SIZES",
    "DraftSource",
    "Drafts",
    "HopCompute",
    "MAX_DRAFT_TOKENS",
    "MAX_TOP_LOGPROBS",
    "ModelUnavailable",
    "NoRoute",
    "NonFiniteInput",
    "RawTensor",
    "SampledToken",
    "Sampler",
    "SamplingParams",
    "Stage",
    "StageError",
    "StageInfo",
    "StepOutput",
    "StepRequest",
    "UnknownSession",
    "check_step",
]
