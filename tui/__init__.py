"""The Textual dashboard: it renders what a backend reports and sends it controls. May import voice, serve and
engine; must not import bench or tradeoff (the command line sits above it)."""
