"""GPU profiles (memory sizing, engine arguments) and the selftest of a built repository."""
