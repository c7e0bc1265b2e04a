"""A tiny text-to-image world that trains on a CPU (see `scenes`, `rewards`, `pipeline`, `pretrain`)."""
