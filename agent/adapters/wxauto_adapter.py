#!/usr/bin/env python3
"""Reference WeChat adapter: bridges the `wxauto` library to ferry-agent.

Runs on the Windows PC beside ferry-agent, with the WeChat desktop client
logged in. It listens to the chats you name, reports every new message to
the agent, and sends the replies the agent hands back.

    pip install wxauto
    python wxauto_adapter.py --chat "文件传输助手" --chat "客户群" --port 7301

Needs ferry-agent running with the adapter enabled ([adapter] in its config,
or `run --adapter 127.0.0.1:7301`). Escalations, predictions and alerts are
printed here; a desk tool can connect as a listener (sends=false) to show them.
"""

import argparse
import queue
import sys
import threading
import time

from ferry_adapter import AgentConnection, read_token


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7301)
    p.add_argument("--token-file", default=None,
                   help="the agent's adapter.token (in its spool dir); default: $FERRY_ADAPTER_TOKEN_FILE")
    p.add_argument("--chat", action="append", required=True, help="a chat to listen to (repeat)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between wxauto polls")
    args = p.parse_args()

    try:
        from wxauto import WeChat  # imported here so --help works without it
    except ImportError:
        print("wxauto is not installed: pip install wxauto", file=sys.stderr)
        return 2

    wx = WeChat()
    for chat in args.chat:
        wx.AddListenChat(who=chat)
    conn = AgentConnection(args.host, args.port, name="wxauto", sends=True, token=read_token(args.token_file))
    print(f"connected to ferry-agent {conn.agent}; listening to {', '.join(args.chat)}", file=sys.stderr)

    # wxauto drives the WeChat window: every call stays on this thread. The
    # agent's lines arrive on a reader thread and wait in a queue.
    inbox = queue.Queue(maxsize=1000)

    def read_agent():
        while True:
            line = conn.read_line()
            inbox.put(line)
            if line is None:
                return

    threading.Thread(target=read_agent, daemon=True).start()

    while True:
        # New messages from WeChat to the agent.
        for chat, messages in wx.GetListenMessage().items():
            who = getattr(chat, "who", str(chat))
            for m in messages:
                if getattr(m, "type", "") not in ("friend", "group"):
                    continue  # our own messages, time stamps, system notices
                conn.message(chat=who, sender=getattr(m, "sender", who), content=m.content,
                             chat_type="group" if m.type == "group" else "direct")
        # What the agent asks of us.
        try:
            while True:
                line = inbox.get_nowait()
                if line is None:
                    print("ferry-agent closed the connection", file=sys.stderr)
                    return 1
                kind = line.get("type")
                if kind == "send":
                    try:
                        wx.SendMsg(line["text"], who=line["chat"])
                        conn.sent(line["reply_id"])
                    except Exception as e:  # wxauto raises plain Exceptions
                        conn.send_failed(line["reply_id"], e)
                elif kind in ("escalation", "prediction", "alert", "error"):
                    print(line, file=sys.stderr)
        except queue.Empty:
            pass
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
