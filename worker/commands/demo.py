"""`demo`: the local end-to-end run behind `make demo`."""

from __future__ import annotations

from worker.commands.base import Context, SubParsers


def register(sub: SubParsers) -> None:
    d = sub.add_parser("demo", help="local end-to-end run: embedded PostgreSQL, emulator, moto SQS")
    d.add_argument("--stop", action="store_true", help="stop the embedded PostgreSQL a previous demo left running")
    d.set_defaults(handler=run)


def run(ctx: Context) -> int:
    from worker.local.demo import run_demo, stop_demo

    if ctx.args.stop:
        return stop_demo(ctx.out)
    return run_demo(ctx.settings, ctx.out)
