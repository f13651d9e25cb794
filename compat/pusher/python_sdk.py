"""Drives Herald's Pusher HTTP API with the unmodified PyPI `pusher` package.

Usage: python_sdk.py PORT ACTION [ARGS...], prints one JSON line with the result.
  trigger CHANNEL EVENT DATA_JSON   -> {"ok": true}
  info CHANNEL                      -> the channel's attributes (user_count, subscription_count)
  users CHANNEL                     -> the channel's users
Called by pusher.test.js; exits non-zero with the SDK's error otherwise.
"""

import json
import sys

import pusher

port, action, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
client = pusher.Pusher(app_id="1", key="app-key", secret="app-secret", host="127.0.0.1", port=port, ssl=False)

if action == "trigger":
    channel, event, data = args
    client.trigger(channel, event, json.loads(data))
    print(json.dumps({"ok": True}))
elif action == "info":
    (channel,) = args
    print(json.dumps(client.channel_info(channel, ["user_count", "subscription_count"])))
elif action == "users":
    (channel,) = args
    print(json.dumps(client.users_info(channel)))
else:
    sys.exit(f"unknown action {action}")
