"""The application's side: a task recorded as a row in the caller's own transaction,
its options checked and its arguments serialised as the relay will publish them."""
