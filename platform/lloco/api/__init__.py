"""The public gRPC API (`lloco.v1`), generated from protos/lloco/v1/lloco.proto by scripts/gen-api.

Do not edit the generated modules; change the proto and regenerate.
"""
