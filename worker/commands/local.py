"""`local`: keep the whole local stack running and print the environment to paste (docs/cli.md)."""

from __future__ import annotations

import sys

from worker.commands.base import EXIT_OK, Context, SubParsers


def register(sub: SubParsers) -> None:
    lc = sub.add_parser("local", help="keep the local stack running (embedded PostgreSQL, emulator, moto SQS and "
                                      "S3) and print the environment that points at it; Ctrl-C stops it")
    lc.set_defaults(handler=run)


def run(ctx: Context) -> int:
    from worker.local.stack import local_stack, wait_for_stop

    with local_stack(ctx.settings) as stack:
        # stdout carries the environment only (eval "$(... local | head -n 11)" works); the rest is stderr.
        for line in stack.exports():
            print(line)
        sys.stdout.flush()
        det = next(job for job, api in stack.sample_jobs if api == "GetFaceDetection")
        srch = next(job for job, api in stack.sample_jobs if api == "GetFaceSearch")
        print("\n".join([
            "# local stack ready. In another shell, paste the export lines above, then try:",
            f"#   {ctx.prog} backfill --api GetFaceDetection {det}",
            f"#   {ctx.prog} backfill {srch}",
            f"#   {ctx.prog} report {det}",
            f"#   {ctx.prog} jobs list",
            f"#   {ctx.prog} submit --api FACE_DETECTION s3://demo-video-library/lobby/",
            f"#   {ctx.prog} run --exit-when-idle",
            f"#   {ctx.prog} submissions",
            f"#   {ctx.prog} dlq list",
            f"#   echo person-1 | {ctx.prog} erase --external-image-id -",
            f"# sample jobs in the emulator: {', '.join(job for job, _ in stack.sample_jobs)}",
            "# Ctrl-C stops the stack.",
        ]), file=sys.stderr, flush=True)
        signal_name = wait_for_stop()
    print(f"# local stack stopped ({signal_name})", file=sys.stderr, flush=True)
    return EXIT_OK
