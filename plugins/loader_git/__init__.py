"""Git code loader plugin: git+file:// refs pinned to commits."""
