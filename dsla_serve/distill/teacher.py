"""Teacher-generated training text: the base model answering varied chat requests.

    dsla-serve data teacher --out data/teacher --tokens 60000

Distilling on one domain (the Python documentation) specialises the DSLA layers to it: measured on
general English the 25 % model lost far more than on held-out documentation. Samples from the
teacher itself are on the distribution the served model sees (its chat format, its own style) and
cost nothing to license. Saved as JSONL ({"text": chat-formatted prompt + answer}), one per line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dsla_serve.generate import sample
from dsla_serve.model import HybridCache, HybridModel

SUBJECTS = [
    "a lighthouse keeper during a storm",
    "how bread rises",
    "the water cycle",
    "a first day at a new school",
    "why the sky is blue",
    "planning a vegetable garden",
    "the history of the printing press",
    "a lost dog finding home",
    "how vaccines work",
    "saving money on groceries",
    "the rules of chess",
    "a trip to the mountains",
    "photosynthesis",
    "writing a good cover letter",
    "the French revolution",
    "how a bicycle works",
    "a robot learning to paint",
    "the solar system",
    "making friends as an adult",
    "how to brew tea",
    "volcanoes",
    "the invention of the telephone",
    "a mystery in a small village",
    "how computers store numbers",
    "climate and weather",
    "learning a new language",
    "ancient Egypt",
    "a recipe for pancakes",
    "how the heart pumps blood",
    "a dragon who is afraid of fire",
    "time management for students",
    "the life of bees",
    "what a database is",
    "a letter to a future self",
    "the moon landing",
    "how rainbows form",
    "a chess match between friends",
    "recycling",
    "how airplanes fly",
    "the Roman empire",
    "a city at night",
    "caring for a houseplant",
    "how memory works in the brain",
    "an old sailor's advice",
    "electric cars",
    "the Great Wall of China",
    "a birthday surprise",
    "how to read a map",
    "ocean tides",
    "a haunted library",
    "what inflation is",
    "the first computers",
]
TASKS = [
    "Write a short story about {s}.",
    "Explain {s} to a ten-year-old.",
    "Give me five facts about {s}.",
    "Write a detailed explanation of {s}.",
    "Write a dialogue between two people discussing {s}.",
    "What are the most common questions people ask about {s}? Answer them.",
    "Write a poem about {s}.",
    "Summarize what someone should know about {s} in a few paragraphs.",
    "Write a blog post about {s}.",
    "Describe {s} step by step.",
]


CORPUS_TASKS = [
    "Continue this text:\n\n{s}",
    "Here is the beginning of a document. Continue it in the same style.\n\n{s}",
    "Explain what the following is about, then continue it:\n\n{s}",
]


def prompts(n: int, seed: int, requests: list[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    if requests:
        return [rng.choice(requests) for _ in range(n)]
    return [rng.choice(TASKS).format(s=rng.choice(SUBJECTS)) for _ in range(n)]


def opening(text: str, max_chars: int = 300) -> str:
    """The first sentence(s) of a document, up to ``max_chars``, cut at a sentence or line end."""
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind(".\n"), head.rfind("\n"))
    return (head[: cut + 1] if cut > 40 else head).strip()


def corpus_requests(corpus_dir: Path, per_domain: int = 200) -> list[str]:
    """Chat requests from the openings of a corpus's held-in documents, the same number per domain."""
    from dsla_serve.distill.data import DataError, corpus_split, is_corpus

    if not is_corpus(corpus_dir):
        raise DataError(f"{corpus_dir} is not a `dsla-serve data corpus` directory (no manifest.json)")
    out = []
    for domain, texts in corpus_split(corpus_dir, "train").items():
        if domain == "teacher":
            continue  # the teacher's own samples are not prompts
        for i, text in enumerate(texts[:per_domain]):
            out.append(CORPUS_TASKS[i % len(CORPUS_TASKS)].format(s=opening(text)))
    return out


@torch.no_grad()
def generate_samples(
    model: HybridModel, tokenizer, tokens: int, out: Path, batch: int = 8, max_new: int = 400,
    temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, progress=None, requests: list[str] | None = None,
) -> Path:  # fmt: skip
    """Append teacher samples to ``out``/teacher.jsonl until it holds about ``tokens`` tokens.

    ``requests``: user messages to draw from (e.g. ``corpus_requests``) instead of the built-in tasks.
    """
    out.mkdir(parents=True, exist_ok=True)
    file = out / "teacher.jsonl"
    have = sum(json.loads(line)["tokens"] for line in file.read_text().splitlines()) if file.is_file() else 0
    gen = torch.Generator().manual_seed(seed + have)
    eos = tokenizer.eos_token_id
    round_ = 0
    while have < tokens:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts(batch, seed * 100003 + have + round_, requests)
        ]
        cache = HybridCache([model.new_cache([], capacity=512 + max_new) for _ in texts])
        last = []
        for b, text in enumerate(texts):  # prompts differ in length: prefill one by one
            ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
            logits, _ = model(ids, cache=HybridCache([cache[b]]), logits_for="last")
            last.append(logits[:, -1])
        logits = torch.cat(last)
        answers: list[list[int]] = [[] for _ in texts]
        done = [False] * len(texts)
        for _ in range(max_new):
            nxt = sample(logits, temperature, top_p, gen)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    done[b] = t == eos
                    if not done[b]:
                        answers[b].append(t)
            if all(done):
                break
            logits = model(nxt[:, None], cache=cache, logits_for="last")[0][:, -1]
        with file.open("a") as f:
            for text, ans in zip(texts, answers, strict=True):
                body = text + tokenizer.decode(ans, skip_special_tokens=True)
                n = len(tokenizer(body, add_special_tokens=False).input_ids)
                f.write(json.dumps({"text": body, "tokens": n}) + "\n")
                have += n
        round_ += 1
        if progress:
            progress(have, tokens)
    return file
