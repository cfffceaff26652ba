"""The dashboard's widgets, one per module. They only render what the screen hands them (no engine, no voice)."""
