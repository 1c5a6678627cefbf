"""Which draft tokens this gateway proposes: none, prompt lookup, or a draft model.

Speculative decoding is on by default with prompt lookup, which needs no model and no
memory (:mod:`shardmesh.api.speculation`). ``--draft-model PATH`` loads a small model
with the target's tokenizer and runs it here, on this process's compute thread
(:mod:`shardmesh.backends.draft_model`); ``--no-speculation`` turns proposals off.
"""

from __future__ import annotations

import trio

from ..api.speculation import PromptLookupSource
from ..contract import DraftSource
from .config import NodeConfig, UsageError
from .model import LoadedModel


async def draft_source(config: NodeConfig, model: LoadedModel, nursery: trio.Nursery) -> DraftSource | None:
    """The gateway's source of draft tokens; a draft model's batcher runs in ``nursery``."""
    if not config.speculation:
        return None
    if config.draft_model is None:
        return PromptLookupSource()
    from ..backends.batcher import StepBatcher
    from ..backends.compute_thread import compute_thread
    from ..backends.draft_model import DraftModel
    from ..backends.weights import resolve
    from .backend import build_stage

    files = resolve(config.draft_model)  # a folder, or a hub id: only the files it needs are fetched
    stage = await compute_thread().run(
        lambda: build_stage("torch", files, 0, None, model_name="draft", dtype=config.dtype, device=config.device,
                            cache_budget_bytes=int(config.kv_cache_gb * (1 << 30)), threads=config.threads)
    )
    if model.config.vocab_size is not None and stage.info.vocab_size != model.config.vocab_size:
        raise UsageError(
            f"--draft-model {config.draft_model} has a vocabulary of {stage.info.vocab_size} tokens and "
            f"{model.name} one of {model.config.vocab_size}: a draft model must share the target's tokenizer"
        )
    batcher = StepBatcher(stage)
    await nursery.start(batcher.run)
    return DraftModel(batcher, min(model.context_length, stage.context_limit or model.context_length))
