"""``python -m sandbox``: serve the sandbox HrFlow API."""

from __future__ import annotations

import argparse
import logging

from sandbox.app import run_sandbox


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)  # as `hrflow-webhooks sandbox`
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every API call")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of API calls failing")
    parser.add_argument("--status", type=int, default=500, help="status of the failing calls")
    parser.add_argument("--seed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--webhook-url",
        help="send profile.parsing.success here after a POST, profile.storing.update after a PUT",
    )
    parser.add_argument("--webhook-secret", help="sign those webhooks with this secret")
    parser.add_argument(
        "--drop-webhooks",
        action="store_true",
        help="drop every webhook, counted (missed deliveries); POST /_sandbox/webhooks switches",
    )
    parser.add_argument(
        "--update-webhooks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send profile.storing.update after a PUT",
    )
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.INFO)
    run_sandbox(
        args.host,
        args.port,
        args.latency_ms,
        args.fail_rate,
        args.status,
        args.seed,
        args.webhook_url,
        args.webhook_secret,
        drop_webhooks=args.drop_webhooks,
        update_webhooks=args.update_webhooks,
    )


if __name__ == "__main__":
    main()
