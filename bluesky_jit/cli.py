"""The command line: ``bluesky-jit demo``.

Exit codes: 0 success, 1 the run finished but its derived run failed, 2 bad
usage or input (argparse and bluesky_jit errors).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import BlueskyJitError

EXAMPLES = {
    "demo": """examples:
  bluesky-jit demo
  bluesky-jit demo --rotations 2 --size 96 --summary summary.json --figures figures/
  bluesky-jit demo --photons 300 --no-pace --model unet --device cuda
""",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bluesky-jit",
        description="Live just-in-time denoising of tomography scans (a Bluesky plugin).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="simulated dynamic scan with live denoising into an embedded Tiled catalog",
        epilog=EXAMPLES["demo"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=Path("bluesky_jit_data"),
        help="catalog, detector files and derived files (default: %(default)s)",
    )
    demo.add_argument(
        "--catalog",
        dest="catalog_uri",
        default=None,
        help="write to this Tiled server instead of the embedded catalog",
    )
    demo.add_argument("--api-key", default=None, help="API key for --catalog")
    demo.add_argument("--size", type=int, default=128, help="detector width = slice size (px)")
    demo.add_argument("--rows", type=int, default=16, help="detector rows")
    demo.add_argument(
        "--angles",
        dest="num_angles",
        type=int,
        default=90,
        help="projections per rotation (180 degrees)",
    )
    demo.add_argument("--rotations", type=int, default=3)
    demo.add_argument("--photons", type=float, default=1000.0, help="flat-field counts per pixel")
    demo.add_argument("--frame-rate", type=float, default=15.0, help="virtual frames per second")
    demo.add_argument(
        "--no-pace",
        dest="paced",
        action="store_false",
        help="acquire as fast as possible instead of at --frame-rate",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="unet", help="denoiser by name (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    demo.add_argument(
        "--refresh-every",
        type=int,
        default=10,
        help="new slice every k projections (default: %(default)s)",
    )
    demo.add_argument("--summary", type=Path, default=None, help="write the summary as JSON")
    demo.add_argument("--figures", type=Path, default=None, help="write PNG figures here")
    demo.add_argument("--no-progress", dest="progress", action="store_false")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _demo(args)
    except BlueskyJitError as error:
        print(f"bluesky-jit: error: {error}", file=sys.stderr)
        return 2
    return 2


def _demo(args: argparse.Namespace) -> int:
    from .config import JitConfig
    from .demo import DemoOptions, format_summary, run_demo

    config = JitConfig(
        model=args.model,
        device=args.device,
        refresh_every=args.refresh_every,
        seed=args.seed,
    )
    options = DemoOptions(
        data_dir=args.data_dir,
        catalog_uri=args.catalog_uri,
        api_key=args.api_key,
        size=args.size,
        rows=args.rows,
        num_angles=args.num_angles,
        rotations=args.rotations,
        photons=args.photons,
        frame_rate=args.frame_rate,
        paced=args.paced,
        seed=args.seed,
        summary=args.summary,
        figures=args.figures,
        progress=args.progress,
        config=config,
    )
    result = run_demo(options)
    print(format_summary(result))
    return 0 if result["exit_status"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
