"""Executors behind one interface (`base.Executor`), and the conformance suite that holds them to it."""
