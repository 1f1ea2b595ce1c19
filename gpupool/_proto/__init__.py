"""Generated protobuf and gRPC modules (scripts/gen_proto.sh). Never edit by hand."""
