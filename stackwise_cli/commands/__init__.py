"""One thin module per command: parse, load, call the core, render."""
