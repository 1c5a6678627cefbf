"""Single-process transformers: the ground truth every chain must reproduce exactly.

The tests compare every answer with it, and so does the churn soak (``make soak``,
:mod:`.soak`): greedy answers with transformers' own ``generate``, seeded sampled ones
with transformers' logits fed to shardmesh's sampler, token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    token_ids: list[int]  # generated, without a final eos
    tokens: list[str]  # each generated token decoded on its own
    text: str
    finish_reason: str


class Transformers:
    """Single-process transformers: the ground truth the gateway must reproduce."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        # transformers 5 returns a BatchEncoding unless return_dict=False.
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Reference:
        with self.torch.no_grad():
            out = self.model.generate(
                self.torch.tensor([prompt_ids]),
                attention_mask=self.torch.ones(1, len(prompt_ids), dtype=self.torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
        ids = out[0, len(prompt_ids) :].tolist()
        finish = "length"
        if ids and ids[-1] in self.eos:
            ids, finish = ids[:-1], "stop"
        return Reference(
            prompt_ids=prompt_ids,
            token_ids=ids,
            tokens=[self.tokenizer.decode([t]) for t in ids],
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason=finish,
        )

    def greedy_forwards(self, prompt_ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens by full forwards of the unsplit model (eos does not stop it)."""
        ids = list(prompt_ids)
        with self.torch.no_grad():
            for _ in range(n):
                ids.append(int(self.model(self.torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt_ids) :]

    def sample(self, prompt_ids: list[int], params: Any, max_new_tokens: int) -> list[int]:
        """The node's token loop, by hand: transformers' logits, shardmesh's sampler.

        Prefill, then one token at a time through a KV cache (as the node steps), with
        the float32 logits of the last position fed to ``sample`` with the same
        history the node passes. Returns the generated ids without a final eos.
        """
        from transformers import DynamicCache

        from shardmesh.backends.torch.sampling import sample

        torch = self.torch
        cache = DynamicCache(config=self.model.config)
        generated: list[int] = []
        step = prompt_ids
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.model(torch.tensor([step]), cache=cache, use_cache=True, logits_to_keep=1)
                token = sample(out.logits[0, -1].float(), params, prompt_ids, generated).token_id
                if token in self.eos:
                    break
                generated.append(token)
                step = [token]
        return generated
