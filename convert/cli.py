"""`dsv32 convert` / `python -m convert`: the converter's command line."""

from __future__ import annotations

import argparse
import sys

from dsv32_jax.argtypes import Parser, positive_float, positive_int

USAGE = """\
dsv32 convert HF_DIR OUT_DIR [--weights fp8|bf16] [--include-mtp] [--workers N] [--force]
dsv32 convert --verify OUT_DIR HF_DIR [--sample FRACTION]"""


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dsv32 convert", usage=USAGE,
        description="Convert the released DeepSeek-V3.2 checkpoint (HF safetensors dir) into an "
                    "Orbax checkpoint that dsv32_jax.load_model(OUT_DIR) restores directly; or, with "
                    "--verify, check a converted dir against its source.")
    p.add_argument("first", metavar="HF_DIR", help="source dir (with --verify: the converted OUT_DIR)")
    p.add_argument("second", metavar="OUT_DIR", help="output dir (with --verify: the source HF_DIR)")
    p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8",
                   help="fp8 (default): keep the weights exactly as stored (FP8 e4m3 + fp32 scales, "
                        "lossless); bf16: dequantize FP8 weights to bf16 (about 2x the weight bytes)")
    p.add_argument("--include-mtp", action="store_true",
                   help="also convert the multi-token-prediction layer (into OUT_DIR/mtp)")
    p.add_argument("--workers", type=positive_int, default=4, help="parallel reader/writer threads (default 4)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--restart", action="store_true",
                   help="discard OUT_DIR.partial from an interrupted run instead of resuming it")
    p.add_argument("--hash", action="store_true",
                   help="record the sha256 of every source file in the manifest (one more full read)")
    p.add_argument("--chunk-mb", type=positive_float, default=32,
                   help="target stored chunk size in MiB, the unit of reading and writing (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    p.add_argument("--verify", action="store_true",
                   help="verify OUT_DIR against HF_DIR instead of converting (arguments: OUT_DIR HF_DIR)")
    p.add_argument("--sample", type=float, default=1.0,
                   help="with --verify: share of chunks to compare (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=0, help="with --verify --sample: which chunks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not 0 < args.sample <= 1:
        parser.error(f"argument --sample: expected a share of chunks in (0, 1], got {args.sample}")
    from convert.plan import ConvertError

    progress = not args.no_progress
    try:
        if args.verify:
            from convert.verify import verify_checkpoint

            report = verify_checkpoint(args.first, args.second, sample=args.sample, seed=args.seed,
                                       workers=args.workers, progress=progress)
            print(f"OK: {report['chunks_checked']}/{report['chunks']} chunks of {report['leaves']} "
                  f"arrays ({report['bytes_checked'] / 1e9:.3f} GB) equal to the source")
            return 0
        from convert.run import convert_checkpoint

        m = convert_checkpoint(args.first, args.second, weights=args.weights,
                               include_mtp=args.include_mtp, workers=args.workers, force=args.force,
                               resume=not args.restart, hash_files=args.hash, progress=progress,
                               chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))))
        s = m["stats"]
        print(f"OK: {args.second}: {m['total_bytes'] / 1e9:.3f} GB ({m['tensor_count']} tensors) in "
              f"{s['seconds']:.1f}s, {s['write_mb_per_s']:.0f} MB/s")
        return 0
    except (ConvertError, ValueError, OSError) as e:
        print(f"dsv32 convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsv32 convert: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
