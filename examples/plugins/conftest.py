"""The example plugins are tested where they are installed (make example-plugin), never from here:
in this checkout's venv they are not installed, and must not be (the kernel would load them)."""

collect_ignore_glob = ["*"]
