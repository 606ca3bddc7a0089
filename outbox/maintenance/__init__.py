"""The relays' periodic passes: whether published tasks arrived (confirmation), keys
whose tasks are stuck or dead (key keeper), who is alive (heartbeats), and what is old
enough to delete (retention)."""
