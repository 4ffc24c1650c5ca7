#!/usr/bin/env python3
"""A scripted chat adapter for tests and the demo: plays chat messages from a
JSON-lines script to ferry-agent and prints what the agent asks it to do.

Script lines: {"chat": "Alice", "sender": "Alice", "content": "hi", "chat_type": "direct"}
Output: one JSON line per line received from the agent (accepted, send,
escalation, prediction, alert), in order. It answers every `send` with
`sent`. It exits 0 once every scripted message got a `send` or an
`escalation` (or --expect N lines of those), 1 on timeout.

    scripted_adapter.py --port 7301 --script chats.jsonl --timeout 60
"""

import argparse
import json
import sys
import time

from ferry_adapter import AgentConnection, read_token


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7301)
    p.add_argument("--token-file", default=None,
                   help="the agent's adapter.token (in its spool dir); default: $FERRY_ADAPTER_TOKEN_FILE")
    p.add_argument("--script", required=True, help="JSON lines of messages to send")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answers")
    p.add_argument("--expect", type=int, default=None,
                   help="answers (send or escalation) to wait for; default: one per message")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to keep trying to connect")
    args = p.parse_args()

    with open(args.script, encoding="utf-8") as f:
        script = [json.loads(l) for l in f if l.strip() and not l.lstrip().startswith("#")]

    deadline = time.monotonic() + args.connect_timeout
    while True:
        try:
            # The agent writes its token before it listens.
            conn = AgentConnection(args.host, args.port, name="scripted", timeout=args.timeout,
                                   token=read_token(args.token_file))
            break
        except OSError as e:  # not listening yet, or no token file yet
            if time.monotonic() > deadline:
                print(f"scripted adapter: cannot connect to {args.host}:{args.port}: {e}", file=sys.stderr)
                return 1
            time.sleep(0.2)

    for i, m in enumerate(script):
        conn.message(m["chat"], m.get("sender", m["chat"]), m["content"],
                     chat_type=m.get("chat_type", "direct"), msg_type=m.get("msg_type", "text"), ref=str(i))

    expect = args.expect if args.expect is not None else len(script)
    answers = 0
    end = time.monotonic() + args.timeout
    while answers < expect:
        if time.monotonic() > end:
            print(f"scripted adapter: {answers} of {expect} answers before the timeout", file=sys.stderr)
            return 1
        try:
            line = conn.read_line()
        except OSError as e:
            print(f"scripted adapter: {e}", file=sys.stderr)
            return 1
        if line is None:
            print("scripted adapter: the agent closed the connection", file=sys.stderr)
            return 1
        print(json.dumps(line, ensure_ascii=False), flush=True)
        if line.get("type") == "send":
            conn.sent(line["reply_id"])
            answers += 1
        elif line.get("type") == "escalation":
            answers += 1
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
