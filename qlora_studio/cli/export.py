"""`qlora-studio export RUN [--out DIR] [--zip] [--merge] [--verify] [--force] [--push REPO [--private]]`."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="Export a run's adapter bundle (or a merged model), optionally zip it or push it to the Hub.",
        description="Write the adapter bundle of a run: adapter weights and config, the run's config.yaml, "
                    "metrics.jsonl, a loss-curve PNG and a README.md model card. With --merge, write the adapter "
                    "merged into a 16-bit copy of the base instead. The Hub token is read from HF_TOKEN (never "
                    "from the command line). Exit code: 0 done, 1 failed, 2 bad arguments or destination exists.")
    p.add_argument("run", help="A run folder (with adapter/), or an exported bundle when merging.")
    p.add_argument("--out", metavar="DIR",
                   help="Destination folder (default: ./<run name>-adapter or ./<run name>-merged).")
    p.add_argument("--zip", action="store_true", help="Also write DIR.zip next to the folder.")
    p.add_argument("--merge", action="store_true",
                   help="Merge the adapter into a 16-bit copy of the base and save that model; reports the largest "
                        "logit difference between the merged model and base+adapter.")
    p.add_argument("--dtype", choices=("bf16", "fp16"),
                   help="16-bit type of the merged model (default: bf16 where the hardware has it, else fp16). "
                        "fp16 merges more precisely, but some models' activations overflow its range.")
    p.add_argument("--verify", action="store_true",
                   help="Load the bundle with plain peft in a fresh process and compare its logits with the "
                        "studio's (adapter bundles only).")
    p.add_argument("--force", action="store_true", help="Replace an earlier export at the destination.")
    p.add_argument("--push", metavar="REPO", help="Push the export to this Hub model repo ('name' or 'user/name').")
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import (DestinationExists, ExportError, HubError, adapter_source, check_push, export_adapter,
                          export_merged, push_to_hub)

    if args.dtype and not args.merge:
        print("error: --dtype picks the merged model's type; add --merge", file=sys.stderr)
        return 2
    if args.verify and args.merge:
        print("error: --verify checks adapter bundles; --merge already compares the merged model's logits",
              file=sys.stderr)
        return 2
    try:
        source = adapter_source(args.run)
        if args.push:
            check_push(args.push)  # offline, no token or a bad name: say so before minutes of exporting
    except (ExportError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path.cwd() / f"{source.name}-{'merged' if args.merge else 'adapter'}"
    try:
        if args.merge:
            result = export_merged(args.run, out, overwrite=args.force, make_zip=args.zip, dtype=args.dtype)
        else:
            result = export_adapter(args.run, out, overwrite=args.force, make_zip=args.zip, verify=args.verify)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DestinationExists) else 1
    except Exception as e:
        print(f"error: export failed ({type(e).__name__}: {e}); nothing was written to {out}", file=sys.stderr)
        return 1
    print(f"exported {result.kind}: {result.path}")
    if result.zip_path:
        print(f"zip: {result.zip_path}")
    merge = result.manifest.get("merge")
    if merge:
        print(f"merge check: max |logit difference| merged vs base+adapter = {merge['max_abs_logit_diff']:.4g} "
              f"(largest logit {merge['max_abs_logit']:.4g}, top-1 agreement {merge['top1_agreement']:.0%}, "
              f"{merge['prompts']} prompts, {merge['dtype']})")
    check = result.manifest.get("verify")
    if check:
        print(f"fresh-process check: max |logit difference| plain peft vs studio = {check['max_abs_logit_diff']:.4g} "
              f"(the adapter itself moves logits by up to {check['adapter_effect']:.4g})")
    if args.push:
        try:
            pushed = push_to_hub(result.path, args.push, private=args.private)
        except HubError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"pushed {pushed.files} files to {pushed.url}" + (" (private)" if pushed.private else ""))
    return 0
