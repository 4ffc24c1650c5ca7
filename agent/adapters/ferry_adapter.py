"""The client side of ferry-agent's chat adapter protocol (version 1).

JSON lines over loopback TCP; see docs/windows-agent.md, "Chat adapters".
Standard library only, so an adapter runs on any Python 3.8+.
"""

import json
import os
import socket

PROTOCOL_VERSION = 1

# Where adapters find the agent's token file unless told (--token-file):
# ferry-agent writes it as `adapter.token` in its spool directory.
TOKEN_FILE_ENV = "FERRY_ADAPTER_TOKEN_FILE"


def read_token(path=None):
    """The agent's adapter token, from `path` or $FERRY_ADAPTER_TOKEN_FILE."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise ProtocolError(
            "no token file: pass --token-file (the agent's spool dir/adapter.token) or set " + TOKEN_FILE_ENV)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class ProtocolError(Exception):
    """The agent refused us or said something we did not expect."""


class AgentConnection:
    """One connection to ferry-agent's adapter port."""

    def __init__(self, host="127.0.0.1", port=7301, name="adapter", sends=True, timeout=None, token=None):
        token = token if token is not None else read_token()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("r", encoding="utf-8", newline="\n")
        self.send_line({"type": "hello", "v": PROTOCOL_VERSION, "token": token, "name": name, "sends": sends})
        welcome = self.read_line()
        if welcome is None or welcome.get("type") != "welcome":
            raise ProtocolError(f"agent refused the hello: {welcome}")
        self.agent = welcome.get("agent")

    def send_line(self, obj):
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        self.sock.sendall(data)

    def read_line(self):
        """The next line from the agent as a dict, or None when it closed."""
        line = self.reader.readline()
        if not line:
            return None
        return json.loads(line)

    def message(self, chat, sender, content, chat_type="direct", msg_type="text", time=None, ref=None):
        """Reports an incoming chat message; the agent answers with `accepted`."""
        line = {"type": "message", "chat": chat, "chat_type": chat_type, "sender": sender,
                "content": content, "msg_type": msg_type}
        if time is not None:
            line["time"] = time
        if ref is not None:
            line["ref"] = ref
        self.send_line(line)

    def interaction(self, session_id, response_time_ms, success, user_input="", intent=None,
                    tools_used=(), error_type=None, model=None, tokens=None, time=None, ref=None):
        """Reports one interaction of an AI assistant; the agent answers with `accepted`."""
        line = {"type": "interaction", "session_id": session_id, "user_input": user_input,
                "tools_used": list(tools_used), "response_time_ms": response_time_ms, "success": success}
        for key, value in (("intent", intent), ("error_type", error_type), ("model", model),
                           ("tokens", tokens), ("time", time), ("ref", ref)):
            if value is not None:
                line[key] = value
        self.send_line(line)

    def sent(self, reply_id):
        self.send_line({"type": "sent", "reply_id": reply_id})

    def send_failed(self, reply_id, error):
        self.send_line({"type": "send_failed", "reply_id": reply_id, "error": str(error)})

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
