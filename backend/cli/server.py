"""``semiseg serve | token``: the project over HTTP (:mod:`backend.server`) and its users' tokens."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    from backend.cli.engine import job_backend
    from backend.server import serve

    serve(args.project, host=args.host, port=args.port, tokens=args.tokens, tls_cert=args.tls_cert,
          tls_key=args.tls_key, log_level=args.log_level, job_backend=job_backend(args))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from backend.server.auth import add_token, read_tokens, remove_token

    if args.action != "list" and not args.user:
        from backend.errors import InputError

        raise InputError(None, f"semiseg token {args.action} needs a USER name")
    if args.action == "add":
        token = add_token(args.tokens, args.user, args.role)
        print(f"token for {args.user} ({args.role}), shown once; only its hash is kept in {args.tokens}:\n{token}")
    elif args.action == "remove":
        if not remove_token(args.tokens, args.user):
            print(f"no user '{args.user}' in {args.tokens}")
            return 1
        print(f"removed {args.user} from {args.tokens}")
    else:
        for name, record in sorted(read_tokens(args.tokens).items()):
            print(f"{name}  {record['role']}  {record.get('created', '')}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from backend.cli.engine import add_backend_args
    from backend.server import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("serve", help="serve a project over HTTP for remote review and training (loopback by default)")
    p.set_defaults(func=cmd_serve)
    p.add_argument("project", type=Path)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                                                         "machine only; reach it through an SSH tunnel)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--tokens", type=Path, help="tokens file (default PROJECT/semiseg/tokens.json)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_backend_args(p, "where the jobs that clients start run")

    p = sub.add_parser("token", help="add, remove or list the users who may use 'semiseg serve'")
    p.set_defaults(func=cmd_token)
    p.add_argument("action", choices=["add", "remove", "list"])
    p.add_argument("user", nargs="?", help="user name (add, remove)")
    p.add_argument("--role", choices=["annotator", "trainer"], default="annotator",
                   help="annotator: review and accept labels; trainer: also start, cancel and resume jobs")
    p.add_argument("--tokens", type=Path, required=True, help="the tokens file 'semiseg serve --tokens' reads")
