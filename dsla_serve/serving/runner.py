"""Model runner: turns scheduled work into forward calls, samples, and folds KV caches in flight.

It never picks requests (the scheduler does) and never decides levels (the controller does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsla_serve.generate import sample
from dsla_serve.model import HybridCache, HybridModel
from dsla_serve.serving.request import Request, TokenLogprob

LOGPROB_BLOCK = 64  # prompt positions whose (block, vocab) log-probabilities exist at once


class ModelRunner:
    def __init__(self, model: HybridModel, order: list[int]):
        self.model = model
        self.order = list(order)  # conversion order: a sequence with count c runs DSLA at order[:c]

    def plan(self, count: int) -> list[int]:
        return sorted(self.order[:count])

    def cache_bytes(self, count: int, capacity: int) -> int:
        """Bytes a new sequence's cache takes: preallocated KV for attention layers + DSLA states."""
        plan = self.plan(count)
        return capacity * self.model.cache_bytes_per_token(plan) + self.model.state_bytes(plan)

    def allocate(self, req: Request) -> None:
        req.cache = self.model.new_cache(self.plan(req.dsla_count), capacity=req.capacity)
        req.reserved = req.cache.nbytes()

    def fold(self, req: Request, count: int) -> list[int]:
        """In-flight conversion of a running sequence up to ``count`` layers; returns the layers folded."""
        layers = self.order[req.dsla_count : count]
        if req.cache is not None and layers:
            self.model.fold_to_dsla(req.cache, layers)
            req.reserved = req.cache.nbytes()
        req.dsla_count = max(req.dsla_count, count)
        return layers

    def prefill(self, req: Request, n: int) -> tuple[Tensor, list[TokenLogprob] | None]:
        """Read the next n prompt tokens; returns the last position's logits (V,) and, when the request
        asked for prompt logprobs, the entries for the tokens this chunk predicts (incl. its first)."""
        start = req.num_computed
        ids = torch.tensor([req.prompt_ids[start : start + n]], device=self.model.device)
        want = req.params.prompt_logprobs
        if want is None:
            logits, _ = self.model(ids, cache=HybridCache([req.cache]), logits_for="last")
            req.num_computed += n
            return logits[0, -1], None
        # prompt logprobs: the final hidden states (T, hidden), then logits block by block, so no
        # (T x vocab) tensor is ever held whole
        hidden, _ = self.model(ids, cache=HybridCache([req.cache]), logits_for="hidden")
        req.num_computed += n
        entries = [TokenLogprob(req.prompt_ids[0], None)] if start == 0 else []
        targets = req.prompt_ids[start + 1 : start + n + 1]  # the token each position predicts
        for a in range(0, len(targets), LOGPROB_BLOCK):
            rows = hidden[0, a : a + LOGPROB_BLOCK][: len(targets) - a]
            lp = torch.log_softmax(self.model.lm_head(rows).float(), dim=-1)  # (block, V)
            entries += logprob_entries(lp, torch.tensor(targets[a : a + LOGPROB_BLOCK]), want)
        return self.model.lm_head(hidden[0, -1:])[0], entries

    def decode(self, reqs: list[Request]) -> Tensor:
        """One token for every request in one batched call; returns logits (B, V)."""
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.model.device)  # (B, 1)
        logits, _ = self.model(ids, cache=HybridCache([r.cache for r in reqs]), logits_for="last")
        return logits[:, -1]

    @staticmethod
    def sample(req: Request, logits: Tensor) -> tuple[int, TokenLogprob | None]:
        """Next token for one request from its logits (V,), with its logprob entry if asked for."""
        ((token, lp, finite),) = ModelRunner.sample_batch([req], logits[None])
        if not finite:
            raise FloatingPointError(f"request {req.id}: the model produced non-finite logits")
        return token, lp

    @staticmethod
    def sample_batch(reqs: list[Request], logits: Tensor) -> list[tuple[int, TokenLogprob | None, bool]]:
        """(token, logprob entry, logits finite) for every request from logits (B, V), with one host sync
        (plus one per request that asked for logprobs).

        Greedy rows share one argmax; sampled rows draw with their own generator (seeds stay
        per request). A row whose logits are not finite gets a placeholder token and ``False``:
        the caller fails that request alone.
        """
        finite = torch.isfinite(logits).all(-1)  # (B,)
        safe = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        tokens = safe.argmax(-1)  # greedy for every row; sampled rows are overwritten below
        for b, req in enumerate(reqs):
            p = req.params
            if p.temperature > 0:
                tokens[b] = sample(safe[b : b + 1], p.temperature, p.top_p, req.generator)[0]
        want = [b for b, r in enumerate(reqs) if r.params.logprobs is not None]
        host = torch.stack((tokens, finite.long())).tolist()  # the step's one sync
        out: list[tuple[int, TokenLogprob | None, bool]] = [(t, None, bool(f)) for t, f in zip(*host, strict=True)]
        for b in want:
            if out[b][2]:
                lp = torch.log_softmax(safe[b].float(), dim=-1)[None]
                out[b] = (out[b][0], logprob_entries(lp, tokens[b : b + 1], reqs[b].params.logprobs)[0], True)
        return out


def logprob_entries(lp: Tensor, tokens: Tensor, k: int) -> list[TokenLogprob]:
    """Entries for log-probabilities lp (T, V) of the chosen tokens (T,) with the top-k alternatives.

    The chosen token's value and the top-k values are read from the same tensor, so a greedy token
    equals its top-1 value exactly (lm-eval's is_greedy check compares them with ==).
    """
    chosen = lp.gather(1, tokens[:, None].to(lp.device))[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens.tolist(), chosen, tops, strict=True)]
