"""Command line of kdkernels: ``python -m kdkernels <command> [options]``.

Each command lives in its own module (imported only when that command runs) exposing ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

from .methods import METHODS

# command -> module (relative to this package) whose main(args) runs it; a command's task (``demo lm``) runs from
# the module <command module>_<task>
COMMANDS = {"demo": ".demo", "bench": ".bench"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# Long: the command line's declaration, one add_argument per option.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdkernels", description="Fused knowledge-distillation losses.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    demo = commands.add_parser(
        "demo",
        help="distil a small student on the digits dataset with every method and time every backend",
        description="Train a teacher MLP on scikit-learn's digits, then a small student per distillation method "
        "(CE + distill_loss) against a CE-only student; print accuracies and per-backend step times. "
        "Options left out keep the demo's schedule (printed with the results).",
    )
    demo.add_argument("--quick", action="store_true", help="a few-second smoke run (1 seed, few epochs)")
    demo.add_argument("--seeds", type=_positive_int, help="number of seeds the accuracies are averaged over")
    demo.add_argument("--epochs", type=_positive_int, help="training epochs of every student")
    demo.add_argument("--per-class", type=_positive_int, help="labelled training images per class for the students")
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        metavar="METHOD",
        help=f"subset of methods to run (default: all of {', '.join(METHODS)})",
    )
    demo.add_argument(
        "--method-defaults",
        action="store_true",
        help="run every method at its METHODS defaults (T=1 for rkl, jsd, skew_fkl, skew_rkl, tvd and "
        "abkd) instead of the demo's shared T=4",
    )
    demo.add_argument("--timing-iters", type=_positive_int, help="iterations of each timed loop")
    demo.add_argument(
        "--standardize",
        action="store_true",
        help="also train each method with logit standardization (standardize=True): one more column",
    )
    demo.add_argument(
        "--learn-temperature",
        action="store_true",
        help="also train each method with a learned temperature (CTKD: adversarial, through a gradient "
        "reversal): one more column, with the mean learned T",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    tasks = demo.add_subparsers(dest="task", metavar="task")
    lm = tasks.add_parser(
        "lm",
        help="distil a causal LM on the standard library's source (transformers + kdkernels' trainer)",
        description="Train a BPE tokenizer and a small Llama teacher on Python's standard library sources, then "
        "half-size students: CE only, and 0.1 CE + 0.9 method through KDTrainer (fused-"
        "linear); print held-out perplexities, and the peak memory and time of a distillation step on "
        "the fused-linear path against full logits. Needs the llm extra (scripts/setup.sh installs it).",
    )
    lm.add_argument("--quick", action="store_true", help="a small smoke run (tiny models, a few steps)")
    lm.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        metavar="METHOD",
        help="methods of the distilled students (default: kd wsd)",
    )
    lm.add_argument("--steps", type=_positive_int, help="student steps (the teacher trains twice as many)")
    lm.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    lm.add_argument(
        "--cross-tokenizer",
        action="store_true",
        help="the student on a tokenizer of its own (another vocabulary): CE only, uld and hybrid through "
        "KDTrainer(teacher_tokenizer=...), several seeds; and the step against TRL's GOLD ULDLoss",
    )
    lm.add_argument("--seeds", type=_positive_int, help="with --cross-tokenizer: seeds per student (default 3)")
    bench = commands.add_parser(
        "bench",
        help="time forward + backward of every loss and backend; table, CSV and PNG",
        description="Forward + backward time, bandwidth on the minimal bytes (read student and teacher, write the "
        "gradient), time as a multiple of the byte floor, and peak memory of every loss for each fused "
        "backend, the method's idiomatic eager code, torch.compile of that code and the eager reference.",
    )
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    from .bench import describe_shapes  # (the shape tables; the command itself still imports on use)

    bench.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help=f"subset of the device's shapes (default: all of them): {describe_shapes()}",
    )
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD", help="subset of methods")
    bench.add_argument(
        "--backends",
        nargs="+",
        help="backends to time: fused backend names, 'eager' (idiomatic code), 'compile', 'reference'",
    )
    bench.add_argument("--out", default="bench/out", help="folder for bench.csv and bench.png (default bench/out)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument(
        "--linear",
        action="store_true",
        help="fused-linear section: linear_distill_loss against full logits + the fastest fused loss "
        "(time and peak memory above inputs, LLM head shapes); writes linear.csv",
    )
    from .bench import LINEAR_CASES, LINEAR_PATHS

    bench.add_argument("--cases", nargs="+", choices=list(LINEAR_CASES), help="with --linear: subset of its losses")
    bench.add_argument("--paths", nargs="+", choices=LINEAR_PATHS, help="with --linear: subset of its paths")
    bench.add_argument("--reps", type=int, default=3, help="with --linear: timed steps per path (default 3)")
    bench.add_argument(
        "--cross-vocab",
        action="store_true",
        help="cross-vocabulary section: cross_vocab_loss (uld, hybrid) on every backend with its kernels, on rows "
        "the kernels sort on chip and on an LLM's (time and peak memory); prints the table, writes no file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default: sys.argv[1:]), runs the command and returns its exit code."""
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command]
    if getattr(args, "task", None) is not None:
        module = f"{module}_{args.task}"
    return importlib.import_module(module, __package__).main(args)


if __name__ == "__main__":
    raise SystemExit(main())
