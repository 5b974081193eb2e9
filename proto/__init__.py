"""The wire contract between agents and the controller (`llamafleet.proto.v1`)."""
