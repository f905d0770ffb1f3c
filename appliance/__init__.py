"""The `appliance` command: one click group over the commands that live beside what they drive."""
