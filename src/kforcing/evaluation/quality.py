"""Quality of free-running samples, whoever made them (docs/METHOD.md, "Evaluation"):
perplexity under the teacher, under an independent judge LM (re-tokenized text), unigram
entropy and distinct-n.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kforcing.errors import KForcingError
from kforcing.io.hub import fetch_smollm2, load_gguf


@torch.no_grad()
def token_nll(model, prompts: torch.Tensor, samples: torch.Tensor, batch_size: int = 16
              ) -> torch.Tensor:
    """-log p(sample_t | prompt, sample_<t) under a Transformer at temperature 1: (B, L)."""
    P = prompts.shape[1]
    out = []
    for s in range(0, prompts.shape[0], batch_size):
        y = samples[s:s + batch_size]
        seq = torch.cat([prompts[s:s + batch_size], y], dim=1)
        logits = model(seq[:, :-1])[:, P - 1:]                              # (b, L, V)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none"))
    return torch.cat(out)


def generative_perplexity(model, prompts: torch.Tensor, samples: torch.Tensor,
                          batch_size: int = 16) -> float:
    """exp(mean NLL per generated token) of samples (B, L) after prompts (B, P) under `model`."""
    return math.exp(float(token_nll(model, prompts, samples, batch_size).double().mean()))


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy (nats) of one sample's empirical token distribution; repetition lowers it."""
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values()) if n else 0.0


def distinct_n(rows: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over samples (diversity within and across)."""
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ids(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids if hasattr(enc, "ids") else enc)


@torch.no_grad()
def judge_perplexity(texts: list[str], hf_model, hf_tokenizer, prompts: list[str] | None = None,
                     batch_size: int = 8, progress: bool = False) -> float:
    """Perplexity of `texts` under an independent causal LM (any transformers model + tokenizer),
    re-tokenized with the judge's own tokenizer. With prompts, text i is scored after prompts[i]
    and only its own tokens count; without, every token but each text's first."""
    rows = []
    limit = getattr(hf_model.config, "max_position_embeddings", None) or 1 << 30
    for i, text in enumerate(texts):
        y = _ids(hf_tokenizer, text)[:limit]
        ctx = _ids(hf_tokenizer, prompts[i]) if prompts is not None else []
        rows.append((ctx[max(0, len(ctx) - (limit - len(y))):], y))
    pad = getattr(hf_tokenizer, "pad_token_id", None) or 0
    device = next(hf_model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, len(rows), batch_size)
    for s in tqdm(starts, desc="judge", disable=not progress, leave=False):
        batch = rows[s:s + batch_size]
        T = max(len(c) + len(y) for c, y in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        attn = torch.zeros(len(batch), T, dtype=torch.long)
        scored = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, (c, y) in enumerate(batch):
            ids[b, :len(c) + len(y)] = torch.tensor(c + y, dtype=torch.long)
            attn[b, :len(c) + len(y)] = 1
            scored[b, max(len(c), 1):len(c) + len(y)] = True
        ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
        logits = hf_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        tok_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll += float(tok_nll[scored[:, 1:]].double().sum())
        count += int(scored.sum())
    if count == 0:
        raise KForcingError("the judge has no tokens to score (empty texts)")
    return math.exp(nll / count)


def load_judge(spec: str, cache: str | Path | None = None, device: str = "cpu"):
    """'smollm2' (fetched into the cache), a .gguf path, or 'none' -> ((model, tokenizer) | None,
    description)."""
    if spec == "none":
        return None, None
    if spec == "smollm2":
        path = Path(fetch_smollm2(cache=cache))
    else:
        path = Path(spec)
        if path.suffix != ".gguf" or not path.is_file():
            raise KForcingError(f"--judge must be 'smollm2', 'none' or an existing .gguf file, "
                                f"got '{spec}'")
    model, tok = load_gguf(path)
    return (model.to(device).eval(), tok), {"name": spec, "path": str(path)}


def sample_quality(teacher, prompts: torch.Tensor, samples: torch.Tensor, *, tokenizer=None,
                   judge=None, batch_size: int = 16, progress: bool = False) -> dict:
    """Generative perplexity under the teacher, unigram entropy (mean per sample, nats),
    distinct-1/2/3 and, with a tokenizer and a judge, the judge's perplexity of the text."""
    rows = samples.tolist()
    out = {"gen_ppl_teacher": generative_perplexity(teacher, prompts, samples, batch_size),
           "unigram_entropy": sum(map(unigram_entropy, rows)) / len(rows),
           **{f"distinct_{n}": distinct_n(rows, n) for n in (1, 2, 3)},
           "judge_ppl": None}
    if tokenizer is not None and judge is not None:
        out["judge_ppl"] = judge_perplexity(
            decode(tokenizer, samples), *judge, prompts=decode(tokenizer, prompts),
            progress=progress)
    return out


def ragged_quality(teacher, prompts: list[list[int]], samples: list[list[int]]) -> dict:
    """sample_quality's teacher-side figures for samples of different lengths after prompts of
    different lengths (chat answers that stop at EOS): gen-PPL pooled over every generated
    token (token_nll one sample at a time), unigram entropy averaged over non-empty samples,
    distinct-1/2/3 pooled."""
    device = next(teacher.parameters()).device
    nll = [token_nll(teacher, torch.tensor([p], device=device), torch.tensor([s], device=device))[0]
           for p, s in zip(prompts, samples, strict=True) if s]
    rows = [s for s in samples if s]
    if not rows:
        raise KForcingError("no generated tokens to score (every sample is empty)")
    return {"gen_ppl_teacher": math.exp(float(torch.cat(nll).double().mean())),
            "unigram_entropy": sum(map(unigram_entropy, rows)) / len(rows),
            **{f"distinct_{n}": distinct_n(rows, n) for n in (1, 2, 3)},
            "judge_ppl": None}


def decode(tokenizer, rows: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows.tolist()]
