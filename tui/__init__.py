"""The Textual dashboard and the `tradeoff` command line. The top of the stack: may import voice, engine, bench."""
