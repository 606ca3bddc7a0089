"""The relays, which publish committed rows: a batch (claim, publish, mark; what the beat
sweep runs), the loop around it (woken at commit), and the change-data-capture stream."""
