"""Generated gRPC API of Switchboard (package switchboard.v1). Do not edit by hand."""
