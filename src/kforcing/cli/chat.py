"""`kforcing chat`: talk to a teacher or a student through its chat template, one decoder per
mode (ar, kforcing, lossless)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kforcing.cli.common import (
    compile_decoders,
    count,
    device_flag,
    load_with_tokenizer,
    natural,
    non_negative,
    path,
    positive,
)
from kforcing.decoding.generate import generate
from kforcing.evaluation.chat import chat_eos, encode_chat
from kforcing.io.checkpoint import resolve_model_dir
from kforcing.io.hub import chat_template
from kforcing.students.pushforward import PushForward
from kforcing.students.store import is_student_dir, student_info, teacher_of

MODES = ("ar", "kforcing", "lossless")


def decode(model, ids: list[int], args, eos: int | None, teacher):
    """One reply through `generate`: mode ar decodes the teacher (a student's own, when given a
    student), kforcing the student's windows, lossless the student's proposals verified by
    its teacher."""
    return generate(model, [ids], args.max_new_tokens, mode=args.mode, k=args.k, eos_id=eos,
                    seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, teacher=teacher, tree=args.tree)


def status(mode: str, res) -> dict:
    """The line after each answer: tokens, forward passes, tokens/s and, for the modes that
    decode several tokens per pass, tokens per pass (the decoder's own figure when it reports
    one: per teacher pass in lossless mode and for the token-feedback student)."""
    out = {"mode": mode, "new_tokens": res.num_tokens, "forward_passes": res.forward_passes,
           "tokens_per_s": round(res.tokens_per_second, 1)}
    if mode != "ar":
        per = res.extra.get("tokens_per_pass")
        out["tokens_per_pass"] = round(per if per is not None
                                       else res.num_tokens / max(res.forward_passes, 1), 2)
    return out


def chat_setup(path: str) -> dict | None:
    """The tokenizer_config with a chat template, or None: the model's own directory first,
    then a student's teacher."""
    dirs = [Path(path)]
    if is_student_dir(path):
        info = student_info(path)
        dirs += [info.dir] + ([info.teacher_dir] if info.teacher_dir else [])
    else:
        dirs.append(resolve_model_dir(path))
    for d in dirs:
        if (d / "tokenizer_config.json").is_file():
            return chat_template(d)
    return None


def cmd_chat(args) -> None:
    model, tok = load_with_tokenizer(args.model, args.device, allow_student=True)
    # a shared-layout student's teacher is loaded once, for modes that decode with it
    teacher = (teacher_of(model, args.model)
               if isinstance(model, PushForward) and args.mode != "kforcing" else None)
    if args.compile:
        compile_decoders(model, teacher)
    tok_cfg = chat_setup(args.model)
    eos = chat_eos(tok, tok_cfg, (getattr(model, "model_config", None) or model.config).eos_id)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        if tok_cfg:
            ids = encode_chat(tok, tok_cfg, history)
        else:   # a base model: plain continuation of the conversation so far
            ids = tok.encode("\n".join(m["content"] for m in history)).ids
        res = decode(model, ids, args, eos, teacher)
        reply = tok.decode(res.tokens[0], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        print(json.dumps(status(args.mode, res)), file=sys.stderr)

    if args.prompt is not None:
        turn(args.prompt)
        return
    print("kforcing chat: one message per line, Ctrl-D to quit", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            turn(line.strip())


def add_parser(sub) -> None:
    sp = sub.add_parser("chat", help="chat with a teacher or student (uses its chat template)")
    sp.add_argument("--model", type=path, required=True,
                    help="model, student or shareable directory")
    sp.add_argument("--mode", choices=MODES, default="ar",
                    help="ar: the teacher; kforcing: k tokens per pass; lossless: the "
                    "student proposes, the teacher verifies")
    sp.add_argument("--k", type=count, default=None,
                    help="tokens per pass (kforcing and lossless modes; default: max_k)")
    sp.add_argument("--tree", help="lossless with a token-feedback student: verify a draft tree of "
                    "these k-1 widths in each teacher pass, e.g. 4,2,1 (default: one chain; "
                    "docs/METHOD.md section 9)")
    sp.add_argument("--prompt", help="one message; without it, read messages from stdin")
    sp.add_argument("--system", help="system message (default: the template's own)")
    sp.add_argument("--max-new-tokens", type=natural, default=128)
    sp.add_argument("--temperature", type=non_negative, default=0.7, help="0 = greedy")
    sp.add_argument("--top-k", type=natural, help="keep the k most likely tokens (default: off)")
    sp.add_argument("--top-p", type=positive, help="nucleus sampling (default: off)")
    sp.add_argument("--seed", type=natural, default=0)
    sp.add_argument("--compile", action="store_true",
                    help="decode through compiled graphs (as generate --compile): the first "
                    "answer pays the compile, later ones run faster")
    device_flag(sp)
    sp.set_defaults(run=cmd_chat)
