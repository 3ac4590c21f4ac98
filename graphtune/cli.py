"""Command line: ``graphtune demo`` (offline, tiny model), ``graphtune explain``, ``graphtune data curate``, ``graphtune export``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def _demo(args: argparse.Namespace) -> int:
    import torch

    import graphtune
    from graphtune.tiny import FAMILIES, tiny_batch, tiny_model

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    compiler = args.compiler or ("inductor" if torch.cuda.is_available() else "aot_eager")
    print(f"graphtune {graphtune.__version__} demo: tiny {args.family} + LoRA, compiler={compiler}, {args.steps} steps")
    model = tiny_model(args.family, lora=True)
    model.train()
    graphtune.optimize(model, compiler=compiler, verify=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr)
    # a fixed "dataset": the model must learn to copy a few sequences
    data = [tiny_batch(4, 32, seed=i) for i in range(4)]
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = data[step % len(data)]
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step == 0:
            print(graphtune.last_report(model).summary())
            print(f"first step (capture + compile + verify against eager): {time.perf_counter() - t0:.1f}s")
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f}s; families available: {', '.join(FAMILIES)}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    import graphtune
    from graphtune.tiny import tiny_batch, tiny_model

    report = graphtune.explain(tiny_model(args.family, lora=args.lora), **tiny_batch())
    print(report.summary())
    if args.graph:
        print(report.graph_text)
    return 0


def _data(argv: list[str]) -> int:
    try:
        from graphtune.data.cli import main as data_main
    except ImportError as e:  # pragma: no cover - depends on the data extra
        print(f"graphtune data needs the 'data' extra: pip install 'graphtune[data]' ({e})", file=sys.stderr)
        return 2
    return int(data_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """The ``graphtune`` command. ``argv=None`` means this call is the process (the console script,
    ``python -m graphtune``): ``graphtune export`` then runs as ``graphtune.export.cli.run_and_exit``
    (no garbage collection during the graph analysis, no interpreter teardown at exit) and does not
    return. With an explicit ``argv`` every verb returns its exit status."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        return _data(argv[1:])
    if argv and argv[0] == "export":
        from graphtune.export.cli import main as export_main, run_and_exit

        if own_process:
            run_and_exit(argv[1:])  # exits the process
        return int(export_main(argv[1:]) or 0)
    from graphtune.tiny import FAMILIES

    parser = argparse.ArgumentParser(prog="graphtune", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="optimize and train a tiny built-in model offline; print the report and loss")
    demo.add_argument("--family", choices=FAMILIES, default="llama")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--compiler", choices=["inductor", "aot_eager", "eager"], default=None)
    demo.set_defaults(fn=_demo)
    ex = sub.add_parser("explain", help="print what the passes do to a tiny built-in model of a family")
    ex.add_argument("--family", choices=FAMILIES, default="llama")
    ex.add_argument("--lora", action="store_true")
    ex.add_argument("--graph", action="store_true", help="also print the canonical graph text")
    ex.set_defaults(fn=_explain)
    sub.add_parser("data", help="code-corpus curation: graphtune data curate config.yaml")
    sub.add_parser("export", help="write a GGUF (and merged safetensors, adapter GGUF, Modelfile): graphtune export --help")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
