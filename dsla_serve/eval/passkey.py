"""Pass-key retrieval: a 5-digit key hidden at a random depth in filler text, asked back at the end.

    dsla-serve eval passkey --context 1024,2048,4096,8192 --trials 8 --conversion 0,0.25,0.5 --json

The completion form of the probe is used ("... What is the pass key? The pass key is"): asked as a
chat question the all-attention SmolLM2-135M fails at every length. Two fillers: the classic
repetitive one, and real text (shipped Python documentation pages), which is harder.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources

from dsla_serve.generate import SamplingParams, generate
from dsla_serve.model.hybrid import HybridModel

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n"
REPETITIVE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def real_filler_text() -> str:
    folder = resources.files("dsla_serve") / "data" / "python-docs"
    return "\n\n".join(
        p.read_text() for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".rst.txt")
    )


@dataclass
class Probe:
    ids: list[int]
    key: str
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end


def build_probe(tokenizer, filler_ids: list[int], context: int, key: str, depth: float, offset: int = 0) -> Probe:
    """Token ids of exactly ``context`` tokens: intro, filler, needle at ``depth``, filler, question."""
    head = tokenizer(INTRO, add_special_tokens=False).input_ids
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
    tail = tokenizer(QUESTION, add_special_tokens=False).input_ids
    budget = context - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"context {context} is too short for the probe ({context - budget} tokens without filler)")
    while len(filler_ids) < budget + offset:
        filler_ids = filler_ids + filler_ids
    filler = filler_ids[offset : offset + budget]
    cut = round(depth * budget)
    return Probe(head + filler[:cut] + needle + filler[cut:] + tail, key, depth)


def answer_matches(text: str, key: str) -> bool:
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == key


def passkey_accuracy(
    hybrid: HybridModel, tokenizer, contexts: list[int], plans: dict[str, list[int]], trials: int,
    fillers: tuple[str, ...] = ("repetitive", "real"), seed: int = 0, progress=None,
) -> list[dict]:  # fmt: skip
    """Exact-match accuracy per (filler, context, plan); every plan sees the same probes.

    A context at the model's limit is probed with a prompt 8 tokens shorter, leaving room for the answer.
    """
    sources = {"repetitive": REPETITIVE * 8, "real": real_filler_text()}
    rows = []
    limit = hybrid.config.max_position_embeddings
    for filler in fillers:
        filler_ids = tokenizer(sources[filler], add_special_tokens=False).input_ids
        for context in contexts:
            if context > limit:
                raise ValueError(f"context {context} exceeds the model's {limit} tokens")
            prompt_len = min(context, limit - 8)
            rng = random.Random(f"{seed}-{filler}-{context}")
            probes = [
                build_probe(tokenizer, filler_ids, prompt_len, f"{rng.randrange(10000, 100000)}", rng.random(),
                            rng.randrange(0, 5000) if filler == "real" else 0)
                for _ in range(trials)
            ]  # fmt: skip
            for name, plan in plans.items():
                outcomes = []
                for probe in probes:
                    result = generate(hybrid, tokenizer, probe.ids, plan, SamplingParams(max_tokens=6))
                    outcomes.append(answer_matches(result.text, probe.key))
                    if progress:
                        progress(filler, context, name)
                rows.append({
                    "filler": filler, "context": context, "prompt_tokens": prompt_len, "level": name, "dsla_layers": plan,
                    "correct": sum(outcomes), "trials": trials, "accuracy": sum(outcomes) / trials,
                    "depths": [round(p.depth, 3) for p in probes], "hits": outcomes,
                })  # fmt: skip
    return rows
