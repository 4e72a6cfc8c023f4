"""The public entry point: the Remix/Analyze gRPC service and the ``bgm`` CLI."""
