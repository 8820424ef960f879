"""`kforcing generate`: sample text from a model or a K-Forcing student (kforcing.decoding)."""

from __future__ import annotations

import json
import sys

from kforcing.cli.common import (
    compile_decoders,
    default_of,
    device_flag,
    finite,
    k_or_auto,
    load_with_tokenizer,
    natural,
    non_negative,
    path,
    positive,
)
from kforcing.core.device import decode_weights
from kforcing.core.sampling import CDF_ORDERS, SamplingConfig
from kforcing.decoding.generate import generate
from kforcing.evaluation.roofline import DTYPES, dtype_of
from kforcing.students.pushforward import PushForward
from kforcing.students.store import teacher_of


def cmd_generate(args) -> None:
    model, tok = load_with_tokenizer(args.model, args.device, allow_student=True)
    model = decode_weights(model, dtype_of(args.dtype))
    prompts = args.prompt or ["The"]
    ids = [tok.encode(p).ids for p in prompts]
    student = isinstance(model, PushForward)
    # lossless verifies with the teacher, and `--k auto` decodes with it when AR wins: a
    # shared-layout student names its teacher's directory
    teacher = (teacher_of(model, args.model)
               if student and (args.lossless or args.k == "auto") else None)
    teacher = None if teacher is None else decode_weights(teacher, model_dtype(model))
    if args.compile:
        compile_decoders(model, teacher)
    sampling = SamplingConfig(cdf_order=args.cdf_order) if args.cdf_order else None
    res = generate(model, ids, args.max_new_tokens, mode="lossless" if args.lossless else None,
                   k=args.k, sampling=sampling, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, frequency_penalty=args.frequency_penalty,
                   teacher=teacher, tree=args.tree)
    for prompt, new in zip(prompts, res.tokens, strict=True):
        text = tok.decode(new, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": new}))
        else:
            print(f"{prompt}{text}\n" + "-" * 60)
    print(json.dumps({"new_tokens": res.num_tokens, "forward_passes": res.forward_passes,
                      "seconds": round(res.seconds, 4),
                      "tokens_per_s": round(res.tokens_per_second, 1),
                      **{key: round(v, 4) if isinstance(v, float) else v
                         for key, v in res.extra.items()}}), file=sys.stderr)


def model_dtype(model):
    return next(model.parameters()).dtype


def add_parser(sub) -> None:
    sp = sub.add_parser("generate", help="sample text from a model or a K-Forcing student")
    sp.add_argument("--model", type=path, required=True, help="model, run or student directory")
    sp.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    sp.add_argument("--max-new-tokens", type=natural, default=100)
    sp.add_argument("--k", type=k_or_auto, default=None,
                    help="tokens per pass for a K-Forcing student (default: its max_k); "
                    "'auto' picks k for this batch size by calibration (docs/AUTOK.md)")
    sp.add_argument("--lossless", action="store_true",
                    help="K-Forcing proposes, the teacher verifies: output distributed exactly "
                    "as the teacher's (a student only)")
    sp.add_argument("--tree", help="lossless with a token-feedback student: verify a draft tree of "
                    "these k-1 widths in each teacher pass, e.g. 4,2,1 (default: one chain; "
                    "docs/METHOD.md section 9)")
    # unset sampling flags leave the choice to `generate`: a student samples the way it was
    # trained (its CDF order), and refuses, in one line, a filter it cannot honour
    sp.add_argument("--temperature", type=non_negative, help="0 = greedy (default: 1.0)")
    sp.add_argument("--top-k", type=natural, help="keep the k most likely tokens (default: off)")
    sp.add_argument("--top-p", type=positive, help="nucleus sampling (default: off)")
    sp.add_argument("--cdf-order", choices=CDF_ORDERS,
                    help="token order of the inverse CDF (default: vocab, or the student's)")
    sp.add_argument("--frequency-penalty", type=finite,
                    default=default_of(generate, "frequency_penalty"))
    sp.add_argument("--seed", type=natural, default=default_of(generate, "seed"))
    sp.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="weights and activations while decoding (bench --dtype measures which "
                    "is faster at each batch size)")
    sp.add_argument("--compile", action="store_true",
                    help="AR steps through one torch.compile graph, a token-feedback "
                    "student's K-Forcing windows through another (a whole window per call) and "
                    "its lossless draft steps through a third: the first pass compiles (tens "
                    "of seconds); docs/RESULTS.md measures when it pays")
    device_flag(sp)
    sp.add_argument("--json", action="store_true", help="one JSON line per completion")
    sp.set_defaults(run=cmd_generate)
