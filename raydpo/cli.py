"""The ``raydpo`` command line.

    raydpo config show [--config FILE] [key=value ...]   print the resolved config
    raydpo config fields                                  every key with its meaning
    raydpo tiny-model --out DIR [--corpus FILE] [--config FILE] [key=value ...]
    raydpo data validate PATH... [--format F] [--strict]   check preference records
    raydpo judge eval LABELLED [--config FILE] [key=value ...]   a judge's accuracy on labelled pairs

Each subcommand has ``--help``. Errors in flags, config keys or input files
exit with status 2 and one message naming the problem; no traceback.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from raydpo.config_io import describe, load_config
from raydpo.errors import ConfigError, RaydpoError, exit_code


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config; omitted keys keep their defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.lr=1e-5")


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_config_fields(args: argparse.Namespace) -> int:
    print("\n".join(describe()))
    return 0


def read_corpus(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a bad byte names its line."""
    lines = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"--corpus {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if text.strip():
                lines.append(text)
    if not lines:
        raise ConfigError(f"{path}: corpus is empty")
    return lines


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from raydpo.tiny_model import build_tiny_model, count_parameters

    cfg = load_config(args.config, args.overrides)
    if args.corpus:
        corpus = read_corpus(args.corpus)
    else:
        from raydpo.tasks import style

        corpus = style.corpus(seed=cfg.seed)
    out = build_tiny_model(corpus, args.out, cfg.model.tiny, seed=cfg.seed)
    from transformers import AutoModelForCausalLM

    n = count_parameters(AutoModelForCausalLM.from_pretrained(out))
    print(f"wrote {out} ({n:,} parameters, trained tokenizer on {len(corpus):,} lines)")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from raydpo.data.formats import validate_paths

    good, report = validate_paths(args.paths, args.format, args.strict)  # a DataError: exit 2, as every job
    report.max_examples = args.show
    for bad in report.examples[: args.show]:
        print(f"BAD {bad}")
    print(report.summary())
    return 1 if report.bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydpo", description="DPO and online DPO on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_cfg = sub.add_parser("config", help="inspect configs", description="Inspect and validate configs.")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p_show = cfg_sub.add_parser("show", help="print the resolved config", description="Load, override, validate and print a config.")
    _add_config_args(p_show)
    p_show.set_defaults(func=cmd_config_show)
    p_fields = cfg_sub.add_parser("fields", help="list every key with its meaning", description="List every config key, its type, default and meaning.")
    p_fields.set_defaults(func=cmd_config_fields)

    p_tiny = sub.add_parser(
        "tiny-model",
        help="build a tiny Llama + BPE tokenizer",
        description="Train a byte-level BPE tokenizer on a corpus and save it with a fresh tiny "
        "LlamaForCausalLM (shape from model.tiny.*) as a safetensors folder transformers and vLLM load.",
    )
    p_tiny.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p_tiny.add_argument("--corpus", metavar="FILE", help="UTF-8 text, one document per line (default: the built-in style task)")
    _add_config_args(p_tiny)
    p_tiny.set_defaults(func=cmd_tiny_model)

    p_data = sub.add_parser("data", help="preference data tools", description="Preference data tools.")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p_val = data_sub.add_parser(
        "validate",
        help="check preference records",
        description="Check every record of JSONL/Parquet files or folders; print each bad record with "
        "file:line (JSONL, 1-based) or file:row (Parquet, 0-based) and reason, then counts by reason. "
        "Exit 0 if all records are good, 1 if any is bad, 2 if a path cannot be read (or, with --strict, "
        "at the first bad record).",
    )
    p_val.add_argument("paths", nargs="+", metavar="PATH", help="file or folder (searched recursively)")
    p_val.add_argument("--format", default="auto", choices=["auto", "standard", "conversational", "openai", "implicit", "sft"])
    p_val.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p_val.add_argument("--show", type=int, default=20, metavar="N", help="bad records to print (default 20)")
    p_val.set_defaults(func=cmd_data_validate)

    # `raydpo online ...` hands every argument to the job runner (raydpo.online.loop.main)
    sub.add_parser("online", help="run (or --resume) the online-DPO loop; see `raydpo online --help`", add_help=False)
    p_rep = sub.add_parser("report", help="redraw the report of an online run",
                           description="Write <run_dir>/report/report.md and metrics.png from online_metrics.jsonl.")
    p_rep.add_argument("run_dir", metavar="RUN_DIR")
    p_rep.set_defaults(func=cmd_report)

    p_judge = sub.add_parser("judge", help="judge tools", description="Judge tools.")
    judge_sub = p_judge.add_subparsers(dest="judge_command", required=True, metavar="ACTION")
    p_jev = judge_sub.add_parser(
        "eval", help="a judge's accuracy on labelled preference pairs",
        description="Deploy the configured judge (judge.*, on a local Ray unless cluster.address or RAY_ADDRESS) "
        "and ask it every labelled pair in both orders: accuracy against the labels (ties half) with a Wilson "
        "95%% interval, position consistency, tie and invalid rates, and a remote judge's cost.")
    p_jev.add_argument("path", metavar="LABELLED", help="preference pairs (JSONL/Parquet file or folder, any format "
                       "`raydpo data validate` reads): chosen is the label")
    p_jev.add_argument("--format", default="auto", choices=["auto", "standard", "conversational", "openai", "implicit"])
    p_jev.add_argument("--limit", type=int, default=0, metavar="N", help="judge the first N pairs only")
    _add_config_args(p_jev)
    p_jev.set_defaults(func=cmd_judge_eval)
    return parser


def cmd_judge_eval(args: argparse.Namespace) -> int:
    from raydpo.judge import evaluate

    cfg = load_config(args.config, args.overrides)
    result = evaluate.run(cfg, args.path, args.format, args.limit)
    print(result.table())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raydpo.report import read_metrics, table, write_report

    md = write_report(args.run_dir)
    print(table(read_metrics(args.run_dir)))
    print(f"report: {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["online"]:
        from raydpo.online.loop import main as online_main

        return online_main(argv[1:], prog="raydpo online")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RaydpoError as e:
        print(f"raydpo: error: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
