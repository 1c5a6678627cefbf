"""One session's sampling on the last stage: its parameters and its token history.

The last hop of a mesh chain (:mod:`.hop_compute`) and a chain held in one process
(:mod:`.local_chain`) both sample here, on the compute thread right after the step
that produced the logits, so a session draws the same tokens wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..contract import BadRequest, RawTensor, SampledToken, SamplingParams
from .torch.sampling import SamplingRefused, sample
from .torch.tensors import tensor_from_raw


@dataclass
class SamplerState:
    """The parameters and the token history that penalties and the per-step seed
    depend on; ``generated`` holds what was drawn before (a replay) and grows per token."""

    params: SamplingParams
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)

    def token(self, logits: RawTensor) -> SampledToken:
        """Compute thread: the next token. A refusal caused by the request's parameters
        is :class:`BadRequest` (error code ``bad_request``: the gateway answers HTTP 400
        and holds it against no peer); anything else stays this stage's own failure."""
        try:
            token = sample(tensor_from_raw(logits), self.params, self.prompt_ids, self.generated)
        except SamplingRefused as exc:
            raise BadRequest(f"cannot sample with these parameters: {exc}") from exc
        self.generated.append(token.token_id)
        return token

    def __call__(self, logits: RawTensor) -> dict[str, Any]:
        """The next token as the last hop sends it on the wire."""
        token = self.token(logits)
        return {
            "token": token.token_id,
            "logprob": token.logprob,
            "top": [[i, lp] for i, lp in token.top_logprobs],
        }
