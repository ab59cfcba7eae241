"""``baton bench``: load scenarios against a stack of its own, side by side with peers."""
