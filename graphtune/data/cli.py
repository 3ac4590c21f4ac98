"""Command line: ``graphtune data curate config.yaml`` and ``graphtune data verify OUT``.

``main(argv)`` takes the arguments after ``graphtune data`` and returns an exit code, so the
top-level ``graphtune`` command can dispatch to it; ``python -m graphtune.data`` works too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``graphtune data`` verb."""
    p = argparse.ArgumentParser(prog="graphtune data", description="Curate code corpora into training shards (The Stack v2 recipe).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curate", help="build a dataset from a YAML config")
    c.add_argument("config", help="path to the YAML config")
    c.add_argument("--tasks", type=int, default=None, help="override executor.tasks (output does not change)")
    c.add_argument("--workers", type=int, default=None, help="override executor.workers")
    c.add_argument("--no-progress", action="store_true", help="no progress bars / summary table")
    c.add_argument("--clean-work", action="store_true", help="delete the work dir after a successful run")
    v = sub.add_parser("verify", help="rebuild a dataset from its manifest and compare shard hashes")
    v.add_argument("target", help="output folder (or its manifest.json)")
    v.add_argument("--tasks", type=int, default=None)
    v.add_argument("--progress", action="store_true")
    v.add_argument("--no-rebuild", action="store_true", help="only check the published shards against the manifest")
    k = sub.add_parser("check", help="validate a config without running it")
    k.add_argument("config")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 on a failed verify, 2 on a bad config."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from graphtune.data.config import ConfigError, load_config

    try:
        if args.command == "check":
            load_config(args.config)
            print(f"{args.config}: OK")
            return 0
        if args.command == "curate":
            from graphtune.data.pipeline import curate

            cfg = load_config(args.config)
            res = curate(cfg, tasks=args.tasks, workers=args.workers, progress=not args.no_progress, keep_work=not args.clean_work)
            print(f"wrote {res.manifest.get('rows', 0)} rows in {len(res.shards)} shard(s) to {res.output_dir}")
            return 0
        if args.command == "verify":
            from graphtune.data.pipeline import verify

            r = verify(args.target, tasks=args.tasks, progress=args.progress, rebuild=not args.no_rebuild)
            for w in r.warnings:
                print(f"warning: {w}", file=sys.stderr)
            if r.ok:
                what = "rebuild matches" if not args.no_rebuild else "published shards match the manifest"
                print(f"OK: {what} (fingerprint {r.expected_fingerprint})")
                return 0
            for m in r.mismatches:
                print(f"MISMATCH: {m}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
