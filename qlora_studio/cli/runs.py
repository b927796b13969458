"""`qlora-studio runs [ROOT] [--json]`: the run history."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="List training runs and their status.")
    p.add_argument("root", nargs="?", default="runs", help="Folder holding run folders (default: runs).")
    p.add_argument("--json", action="store_true", help="Print one JSON array.")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runs import list_runs

    runs = list_runs(args.root)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs under {args.root}")
        return 0
    print(f"{'name':40} {'state':10} {'step':>9} {'train':>8} {'eval':>8}  model")
    for r in runs:
        loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "-"
        ev = f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"
        print(f"{r.name[:40]:40} {r.state:10} {r.step:>4}/{r.max_steps:<4} {loss:>8} {ev:>8}  {r.model}")
    return 0
