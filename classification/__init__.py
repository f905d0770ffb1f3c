"""The classification contract: policies, prompt rendering, completion parsing and verdicts.

The floor every other package stands on; it imports none of them and no model runtime."""
