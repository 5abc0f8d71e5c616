"""Hybrid models as an lm-evaluation-harness model ("dsla-serve"), for standard benchmarks.

    dsla-serve eval lm-eval --tasks hellaswag --conversion 0.25      (needs a network for the datasets)
    lm_eval --model dsla-serve --model_args conversion=0.25 ...       (after `import dsla_serve.eval.lm_eval`)

Importing this module registers the model with lm-eval. A running ``dsla-serve serve`` also works
with lm-eval's own ``local-completions`` model (``/v1/completions`` with ``logprobs`` and ``echo``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dsla_serve.generate import SamplingParams, generate
from dsla_serve.model.pretrained import load_hybrid


@register_model("dsla-serve")
class DSLAServeLM(LM):
    """lm-eval model: ``model`` (default: embedded), ``weights``, ``conversion`` or ``dsla_layers`` ("3-7-11")."""

    def __init__(
        self, model: str | None = None, weights: str = "auto", conversion: float = 0.0,
        dsla_layers: str | None = None, dtype: str = "float32", max_length: int | None = None, **_: object,
    ) -> None:  # fmt: skip
        super().__init__()
        self.hybrid, self.tok, self.info = load_hybrid(model, None if weights == "none" else weights, dtype)
        explicit = [int(x) for x in str(dsla_layers).split("-")] if dsla_layers else None
        self.plan = self.info.layers_for(float(conversion), explicit)
        self.max_length = int(max_length or self.hybrid.config.max_position_embeddings)

    @torch.no_grad()
    def _continuation_logprob(self, context_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
        ids = (context_ids + cont_ids)[-self.max_length :]
        n = len(cont_ids)
        logits, _ = self.hybrid(torch.tensor([ids]), dsla_layers=self.plan)
        logp = F.log_softmax(logits[0, -n - 1 : -1].float(), -1)  # predictions of the continuation tokens
        target = torch.tensor(ids[-n:])
        greedy = bool((logp.argmax(-1) == target).all())
        return logp.gather(-1, target[:, None]).sum().item(), greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok(context, add_special_tokens=False).input_ids if context else [self.tok.eos_token_id]
            out.append(self._continuation_logprob(ctx, self.tok(continuation, add_special_tokens=False).input_ids))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self.tok(req.args[0], add_special_tokens=False).input_ids
            total, prev = 0.0, [self.tok.eos_token_id]
            for start in range(0, len(ids), self.max_length - 1):  # disjoint windows, each conditioned on its start
                window = ids[start : start + self.max_length - 1]
                total += self._continuation_logprob(prev, window)[0]
                prev = [window[-1]]
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", []) or []
            params = SamplingParams(
                max_tokens=int(kwargs.get("max_gen_toks", 128)),
                temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                stop=[until] if isinstance(until, str) else list(until),
            )
            ids = self.tok(context, add_special_tokens=False).input_ids[-(self.max_length - params.max_tokens) :]
            out.append(generate(self.hybrid, self.tok, ids, self.plan, params).text)
        return out


def evaluate(tasks: list[str], model_args: dict, limit: int | None = None, include_path: str | None = None) -> dict:
    """Run lm-eval tasks on a hybrid model; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    model = DSLAServeLM(**model_args)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager)
