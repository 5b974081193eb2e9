"""Generated modules for `llamafleet.v1`; regenerate with `python -m llamafleet.proto.regenerate`."""
