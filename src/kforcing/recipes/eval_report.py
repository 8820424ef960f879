"""The `kforcing eval` result as markdown: a fidelity table, a sample-quality table and a few
samples side by side (the dict comes from kforcing.evaluation.evaluate.evaluate)."""

from __future__ import annotations

import math

# what each reported figure means (kept next to the tables that show them)
NOTES = {
    "joint_match": "share of held-out windows whose k student tokens all equal the teacher's "
                   "exact AR rollout for the same uniforms",
    "gen_ppl_teacher": "exp(mean NLL per generated token) under the teacher at temperature 1",
    "unigram_entropy": "entropy (nats) of each sample's token histogram, averaged over samples",
    "distinct_n": "distinct n-grams / all n-grams, pooled over all samples",
    "judge_ppl": "perplexity of the decoded continuation, given the decoded prompt, under the "
                 "judge LM with its own tokenizer",
    "first_token_tv": "mean over contexts of 0.5 sum_i |q_i - p_i|, Monte Carlo with the "
                      "teacher's own inverse-CDF draws on the same uniforms as control variate; "
                      "upward biased by at most first_token_tv_bias_bound in expectation; "
                      "first_token_tv_se = standard error over contexts; "
                      "first_token_tv_coupling_bound = P(student token != teacher token), an "
                      "upper bound on TV",
    "agree_prefix": "mean number of leading tokens of a free-running sample equal to the "
                    "teacher's sample from the same prompt and noise",
}


def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def eval_markdown(result: dict) -> str:
    """The eval dict as markdown: fidelity table, sample-quality table, a few samples."""
    t, students = result["teacher"], result["students"]
    lines = ["| student | k | tau | first-token match | joint match | per position | "
             "first-token TV (± s.e., bias ≤) |", "|---|---|---|---|---|---|---|"]
    for s in students:
        per = " / ".join(f"{100 * m:.1f}" for m in s["per_position_match"])
        tv = (f"{_f(s['first_token_tv'], '.3f')} ± {_f(s['first_token_tv_se'], '.3f')} "
              f"(≤ {_f(s['first_token_tv_bias_bound'], '.3f')})")
        lines.append(f"| {s.get('student', '')} | {s['k']} | {s['tau']:g} | "
                     f"{100 * s['first_token_match']:.1f}% | {100 * s['joint_match']:.1f}% | "
                     f"{per} | {tv} |")
    lines += ["", f"Free-running samples: {t['n_samples']} held-out prompts x {t['new_tokens']} "
              f"new tokens, tau {t['tau']:g}, same uniforms for every sampler.", "",
              "| sampler | k | gen PPL (teacher) | judge PPL | unigram entropy (nats) | "
              "distinct-1 / 2 / 3 | agrees with teacher for |", "|---|---|---|---|---|---|---|"]

    def quality(name: str, k, e: dict, agree: str) -> str:
        dist = " / ".join(f"{e[f'distinct_{n}']:.3f}" for n in (1, 2, 3))
        return (f"| {name} | {k} | {_f(e['gen_ppl_teacher'], '.1f')} | "
                f"{_f(e['judge_ppl'], '.1f')} | {e['unigram_entropy']:.3f} | {dist} | {agree} |")

    lines.append(quality("teacher (AR)", 1, t, "–"))
    for s in students:
        lines.append(quality(s.get("student", "student"), s["k"], s,
                             f"{s['agree_prefix']:.1f} tokens"))
    for s in students:
        for i, ex in enumerate(s.get("samples", [])[:2]):
            lines += ["", f"**{s.get('student', 'student')}, k={s['k']}, sample {i + 1}**", "",
                      f"> prompt: {_oneline(ex['prompt'])}", ">",
                      f"> teacher: {_oneline(ex['teacher'])}", ">",
                      f"> student: {_oneline(ex['student'])}"]
    return "\n".join(lines) + "\n"


def _oneline(text: str) -> str:
    return " ".join(text.split())
